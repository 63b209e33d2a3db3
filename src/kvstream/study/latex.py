"""LaTeX text for the study's tables and macros: escaping, numbers, knob values, macro stems, writing.

Every number the paper prints passes through `fmt` (fixed decimals, a real minus sign, '--' when missing).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np

from kvstream.io import atomic_write_text

# How each policy knob is written in a table head and in prose (docs/method.md, "The `sink` schedule").
KNOB_TEX = {
    "budget_mode": "mode",
    "n_sink": "$S$",
    "window_size": "$W$",
    "compress_every": "$R$",
    "cache_slack": "$\\sigma$",
    "max_drop": "$\\delta$",
}
KNOB_WORDS = {
    "n_sink": "number of sinks $S$",
    "window_size": "window $W$",
    "compress_every": "pruning interval $R$",
    "cache_slack": "slack $\\sigma$",
    "max_drop": "max-drop $\\delta$",
}

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_DIGITS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def tex_escape(s: Any) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def finite(x) -> bool:
    """A real, finite number (None, strings and NaN are not)."""
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def fmt(x, nd: int = 2, signed: bool = False) -> str:
    """A number for LaTeX text: fixed decimals, a real minus sign, '--' for a missing value."""
    if not finite(x):
        return "--"
    x = float(x)
    s = f"{abs(x):.{nd}f}"
    if float(s) == 0:
        return s
    if x < 0:
        return r"\textminus{}" + s
    return ("+" + s) if signed else s


def fmt_ci(row: Mapping, name: str, nd: int = 2, signed: bool = False) -> str:
    """`value` and, when the interval exists, a small `[lo, hi]` after it."""
    v = fmt(row.get(name), nd, signed)
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if finite(lo) and finite(hi):
        return rf"{v}\,\ci{{{fmt(lo, nd, signed)}}}{{{fmt(hi, nd, signed)}}}"
    return v


def fmt_knob(v) -> str:
    """A knob value: an integer as such, None (no cap) or an infinite value as $\\infty$."""
    if isinstance(v, str):
        return tex_escape(v)
    if v is None:
        return r"$\infty$"
    if isinstance(v, float) and not math.isfinite(v):
        return r"$\infty$"
    return str(int(v)) if float(v) == int(float(v)) else str(v)


def ordinal(k: int) -> str:
    """2 -> 2nd, 16 -> 16th, 21 -> 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def macro_stem(name: str, stems: Mapping[str, str] | None = None) -> str:
    """The macro stem of a policy or experiment: the configured one (config `paper.stems`), else a
    LaTeX-safe CamelCase of the name, letters only, digits spelled (abl_s16_d32 -> AblSOneSixDThreeTwo)."""
    if stems and name in stems:
        return stems[name]
    out = []
    for part in re.split(r"[^A-Za-z0-9]+", name):
        if not part:
            continue
        out.append(part[0].upper() + part[1:] if part[0].isalpha() else part)
    s = "".join(out)
    return "".join(_DIGITS[int(ch)] if ch.isdigit() else ch for ch in s)


def table_label(experiment: str) -> str:
    """The LaTeX label of an experiment's table (tab:table1, tab:sweep-compress-every)."""
    return "tab:" + re.sub(r"[^A-Za-z0-9]", "-", experiment)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a generated file atomically (a killed job leaves no half-written table)."""
    atomic_write_text(path, text)


class MacroFile:
    """The lines of a macros file: each `\\newcommand` name once (the first value given wins, so a
    default added last never overrides a measured value), names letters only."""

    def __init__(self):
        self.lines: list[str] = []
        self.names: set[str] = set()
        self.noise: dict[str, float] = {}  # dataset -> timing noise of its speed run (study.identical)

    def add(self, name: str, value: str, comment: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z]+", name):
            raise ValueError(f"bad macro name {name}")
        if name in self.names:
            return
        self.names.add(name)
        if comment:
            self.lines.append(f"% {comment}")
        self.lines.append(rf"\newcommand{{\{name}}}{{{value}}}")

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines)

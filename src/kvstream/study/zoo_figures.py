"""The policy zoo's figures (rows from `zoo`; docs/method.md, "Score-based kinds"), PDF + PNG:

- `zoo_ppl`: the decode PPL increase against the peak length, one colour and marker per kind, R as line style
  and fill, 95 % bootstrap intervals over samples as bars (with one peak length: points);
- `zoo_speed`: time per token (TPOT, from the speed run) against R, one colour, marker and line style per kind,
  one panel per peak length, 95 % t-intervals across the speed run's rounds as bars; the reference's TPOT in the
  title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from kvstream.study.latex import finite, fmt_knob
from kvstream.study.plotting import FIGSIZE, errorbars, pyplot, save, series
from kvstream.study.roles import KIND_NAMES
from kvstream.study.zoo import KIND_ORDER, METRIC, peak, zoo_rows

ZOO_FIGURES = ("zoo_ppl", "zoo_speed")
R_LINES = ("-", "--", ":", "-.")  # line style by R

# one colour and marker per kind (plotting.SERIES: no two alike, in colour or in grey)
KIND_STYLES = {kind: series(i) for i, kind in enumerate(KIND_ORDER)}


def _color(kind: str) -> str:
    return KIND_STYLES.get(kind, series(len(KIND_ORDER)))[0]


def _marker(kind: str) -> str:
    return KIND_STYLES.get(kind, series(len(KIND_ORDER)))[1]


def _kinds(rows) -> list[str]:
    return [k for k in KIND_ORDER if any(r["type"] == k for r in rows)]


def _r_values(rows) -> list:
    return sorted({r.get("compress_every") for r in rows if r.get("compress_every") is not None})


def _legend(ax, kinds, r_values) -> None:
    """Colour and marker: the kind; line style and fill (open past the first R, readable without lines): R.
    One legend right of the axes, kinds first."""
    from matplotlib.lines import Line2D

    kh = [Line2D([], [], color=_color(k), marker=_marker(k), ms=3.5, lw=1.2, label=KIND_NAMES.get(k, k))
          for k in kinds]
    rh = [Line2D([], [], color="0.3", ls=R_LINES[i % len(R_LINES)], lw=0.9, marker="o", ms=3.5,
                 mfc="0.3" if i == 0 else "white", label=f"R={fmt_knob(v)}") for i, v in enumerate(r_values)]
    ax.legend(handles=kh + rh, frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _interval_words(agg: Mapping) -> str:
    n = agg["n_samples"]
    return (f"bars: 95% bootstrap CI over {n} samples" if agg.get("n_boot") else
            f"{n} sample{'s' if n != 1 else ''}: no interval")


def ppl_against_peak(agg: Mapping, out_dir, extra_dirs=(), name: str = "zoo_ppl") -> list[Path]:
    """Decode PPL increase against the peak length per kind and R."""
    plt = pyplot()
    rows = zoo_rows(agg)
    kinds, r_values = _kinds(rows), _r_values(rows)
    peaks = sorted({peak(r) for r in rows if finite(peak(r))})
    fig, ax = plt.subplots(figsize=FIGSIZE)
    n_series = max(len(kinds) * len(r_values), 1)
    for ki, kind in enumerate(kinds):
        for ri, rv in enumerate(r_values):
            sel = sorted((r for r in rows if r["type"] == kind and r.get("compress_every") == rv), key=peak)
            if not sel:
                continue
            # a small relative offset per series keeps overlapping intervals apart (also on a log axis)
            shift = 1 + 0.006 * (ki * len(r_values) + ri - (n_series - 1) / 2)
            x = np.array([peak(r) for r in sel], dtype=float) * shift
            y, yerr = errorbars(sel, METRIC)
            ls = R_LINES[ri % len(R_LINES)]
            ax.errorbar(x, y, yerr=yerr, marker=_marker(kind), ls=ls if len(sel) > 1 else "none", ms=3.5, lw=0.9,
                        mfc=_color(kind) if ri == 0 else "white",
                        color=_color(kind), ecolor=_color(kind), elinewidth=0.6, capsize=1.5)
    ax.axhline(0, color="0.6", lw=0.6, ls=":")
    if len(peaks) > 1 and peaks[-1] / peaks[0] >= 4:
        ax.set_xscale("log", base=2)
    if peaks:
        ax.set_xticks(peaks)
        ax.set_xticklabels([str(int(p)) for p in peaks])
        ax.minorticks_off()
        pad = 0.08 * (peaks[-1] - peaks[0]) if len(peaks) > 1 and ax.get_xscale() == "linear" else 0
        if len(peaks) == 1:
            ax.set_xlim(peaks[0] * 0.85, peaks[0] * 1.15)
        elif pad:
            ax.set_xlim(peaks[0] - pad, peaks[-1] + pad)
    ax.set_xlabel("peak length: largest forward a schedule allows (tokens)")
    ax.set_ylabel("decode PPL increase vs. reference (%)")
    ax.set_title(f"Which tokens to evict, at equal peak length ({_interval_words(agg)})")
    _legend(ax, kinds, r_values)
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out


def speed_against_r(agg: Mapping, out_dir, extra_dirs=(), name: str = "zoo_speed") -> list[Path]:
    """TPOT from the speed run against R per kind, one panel per peak length."""
    plt = pyplot()
    rows = zoo_rows(agg)
    kinds, r_values = _kinds(rows), _r_values(rows)
    peaks = sorted({peak(r) for r in rows if finite(peak(r))}) or [None]
    fig, axes = plt.subplots(1, len(peaks), figsize=(FIGSIZE[0], 2.6), sharey=True, squeeze=False)
    xpos = {v: i for i, v in enumerate(r_values)}  # R as categories: 1 and 32 stay readable side by side
    for ax, pk in zip(axes[0], peaks):
        for ki, kind in enumerate(kinds):
            sel = sorted((r for r in rows if r["type"] == kind and peak(r) == pk and r.get("compress_every") in xpos),
                         key=lambda r: r["compress_every"])
            if not sel:
                continue
            x = np.array([xpos[r["compress_every"]] for r in sel], dtype=float) + 0.05 * (ki - (len(kinds) - 1) / 2)
            y, yerr = errorbars(sel, "tpot_ms")
            ax.errorbar(x, y, yerr=yerr, marker=_marker(kind), ls=KIND_STYLES[kind][2] if len(sel) > 1 else "none",
                        ms=3.5, lw=0.9,
                        color=_color(kind), ecolor=_color(kind), elinewidth=0.6, capsize=1.5,
                        label=KIND_NAMES.get(kind, kind))
        ax.set_xticks(range(len(r_values)))
        ax.set_xticklabels([fmt_knob(v) for v in r_values])
        ax.set_xlim(-0.5, len(r_values) - 0.5)
        ax.set_xlabel(r"pruning interval $R$")
        ax.set_title("peak length " + (str(int(pk)) if pk is not None else "?"))
    axes[0][0].set_ylabel("time per token, TPOT (ms)")
    axes[0][-1].legend(frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ref = agg["policies"].get(agg.get("reference") or "", {})
    rounds = (agg.get("speed") or {}).get("rounds")
    ref_text = (f"; reference ({ref.get('label') or ref.get('policy')}): {ref['tpot_ms']:.1f} ms"
                if finite(ref.get("tpot_ms")) else "")
    fig.suptitle(f"Speed run, batch 1 (bars: 95% t-interval across {rounds} rounds){ref_text}", fontsize=7)
    fig.tight_layout()
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out


def zoo_figure(agg: Mapping, name: str, out_dir, extra_dirs=()) -> list[Path]:
    """One of ZOO_FIGURES by its name (the workflow's figure rule)."""
    if name == "zoo_ppl":
        return ppl_against_peak(agg, out_dir, extra_dirs, name)
    if name == "zoo_speed":
        return speed_against_r(agg, out_dir, extra_dirs, name)
    raise ValueError(f"unknown zoo figure {name!r}: use one of {', '.join(ZOO_FIGURES)}")


def zoo_figures(agg: Mapping, out_dir, extra_dirs=()) -> list[Path]:
    """Both figures of a zoo experiment."""
    return [p for name in ZOO_FIGURES for p in zoo_figure(agg, name, out_dir, extra_dirs)]

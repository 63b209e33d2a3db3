"""The original study's published numbers, read from `published.json` (shipped beside this module).

They are data shown beside ours in the reproduction table and quoted by the `\\Orig...` macros
(the paper's reproduction section), never expected values. The file names no policy of ours: a main
row carries the paper macro stem of the preset it corresponds to (config `paper.stems`), the reference
row `reference: true`; ablation rows are identified by their slack and max-drop.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    """{"setup": str, "facts": {macro: text}, "main": [rows], "ablation": [rows]} (read once)."""
    text = resources.files(__package__).joinpath("published.json").read_text(encoding="utf-8")
    return json.loads(text)


def setup_text() -> str:
    """One line naming the original's model, data, cap, GPU and code (LaTeX)."""
    return published()["setup"]


def facts() -> dict[str, str]:
    """`\\Orig...` macro name -> LaTeX text (model, dtype, dataset, tokens, cap, GPU, sample counts, knobs)."""
    return dict(published()["facts"])


def main_rows() -> list[dict]:
    """The original's main table: label, stem (or reference), speedup, tpot_ms, ppl_increase_percent,
    peak_memory_mb and the preset's knobs (params)."""
    return [dict(r) for r in published()["main"]]


def ablation_rows() -> list[dict]:
    """The original's slack/max-drop ablation at R = 32: cache_slack, max_drop (None: no cap), speedup,
    tpot_ms, ppl_increase_percent."""
    return [dict(r) for r in published()["ablation"]]

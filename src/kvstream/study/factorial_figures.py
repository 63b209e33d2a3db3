"""The figure of how much context each policy keeps (rows from `factorial.attended_rows`), PDF + PNG:
`attended_length`, the decode PPL increase of every policy on the main text against the mean number of tokens
its decode forwards attended over (measured), 95 % bootstrap intervals over samples as bars. One colour and
marker per group (sink caches by budget mode, the score-based kinds, the window cache, the dense cache); the
reference is the grey band at zero, its own point at its window. A policy far above the others (the sink-less
window) is drawn at the top edge with its value in the legend.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kvstream.schedule import SCORED_TYPES
from kvstream.study.factorial import FIGURE, LENGTH, METRIC
from kvstream.study.plotting import FIGSIZE, REFERENCE, errorbars, pyplot, save, series

# (legend, which rows): in drawing order, each with its own series style
GROUPS = (
    ("Sink cache, budget mode fixed", lambda r: r.get("type") == "sink" and r.get("budget_mode") != "cap"),
    ("Sink cache, budget mode cap", lambda r: r.get("type") == "sink" and r.get("budget_mode") == "cap"),
    ("Score-based kinds (H2O, TOVA, key-norm, random)", lambda r: r.get("type") in SCORED_TYPES),
    ("Window (no sinks)", lambda r: r.get("type") == "window"),
    ("Dense (no eviction)", lambda r: r.get("type") == "dense"),
)


def off_scale(rows: Sequence[Mapping]) -> set[str]:
    """Policies far above the others' increases (the sink-less window): drawn at the top edge."""
    ys = np.array([r[METRIC] for r in rows], float)
    if ys.size < 4:
        return set()
    med = np.median(ys)
    spread = np.percentile(np.abs(ys - med), 75) + 1e-9
    return {r["policy"] for r in rows if r[METRIC] - med > 8 * spread + 1.0}


def attended_length(rows: Sequence[Mapping], n_samples: int, out_dir, extra_dirs=(), name: str = FIGURE):
    """Decode PPL increase against mean attended length, every policy of `rows` (see the module docstring)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], FIGSIZE[1] + 0.4))
    ax.axhline(0, **REFERENCE)
    off = off_scale(rows)
    for i, (legend, member) in enumerate(GROUPS):
        sel = [r for r in rows if member(r) and not r.get("is_reference")]
        color, marker, _ = series(i + 1)
        shown = [r for r in sel if r["policy"] not in off]
        if shown:
            y, yerr = errorbars(shown, METRIC)
            ax.errorbar([r[LENGTH] for r in shown], y, yerr=yerr, fmt=marker, ms=4, color=color, ecolor=color,
                        elinewidth=0.7, capsize=1.5, ls="none", label=legend, zorder=3)
        for r in sel:
            if r["policy"] in off:
                ax.plot([r[LENGTH]], [1.0], marker="^", color=color, ms=6, ls="none", clip_on=False, zorder=4,
                        transform=ax.get_xaxis_transform(), label=f"{r.get('label') or r['policy']}: {r[METRIC]:+.1f}% (off scale: at the top)")
    ref = [r for r in rows if r.get("is_reference")]
    if ref:
        ax.plot([ref[0][LENGTH]], [0.0], marker="X", color="0.35", ms=6, ls="none", zorder=4,
                label=f"{ref[0].get('label') or 'reference'} (the reference)")
    ax.set_xlabel("mean tokens attended over per decode forward (measured)")
    ax.set_ylabel("decode PPL increase vs. reference (%)")
    ax.set_title(f"Context kept and quality, every policy on the main text ({n_samples} samples; bars: 95% CI)")
    if rows:
        ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out

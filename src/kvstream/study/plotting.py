"""What every figure of the study shares: matplotlib on the Agg backend with one style, colours, error
bars from a row's interval, and writing a figure as reproducible PDF + PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kvstream.io import atomic_path

FIGSIZE = (5.5, 3.2)
# Colour-blind safe (Okabe-Ito)
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
# Series that must be told apart in print and in grey: colour, marker and line style all differ, and no two
# blues (or the yellow) come in the first six.
SERIES = [("#000000", "o", "-"), ("#D55E00", "s", "--"), ("#0072B2", "^", "-."), ("#E69F00", "D", ":"),
          ("#CC79A7", "v", (0, (5, 1, 1, 1))), ("#009E73", "P", (0, (1, 1)))]
# A reference drawn under the series it is compared with: a wide grey band that a series on top of it
# cannot hide.
REFERENCE = {"color": "0.6", "lw": 2.6, "alpha": 0.7, "zorder": 1}


def series(i: int) -> tuple:
    """(colour, marker, line style) of the i-th series."""
    return SERIES[i % len(SERIES)]


def pyplot():
    """matplotlib.pyplot on the Agg backend, with the study's style (fonts embedded as TrueType)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
        "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 100, "savefig.dpi": 200,
        "pdf.fonttype": 42, "ps.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False,
        "svg.hashsalt": "kvstream", "path.simplify": True,
    })
    return plt


def save(fig, out_dir: str | os.PathLike, name: str, extra_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write {name}.pdf and {name}.png (reproducible: no creation date in the PDF; atomic, so a killed job
    leaves no half-written figure)."""
    out = []
    for d in [out_dir, *extra_dirs]:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        for ext in ("pdf", "png"):
            p = d / f"{name}.{ext}"
            kw = {"metadata": {"CreationDate": None}} if ext == "pdf" else {"metadata": {"Software": None}}
            with atomic_path(p) as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)
            out.append(p)
    return out


def errorbars(rows: Sequence[Mapping], name: str):
    """(values, 2 x n distances to the interval's ends) of a field with `_lo`/`_hi` bounds; 0 without one."""
    v = np.array([r.get(name, np.nan) for r in rows], dtype=float)
    lo = np.array([r.get(f"{name}_lo", np.nan) for r in rows], dtype=float)
    hi = np.array([r.get(f"{name}_hi", np.nan) for r in rows], dtype=float)
    lo = np.where(np.isfinite(lo), v - lo, 0.0)
    hi = np.where(np.isfinite(hi), hi - v, 0.0)
    return v, np.vstack([np.maximum(lo, 0), np.maximum(hi, 0)])

"""The long stream's figure (kvstream.study.longstream): per-token NLL against the position in the stream, a
moving average pooled over the samples, one line per policy, the reference as the grey band the others are read
against, and a vertical line at the model's trained context."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from kvstream.study.plotting import FIGSIZE, REFERENCE, pyplot, save, series
from kvstream.study.wording import plural

LOG_Y_RATIO = 3.0  # a log y-axis when the curves span more than this factor


def longstream_figure(summary: Mapping, out_dir: str | os.PathLike, name: str = "longstream") -> list:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    drawn, values = 0, []
    for r in summary["policies"].values():
        x = np.asarray(r["x"], dtype=float)
        y = np.asarray([np.nan if v is None else v for v in r["y"]], dtype=float)
        if not x.size:
            continue
        values.append(y[np.isfinite(y)])
        # a subsampled reference is averaged over a longer run of positions (not a cache window: say so)
        label = (f"{r['label']} (mean over {r['window']} positions)" if r["window"] != summary["smooth_tokens"]
                 else r["label"])
        if r["is_reference"]:
            ax.plot(x, y, label=label, **REFERENCE)
            continue
        color, _, ls = series(drawn)
        ax.plot(x, y, color=color, ls=ls, lw=1.1, label=label, zorder=3)
        drawn += 1
    trained = summary["trained_context"]
    ax.axvline(trained, color="0.3", ls="--", lw=0.8, zorder=2)
    ax.annotate(f"trained context ({trained})", xy=(trained, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -3), textcoords="offset points", ha="left", va="top", fontsize=7, color="0.3")
    finite = np.concatenate(values) if values else np.zeros(0)
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > LOG_Y_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"NLL (nats), moving average over {summary['smooth_tokens']} tokens")
    ax.set_title(f"{plural(summary['n_samples'], 'sample')} of {summary['n_tokens']} tokens")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.93), frameon=False)
    out = save(fig, out_dir, name)
    plt.close(fig)
    return out

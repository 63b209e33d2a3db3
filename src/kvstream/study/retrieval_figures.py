"""The retrieval heatmap (rows from `kvstream.study.retrieval.cell_rows`), PDF + PNG: exact-match accuracy
over depth (y) and prompt length (x), one panel per policy, one row of panels per task; each cell is
annotated `k/n` (exact of prompts) and, below, how many prompts still held the key at the question."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kvstream.study.plotting import pyplot, save

TASK_TITLES = {"passkey": "pass key", "needle": "needle"}
MAX_COLUMNS = 4


def retrieval_heatmap(rows: Sequence[Mapping], out_dir, name: str = "retrieval", extra_dirs=()) -> list[Path]:
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cols = min(MAX_COLUMNS, len(policies))
    rows_per_task = math.ceil(len(policies) / cols)
    n_rows = rows_per_task * len(tasks)
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.5 * cols + 1.0, 1.4 * n_rows + 0.5), squeeze=False,
                             layout="constrained")
    image = None
    for t, task in enumerate(tasks):
        for i, policy in enumerate(policies):
            ax = axes[t * rows_per_task + i // cols][i % cols]
            cells = {(r["length"], r["depth"]): r for r in rows if r["task"] == task and r["policy"] == policy}
            acc = np.full((len(depths), len(lengths)), np.nan)
            for (length, depth), r in cells.items():
                acc[depths.index(depth), lengths.index(length)] = r["accuracy"]
            image = ax.imshow(acc, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
            for (length, depth), r in cells.items():
                x, y = lengths.index(length), depths.index(depth)
                color = "black" if r["accuracy"] > 0.6 else "white"
                ax.text(x, y, f"{r['exact']}/{r['prompts']}\nheld {r['held']}", ha="center", va="center",
                        fontsize=5.5, color=color)
            label = next(iter(cells.values()))["label"] if cells else policy
            ax.set_title(label if len(tasks) == 1 else f"{label}\n({TASK_TITLES.get(task, task)})", fontsize=6)
            ax.set_xticks(range(len(lengths)))
            ax.set_xticklabels([str(n) for n in lengths])
            ax.set_yticks(range(len(depths)))
            ax.set_yticklabels([f"{d:g}" for d in depths] if i % cols == 0 else [])
        for j in range(len(policies), rows_per_task * cols):  # empty slots of the task's last row
            axes[t * rows_per_task + j // cols][j % cols].set_visible(False)
    fig.supxlabel("prompt length (tokens)", fontsize=7)
    fig.supylabel("depth of the key in the filler", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="exact-match accuracy")
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out

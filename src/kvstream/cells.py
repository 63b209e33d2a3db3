"""Cells whose eviction schedule is provably identical to another policy's are reused, not recomputed.

Two policies with the same kind, S, budget, positions and cache-length trace evict the same tokens
(the oldest non-sink ones) at the same steps, so every forward sees the same keys at the same
positions: their NLL is identical, bit for bit. The workflow evaluates the first of them and writes
the others' cells from its cells, each with its own policy block (docs/method.md, "Identical schedules").
Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy


def nll_path(cell_json: str | os.PathLike) -> Path:
    """`<cell>.nll.npy` beside `<cell>.json`."""
    p = str(cell_json)
    return Path(p[: -len(".json")] + ".nll.npy" if p.endswith(".json") else p + ".nll.npy")


def reuse_cells(sources, outputs, params: dict, policy_name: str, source_name: str) -> None:
    """Write each output cell (JSON + .nll.npy) from the source cell, with this policy's parameters.

    Refuses (KVStreamError) when the source was evaluated with a different schedule: the reuse is
    only valid because the cache-length traces agree, and that is checked on the source's measured trace.
    """
    from kvstream.io import atomic_path
    from kvstream.schedule import cache_lengths

    policy = Policy.from_dict(params)
    if len(sources) != len(outputs):
        raise KVStreamError(f"reuse: {len(sources)} source cells for {len(outputs)} outputs")
    for src, out in zip(sources, outputs):
        cell = json.loads(Path(src).read_text())
        n = int(cell["provenance"]["n_tokens"])
        if cell["trace"]["cache_len"] != cache_lengths(policy, n):
            raise KVStreamError(f"reuse: {src} has another cache-length trace than policy {policy_name}: it must be evaluated")
        block = policy.as_dict()
        block["prefill_len"] = cell["policy"]["prefill_len"]
        cell["policy"] = block
        cell["cell"] = dict(cell.get("cell") or {}, policy=policy_name)
        cell["reused_from"] = {"policy": source_name, "cell": str(src),
                               "why": "identical kind, S, budget, positions and cache-length trace"}
        with atomic_path(nll_path(out)) as tmp:
            shutil.copyfile(nll_path(src), tmp)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(cell, indent=1) + "\n")

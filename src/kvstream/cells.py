"""Cells: a cell's files (`<cell>.json` and `<cell>.nll.npy`), what a cell needs of its sample, and the
reuse of cells whose eviction schedule is provably identical to another policy's. Torch-free.

A cell is published as a pair: the .nll.npy, then the JSON, which carries the sha256 of its .nll.npy
(`nll_sha256`), so a reader can tell a pair that does not belong together (docs/INTERFACES.md, cell JSON).

Two policies with the same kind, S, budget, positions and cache-length trace evict the same tokens
(the oldest non-sink ones) at the same steps, so every forward sees the same keys at the same
positions: their NLL is identical, bit for bit. The workflow evaluates the first of them and writes
the others' cells from its cells, each with its own policy block (docs/method.md, "Identical schedules").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvstream.errors import KVStreamError
from kvstream.io import atomic_paths, sha256_file
from kvstream.schedule import Policy, cache_lengths


def nll_path(cell_json: str | os.PathLike) -> Path:
    """`<cell>.nll.npy` beside `<cell>.json`."""
    p = str(cell_json)
    return Path(p[: -len(".json")] + ".nll.npy" if p.endswith(".json") else p + ".nll.npy")


# ------------------------------------------------------------------------------------------------
# what a cell needs of its sample (docs/method.md, "Prefill and the decode loop")


def check_sample_length(policy: Policy, n_tokens: int) -> None:
    """KVStreamError unless a sample of n_tokens can make a cell of `policy`: the prefill (C, or cap for
    recompute/dense) and at least one decode step, and for a kind that evicts its largest forward
    C + max(R, sigma + 1), which its cache reserves up front: a run of N tokens never holds more than N - 1."""
    policy = policy.resolved()
    limit = policy.budget if policy.evicts else policy.cap
    what = "budget C = n_sink + window_size" if policy.evicts else "cap"
    if n_tokens < limit + 2:
        raise KVStreamError(
            f"too few tokens for the prefill: N={n_tokens} tokens but the prefill takes P={limit} ({what}); decoding "
            f"needs N >= P + 2: use a longer sample (tokens_per_sample / --max-tokens) or a smaller {what}"
        )
    if policy.evicts and n_tokens < policy.max_forward_len + 1:
        raise KVStreamError(
            f"too few tokens for compress_every={policy.compress_every} and cache_slack={policy.cache_slack}: a run of "
            f"N={n_tokens} tokens never holds more than {n_tokens - 1}, but the cache would reserve its largest forward "
            f"C + max(compress_every, cache_slack + 1) = {policy.max_forward_len}: use N >= {policy.max_forward_len + 1} "
            "(tokens_per_sample / --max-tokens) or a smaller compress_every / cache_slack"
        )


def decode_steps(policy: Policy, n_tokens: int) -> int:
    """Decode steps of a cell of n_tokens: N - 1 - P (recompute with recompute_every k runs a forward, and
    times it, at every k-th of them)."""
    return max(n_tokens - 1 - policy.resolved().prefill_len(n_tokens), 0)


# ------------------------------------------------------------------------------------------------
# publishing and checking a cell's pair of files


def check_cell_outputs(outs) -> None:
    """Before any work: each cell JSON path ends in .json, neither it nor its .nll.npy is a folder, and its
    folder exists or can be made and takes new files. KVStreamError naming the --out otherwise."""
    for out in map(Path, outs):
        if not str(out).endswith(".json"):
            raise KVStreamError(f"--out {out}: must end in .json")
        for path in (out, nll_path(out)):
            if path.is_dir():
                raise KVStreamError(f"--out {out}: {path} is a folder; --out names the cell's JSON file")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise KVStreamError(f"--out {out}: cannot write in its folder {out.parent} ({exc.strerror or exc})") from None


def write_cell(out: str | os.PathLike, record: dict, write_nll: Callable[[Path], None]) -> None:
    """Publish a cell: `write_nll(path)` writes the NLL file, `record` (plus `nll_sha256`, the sha256 of
    that file) becomes the JSON. Both are written to temporary files first, then renamed, the .nll.npy
    before the JSON: a failure before the renames leaves the old pair untouched; a failure between them
    leaves a new .nll.npy beside the old JSON, whose nll_sha256 then no longer matches (check_nll_sha256)."""
    with atomic_paths(nll_path(out), out) as (nll_tmp, json_tmp):
        write_nll(nll_tmp)
        record = {**record, "nll_sha256": sha256_file(nll_tmp)}
        json_tmp.write_text(json.dumps(record, indent=1) + "\n")


def check_nll_sha256(cell_json: str | os.PathLike, record: dict | None = None) -> bool:
    """KVStreamError naming the cell when its .nll.npy is missing or is not the file its JSON records
    (`nll_sha256`); True when verified, False for a cell written before the JSON carried the checksum."""
    record = json.loads(Path(cell_json).read_text()) if record is None else record
    expected = record.get("nll_sha256")
    if expected is None:
        return False
    nll = nll_path(cell_json)
    if not nll.is_file():
        raise KVStreamError(f"cell {cell_json}: its per-target NLL file {nll} is missing: rerun the cell")
    if sha256_file(nll) != expected:
        raise KVStreamError(f"cell {cell_json}: {nll} is not the NLL file this JSON was written with (nll_sha256 "
                            "differs): the pair comes from different runs (a write that failed halfway?): rerun the cell")
    return True


# ------------------------------------------------------------------------------------------------
# identical schedules


def reuse_cells(sources, outputs, params: dict, policy_name: str, source_name: str) -> None:
    """Write each output cell (JSON + .nll.npy) from the source cell, with this policy's parameters.

    Refuses (KVStreamError) when the source was evaluated with a different schedule: the reuse is
    only valid because the cache-length traces agree, and that is checked on the source's measured trace.
    """
    policy = Policy.from_dict(params)
    if len(sources) != len(outputs):
        raise KVStreamError(f"reuse: {len(sources)} source cells for {len(outputs)} outputs")
    for src, out in zip(sources, outputs):
        cell = json.loads(Path(src).read_text())
        check_nll_sha256(src, cell)
        n = int(cell["provenance"]["n_tokens"])
        if cell["trace"]["cache_len"] != cache_lengths(policy, n):
            raise KVStreamError(f"reuse: {src} has another cache-length trace than policy {policy_name}: it must be evaluated")
        block = policy.as_dict()
        block["prefill_len"] = cell["policy"]["prefill_len"]
        cell["policy"] = block
        cell["cell"] = dict(cell.get("cell") or {}, policy=policy_name)
        cell["reused_from"] = {"policy": source_name, "cell": str(src),
                               "why": "identical kind, S, budget, positions and cache-length trace"}
        write_cell(out, cell, lambda tmp, src=src: shutil.copyfile(nll_path(src), tmp))

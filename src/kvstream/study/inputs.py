"""The study's inputs: eval cells (docs/INTERFACES.md) grouped by policy and sample, their per-sample
columns, and the dataset's speed run (`kvstream speed`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kvstream.cells import nll_path
from kvstream.errors import KVStreamError


def _sample_key(path: Path, cell: Mapping[str, Any]) -> str:
    label = (cell.get("cell") or {}).get("sample")
    if label is None:
        return path.name[: -len(".json")]
    label = str(label)
    return label if label.startswith("s") else f"s{label}"


def _policy_key(path: Path, cell: Mapping[str, Any]) -> str:
    return str((cell.get("cell") or {}).get("policy") or path.parent.name)


def load_cell(path: str | os.PathLike) -> dict:
    """Read one cell JSON (INTERFACES.md) and note where it came from."""
    path = Path(path)
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVStreamError(f"cannot read cell {path}: {exc}") from exc
    for key in ("policy", "streaming", "timing", "memory"):
        if key not in cell:
            raise KVStreamError(f"cell {path} has no '{key}' section (see docs/INTERFACES.md)")
    cell["_path"] = str(path)
    cell["_sample"] = _sample_key(path, cell)
    cell["_policy"] = _policy_key(path, cell)
    return cell


def load_nll(cell_json: str | os.PathLike) -> np.ndarray:
    """A cell's per-target NLL (float64; NaN where a sparse reference did not score)."""
    return np.load(nll_path(cell_json)).astype(np.float64)


def cell_nll(cell: dict) -> np.ndarray:
    """The per-target NLL of a loaded cell, read once (kept in the cell as `_nll`)."""
    if "_nll" not in cell:
        cell["_nll"] = load_nll(cell["_path"])
    return cell["_nll"]


def group_cells(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, dict]]:
    """policy -> sample -> cell; two cells that say they are the same policy and sample are refused."""
    out: dict[str, dict[str, dict]] = {}
    for p in paths:
        if not str(p).endswith(".json"):
            continue
        cell = load_cell(p)
        other = out.setdefault(cell["_policy"], {}).setdefault(cell["_sample"], cell)
        if other is not cell and Path(other["_path"]).resolve() != Path(cell["_path"]).resolve():
            raise KVStreamError(f"cells {other['_path']} and {cell['_path']} both say they are policy {cell['_policy']}, "
                                f"sample {cell['_sample']} (cell.policy, cell.sample): one was copied or relabelled")
    return out


def sample_order(samples: Iterable[str]) -> list[str]:
    """s0, s1, ..., s10 (numeric order of the labels)."""
    return sorted(samples, key=lambda s: (len(s), s))


def per_sample(cells: Mapping[str, dict], samples: Sequence[str]) -> dict[str, np.ndarray]:
    """One column per quantity, one value per sample (NaN where a cell lacks it)."""
    def col(fn):
        vals = []
        for s in samples:
            try:
                v = fn(cells[s])
            except (KeyError, TypeError):
                v = None
            vals.append(np.nan if v is None else float(v))
        return np.array(vals, dtype=float)

    return {
        "nll_sum": col(lambda c: c["streaming"]["nll_sum"]),
        "n_targets": col(lambda c: c["streaming"]["n_targets"]),
        "decode_nll_sum": col(lambda c: c["streaming"]["decode_nll_sum"]),
        "n_decode_targets": col(lambda c: c["streaming"]["n_decode_targets"]),
        "peak_memory_mb": col(lambda c: c["memory"]["peak_memory_mb"]),
        "kv_cache_bytes": col(lambda c: c["memory"]["kv_cache_bytes"]),
        "runtime_sec": col(lambda c: c["streaming"]["runtime_sec"]),
        "decode_time_sec": col(lambda c: c["streaming"]["decode_time_sec"]),
        "prefill_time_sec": col(lambda c: c["streaming"].get("prefill_time_sec", float("nan"))),
        "decode_tokens": col(lambda c: c["streaming"]["decode_tokens"]),
    }


def trace_stats(cells: Mapping[str, dict], samples: Sequence[str]) -> dict:
    """Largest, smallest and mean measured cache length (`trace.cache_len`) over all samples."""
    lens = [np.asarray((cells[s].get("trace") or {}).get("cache_len") or [], dtype=float) for s in samples]
    lens = [x for x in lens if x.size]
    if not lens:
        return {"trace_max": float("nan"), "trace_min": float("nan"), "trace_mean": float("nan")}
    allx = np.concatenate(lens)
    return {"trace_max": float(allx.max()), "trace_min": float(allx.min()), "trace_mean": float(allx.mean())}


def provenance_summary(cells: Iterable[dict]) -> dict:
    """Every distinct value of each provenance field over the cells, and the first/last start time."""
    keys = ("git_commit", "git_dirty", "torch", "transformers", "python", "device", "device_name", "cpu_count",
            "dtype", "threads", "model", "n_tokens", "seed", "hostname")
    out: dict[str, list] = {k: [] for k in keys}
    starts = []
    for c in cells:
        prov = c.get("provenance") or {}
        for k in keys:
            v = prov.get(k)
            if v is not None and v not in out[k]:
                out[k].append(v)
        if prov.get("started_at"):
            starts.append(str(prov["started_at"]))
    summary: dict[str, Any] = {k: v for k, v in out.items()}
    summary["first_started_at"] = min(starts) if starts else None
    summary["last_started_at"] = max(starts) if starts else None
    return summary


def load_speed(path: str | os.PathLike) -> dict:
    """A `kvstream speed` result."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVStreamError(f"cannot read speed result {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != "kvstream-speed" or "policies" not in data:
        raise KVStreamError(f"{path} is not a `kvstream speed` result (no kind: kvstream-speed)")
    data["_path"] = str(path)
    return data

"""Aggregation of one experiment's eval cells into one row per policy (JSON + CSV).

An experiment is a set of policies on one dataset with a reference policy (docs/method.md, "Metrics"):

- pooled perplexity over samples: exp(total nll / total targets); decode perplexity likewise over the
  decode targets only;
- `ppl_increase_percent` = 100 * (exp(mean over paired targets of nll - reference nll) - 1): the targets
  both scored (all of them, or the reference's every k-th decode target with `recompute_every` k);
- TPOT and `speedup` come from the dataset's speed run (`kvstream speed`), never from the eval cells:
  TPOT is the mean ms per token over whole eviction periods, speedup = reference mean / policy mean,
  intervals across the run's rounds (`kvstream.stats`);
- peak memory and KV bytes: the largest over samples;
- 95 % percentile-bootstrap intervals across samples (`bootstrap`). With a single sample there is no
  interval: the bounds are NaN and `ci_note` says why.

The experiment's role and swept knob (config `experiments.<name>`) and each policy's display label
(config `paper.labels`) are stored with it, for the tables, macros and figures (`roles`).

Nothing is pooled before every cell passes `kvstream.study.verify` (numbers, its .nll.npy, its policy,
model, dataset, tokens, dtype and code version).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kvstream.cells import nll_path
from kvstream.errors import KVStreamError
from kvstream.io import atomic_write_text, sha256_file
from kvstream.stats import log_mean_ci, ratio_ci
from kvstream.study.bootstrap import (CI_LEVEL, DEFAULT_N_BOOT, DEFAULT_SEED, PairedTargets, bootstrap_indices, nan,
                                      pooled_ppl, with_ci)
from kvstream.study.inputs import group_cells, load_speed, per_sample, provenance_summary, sample_order, trace_stats
from kvstream.study.roles import policy_label
from kvstream.study.verify import check_experiment, code_versions

POLICY_FIELDS = (
    "type", "n_sink", "window_size", "compress_every", "cache_slack", "max_drop", "budget_mode", "cap",
    "positions", "budget", "max_forward_len", "prefill_len",
)
TPOT_DEFINITION = ("mean time per output token over whole eviction periods (eviction steps included) in the "
                   "dataset's speed run: one process, batch 1, cache full, policies interleaved in rounds; "
                   "intervals across rounds")
CSV_COLUMNS = (
    "policy", "label", "type", "n_sink", "window_size", "compress_every", "cache_slack", "max_drop",
    "budget_mode", "budget", "max_forward_len", "positions", "n_samples",
    "ppl", "ppl_lo", "ppl_hi", "decode_ppl", "decode_ppl_lo", "decode_ppl_hi", "ppl_all_scored", "decode_ppl_all_scored",
    "ppl_increase_percent", "ppl_increase_percent_lo", "ppl_increase_percent_hi",
    "decode_ppl_increase_percent", "decode_ppl_increase_percent_lo", "decode_ppl_increase_percent_hi",
    "speedup", "speedup_lo", "speedup_hi", "tpot_ms", "tpot_ms_lo", "tpot_ms_hi", "tpot_ms_median",
    "tpot_ms_p10", "tpot_ms_p90", "ratio_to_floor", "paired_targets", "peak_memory_mb", "kv_cache_bytes", "memory_kind", "trace_max", "trace_mean",
    "decode_tokens", "runtime_sec", "ci_note",
)
# Fields whose null in the JSON is a value (no cap, no note, ...), not a missing number.
_NULLABLE = ("max_drop", "ci_note", "memory_kind", "label", "budget_mode", "cap", "positions", "n_sink", "window_size",
             "compress_every", "cache_slack")


def _speed_columns(row: dict, pol: str, reference: str, speed: Mapping | None, source: str | None = None) -> None:
    """TPOT (mean ms per token), its spread and the speedup against the reference, from the speed run.
    source: the policy whose cells this one reuses (identical schedule); its timing stands in when this
    policy was not timed itself."""
    timed = (speed or {}).get("policies", {})
    entry, ref = timed.get(pol), timed.get(reference)
    if entry is None and source in timed:  # an identical schedule: the same computation, timed once
        entry = timed[source]
        row["speed_from"] = source
    for name in ("tpot_ms", "speedup"):
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = nan(), nan(), nan()
    row["tpot_ms_median"] = row["tpot_ms_p10"] = row["tpot_ms_p90"] = nan()
    row["speed_round_ms"] = None
    if entry is None:
        return
    row["tpot_ms"] = float(entry["mean_ms"])
    row["tpot_ms_lo"], row["tpot_ms_hi"] = log_mean_ci(entry["round_mean_ms"])["ci95"]
    row["tpot_ms_median"] = float(entry["median_ms"])
    row["tpot_ms_p10"], row["tpot_ms_p90"] = float(entry["p10_ms"]), float(entry["p90_ms"])
    row["speed_round_ms"] = [float(v) for v in entry["round_mean_ms"]]
    row["speed_steps"], row["speed_events"] = int(entry["steps"]), int(entry["events"])
    row["ratio_to_floor"] = (entry.get("ratio_to_floor") or {}).get("estimate", nan())
    if pol == reference:
        row["speedup"] = 1.0
    elif ref is not None:
        r = ratio_ci(ref["round_mean_ms"], entry["round_mean_ms"])
        row["speedup"] = float(r["estimate"])
        row["speedup_lo"], row["speedup_hi"] = (float(v) for v in r["ci95"])


def _speed_summary(speed: Mapping | None) -> dict | None:
    if speed is None:
        return None
    keys = ("execution", "rounds", "device", "device_name", "dtype", "threads", "floor_len", "git_commit", "started_at")
    out = {k: speed.get(k) for k in keys}
    out["path"] = speed.get("_path")
    return out


def _short_sha(path: Path) -> str | None:
    return sha256_file(path)[:16] if path.exists() else None


def _quality_columns(row: dict, x: Mapping[str, np.ndarray], nlls, paired: PairedTargets | None, idx,
                     is_reference: bool) -> None:
    """PPL, decode PPL and their increase over the reference, each with its bootstrap interval."""
    b = idx is not None
    ppl = pooled_ppl(x["nll_sum"], x["n_targets"])
    ppl_b = pooled_ppl(x["nll_sum"], x["n_targets"], idx) if b else None
    dppl = pooled_ppl(x["decode_nll_sum"], x["n_decode_targets"])
    dppl_b = pooled_ppl(x["decode_nll_sum"], x["n_decode_targets"], idx) if b else None
    if paired is not None and paired.subsampled:
        # The reference scored a subsample: every row's PPL is shown on the paired targets (the same
        # targets in every row, as the increase), each policy's own all-target PPL kept beside it.
        row["ppl_all_scored"], row["decode_ppl_all_scored"] = ppl, dppl
        ps, pn = paired.sums(nlls, decode=False)
        ds, dn = paired.sums(nlls, decode=True)
        ppl, ppl_b = pooled_ppl(ps, pn), (pooled_ppl(ps, pn, idx) if b else None)
        dppl, dppl_b = pooled_ppl(ds, dn), (pooled_ppl(ds, dn, idx) if b else None)
    with_ci(row, "ppl", ppl, ppl_b)
    with_ci(row, "decode_ppl", dppl, dppl_b)

    increases = ("ppl_increase_percent", "decode_ppl_increase_percent")
    if paired is not None and not is_reference:
        for name, decode in zip(increases, (False, True)):
            point, boot, sums = paired.increase(nlls, decode)
            with_ci(row, name, point, boot)
            row.setdefault("paired", {})[name] = sums
    else:  # the reference: exactly 0 by definition, no interval; without a reference: unknown
        for name in increases:
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = (0.0 if is_reference else nan()), nan(), nan()
    if paired is not None:
        row["paired_targets"] = paired.n_pairs(nlls)


def aggregate(
    cell_paths: Iterable[str | os.PathLike],
    *,
    experiment: str = "experiment",
    policies: Sequence[str] | None = None,
    reference: str = "recompute",
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = DEFAULT_SEED,
    labels: Mapping[str, str] | None = None,
    dataset: str | None = None,
    speed: Mapping | str | os.PathLike | None = None,
    role: str | None = None,
    knob: str | None = None,
    policy_blocks: Mapping[str, Mapping] | None = None,
    run_facts: Mapping | None = None,
    allow_mixed_code: bool = False,
) -> dict:
    """Aggregate the cells of one experiment. Returns a JSON-ready dict (see module docstring).

    speed: the dataset's `kvstream speed` result (or its path): TPOT and speedup come from it, never
    from the eval cells (whose step times are diagnostics of a batched job that shared the machine).
    role, knob: the experiment's role and swept knob (config); labels: policy -> display name (config
    `paper.labels`; a policy without one is shown by its name, `roles.policy_label`).
    policy_blocks (policy -> the block the config resolves) and run_facts (model, dataset, n_tokens, dtype
    of the config's run): what each cell must match (`verify.check_experiment`); allow_mixed_code: pool
    cells of different code versions, saying so in `code_note` (else refused).
    """
    if speed is not None and not isinstance(speed, Mapping):
        speed = load_speed(speed)
    by_policy = group_cells(cell_paths)
    if not by_policy:
        raise KVStreamError(f"experiment {experiment}: no cell JSONs given")
    order = list(policies) if policies else sorted(by_policy)
    missing = [p for p in order if p not in by_policy]
    if missing:
        raise KVStreamError(f"experiment {experiment}: no cells for policies {missing}")
    ref_cells = by_policy.get(reference)
    labels = dict(labels or {})
    checked = [p for p in dict.fromkeys([*order, reference]) if p in by_policy]
    check_experiment(by_policy, checked, policy_blocks=policy_blocks, run_facts=run_facts)
    versions, code_note = code_versions(by_policy, checked, experiment=experiment, allow_mixed=allow_mixed_code)

    # Samples shared by every policy of the experiment: all relative numbers use the same samples.
    common = set.intersection(*(set(by_policy[p]) for p in order))
    if ref_cells is not None:
        common &= set(ref_cells)
    samples = sample_order(common)
    if not samples:
        raise KVStreamError(f"experiment {experiment}: no sample is shared by all policies and the reference")
    n = len(samples)
    idx = bootstrap_indices(n, n_boot, seed)
    ci_note = None if idx is not None else "single sample: no bootstrap interval"
    paired = PairedTargets(ref_cells, samples, idx, seed) if ref_cells is not None else None

    rows: dict[str, dict] = {}
    for pol in order:
        cells = by_policy[pol]
        x = per_sample(cells, samples)
        first = cells[samples[0]]
        params = {k: first["policy"].get(k) for k in POLICY_FIELDS}
        row: dict[str, Any] = {"policy": pol, "label": policy_label(pol, params, labels.get(pol))}
        row.update(params)
        row["is_reference"] = pol == reference
        row["n_samples"] = n
        row["samples"] = list(samples)
        _quality_columns(row, x, paired.load(cells) if paired is not None else None, paired, idx, pol == reference)
        row["reused_from"] = (first.get("reused_from") or {}).get("policy")
        _speed_columns(row, pol, reference, speed, row["reused_from"])

        row["peak_memory_mb"] = float(x["peak_memory_mb"].max())
        row["peak_memory_mb_mean"] = float(x["peak_memory_mb"].mean())
        row["kv_cache_bytes"] = float(x["kv_cache_bytes"].max())
        row["kv_cache_mb"] = row["kv_cache_bytes"] / 2**20
        row["memory_kind"] = first["memory"].get("memory_kind")
        row["runtime_sec"] = float(x["runtime_sec"].sum())
        row["decode_time_sec"] = float(x["decode_time_sec"].sum())
        row["decode_tokens"] = int(x["decode_tokens"].sum())
        row["n_targets"] = int(x["n_targets"].sum())
        row["n_decode_targets"] = int(x["n_decode_targets"].sum())
        row.update(trace_stats(cells, samples))
        row["ci_note"] = ci_note
        row["per_sample"] = {k: [float(v) for v in x[k]] for k in
                             ("nll_sum", "n_targets", "decode_nll_sum", "n_decode_targets")}
        row["per_sample"]["nll_sha256"] = [_short_sha(nll_path(cells[s]["_path"])) for s in samples]
        row["per_sample"]["trace_sha256"] = [
            hashlib.sha256(json.dumps((cells[s].get("trace") or {}).get("cache_len")).encode()).hexdigest()[:16]
            for s in samples]
        row["per_sample"]["cells"] = [cells[s]["_path"] for s in samples]
        # The original key names (docs/INTERFACES.md, `metrics`), filled at the aggregate level.
        row["metrics"] = {k: row[k] for k in ("speedup", "tpot_ms", "ppl_increase_percent", "peak_memory_mb")}
        row["streaming"] = {
            "perplexity": row["ppl"],
            "decode_perplexity": row["decode_ppl"],
            "runtime_sec": row["runtime_sec"],
            "decode_time_sec": row["decode_time_sec"],
            "decode_tokens": row["decode_tokens"],
        }
        rows[pol] = row

    all_cells = [c for pol in order for c in by_policy[pol].values()]
    if ref_cells is not None:
        all_cells += list(ref_cells.values())
    return {
        "experiment": experiment,
        "role": role or "other",
        "knob": knob,
        "dataset": dataset or (first.get("cell") or {}).get("dataset"),
        "model": (first.get("cell") or {}).get("model"),
        "reference": reference if ref_cells is not None else None,
        "policies_order": order,
        "samples": list(samples),
        "n_samples": n,
        "ci_level": CI_LEVEL,
        "n_boot": int(n_boot) if idx is not None else 0,
        "seed": int(seed),
        "ci_note": ci_note,
        "tpot_definition": TPOT_DEFINITION if speed is not None else "no speed run given: no TPOT",
        "speed": _speed_summary(speed),
        "recompute_every": paired.every if paired is not None else None,
        "pairing_note": paired.note if paired is not None else None,
        "provenance": provenance_summary(all_cells),
        "code_versions": versions,
        "code_note": code_note,
        "policies": rows,
    }


def _json_clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_clean(obj.item())
    return obj


def write_aggregate(agg: dict, json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> None:
    """JSON (NaN written as null) and a flat CSV, one row per policy."""
    atomic_write_text(json_path, json.dumps(_json_clean(agg), indent=1) + "\n")
    if csv_path is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for pol in agg["policies_order"]:
            w.writerow({k: ("" if v is None else v) for k, v in agg["policies"][pol].items()})
        atomic_write_text(csv_path, buf.getvalue())


def read_aggregate(path: str | os.PathLike) -> dict:
    """Load an aggregate JSON, turning the nulls of numeric fields back into NaN."""
    agg = json.loads(Path(path).read_text())
    for row in agg["policies"].values():
        for k, v in list(row.items()):
            if v is None and k not in _NULLABLE:
                row[k] = nan()
        for k, v in list(row.get("metrics", {}).items()):
            if v is None:
                row["metrics"][k] = nan()
    return agg


def load_aggregates(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """experiment -> aggregate, in the order given."""
    out = {}
    for p in paths:
        agg = read_aggregate(p)
        out[agg.get("experiment") or Path(p).stem] = agg
    return out

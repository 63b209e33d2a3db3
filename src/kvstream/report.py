"""Aggregation of eval cells, LaTeX tables and the macros the paper quotes.

Everything the paper says with a number comes from here (tables, `macros.tex`) or from
`kvstream.figures`; nothing is typed by hand.

Aggregation of one experiment (a set of policies on one dataset, a reference policy):

- pooled perplexity over samples: exp(total nll / total targets); decode perplexity likewise over the
  decode targets only;
- `ppl_increase_percent` = 100 * (exp(mean over paired targets of nll - reference nll) - 1): the targets
  both scored (all of them, or the reference's every k-th decode target with `recompute_every` k);
- TPOT and `speedup` come from the dataset's speed run (`kvstream speed`), never from the eval cells:
  TPOT is the mean ms per token over whole eviction periods, speedup = reference mean / policy mean,
  intervals across the run's rounds (`kvstream.stats`);
- peak memory and KV bytes: the largest over samples;
- 95 % percentile-bootstrap intervals across samples: samples are resampled with replacement (seeded,
  the same resamples for every policy, so contrasts between policies are paired). With a single
  sample there is no interval: the bounds are NaN and `ci_note` says why.

Command line: `kvstream aggregate`, `kvstream tables`, `kvstream macros` (see `add_parser`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kvstream.cells import nll_path
from kvstream.errors import KVStreamError

CI_LEVEL = 0.95
DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0

# ---------------------------------------------------------------------------------------------------
# The original study's published numbers (method.md, "Published numbers"): Pythia-2.8B fp16, PG19
# 20 000 tokens, cap 2048, NVIDIA A800 80GB, the original implementation (with the defects listed in
# method.md). They are DATA to be shown beside ours in the reproduction table -- never expected values.
# ---------------------------------------------------------------------------------------------------
ORIGINAL_FACTS = {
    "OrigModel": "Pythia-2.8B", "OrigDtype": "fp16", "OrigDataset": "PG19", "OrigTokens": "20\\,000",
    "OrigCap": "2048", "OrigTrainedContext": "2048", "OrigGPU": "NVIDIA A800 80GB", "OrigSamplesQuick": "3",
    "OrigSamplesFull": "10", "OrigAblR": "32", "OrigAblSigma": "16", "OrigAblDelta": "32", "OrigBestR": "64",
}
ORIGINAL_SETUP = "Pythia-2.8B, fp16, PG19 (20\\,000 tokens), cap 2048, NVIDIA A800 80GB, original code"
ORIGINAL_PUBLISHED = {
    "table1": [
        # (original label, our preset name, speedup, tpot_ms, ppl_increase_percent, peak_memory_mb)
        ("Full Recomputation", "recompute", 1.00, 100.5, 0.00, 6621),
        ("MIT StreamingLLM", "mit_streaming", 6.86, 14.6, 2.33, 6617),
        ("Ours (Best, R=64)", "ours_best", 7.11, 14.1, 2.82, 6616),
        ("Ours (Softlite, R=32)", "ours_softlite", 7.07, 14.2, 2.19, 6616),
    ],
    "table2": [
        # (sigma, delta, speedup, tpot_ms, ppl_increase_percent); all at R = 32
        (0, None, 6.94, 14.5, 6.48),
        (16, None, 7.03, 14.3, 6.01),
        (0, 32, 6.88, 14.6, 5.94),
        (16, 32, 7.07, 14.2, 2.19),
    ],
}

# The original presets' knobs (method.md), to flag where ours differ (W is scaled with the cap, so not compared).
ORIGINAL_PRESET_PARAMS = {
    "mit_streaming": {"n_sink": 4, "compress_every": 1, "cache_slack": 0, "max_drop": None},
    "ours_best": {"n_sink": 32, "compress_every": 64, "cache_slack": 16, "max_drop": 32},
    "ours_softlite": {"n_sink": 32, "compress_every": 32, "cache_slack": 16, "max_drop": 32},
}

# Display names of the presets of method.md; anything else is shown by its knobs.
PRESET_NAMES = {
    "recompute": "Full recomputation",
    "dense": "Dense (no eviction)",
    "window": "Window (no sinks)",
    "mit_streaming": "StreamingLLM",
    "ours_eager": "Ours (Eager)",
    "ours_best": "Ours (Best)",
    "ours_softlite": "Ours (Softlite)",
}
# Short macro stems for the presets (\SpeedupBest, \PplIncMit, ...).
PRESET_STEMS = {
    "recompute": "Recompute",
    "dense": "Dense",
    "window": "WindowOnly",
    "mit_streaming": "Mit",
    "ours_eager": "Eager",
    "ours_best": "Best",
    "ours_softlite": "Softlite",
}
# Knob of each sweep experiment (name -> policy field); other sweeps are detected from the data.
SWEEP_KNOBS = {
    "sweep_compress_every": "compress_every",
    "sweep_cache_slack": "cache_slack",
    "sweep_max_drop": "max_drop",
    "sweep_n_sink": "n_sink",
}
KNOB_TEX = {
    "budget_mode": "mode",
    "n_sink": "$S$",
    "window_size": "$W$",
    "compress_every": "$R$",
    "cache_slack": "$\\sigma$",
    "max_drop": "$\\delta$",
}
KNOB_WORDS = {
    "n_sink": "number of sinks $S$",
    "window_size": "window $W$",
    "compress_every": "pruning interval $R$",
    "cache_slack": "slack $\\sigma$",
    "max_drop": "max-drop $\\delta$",
}
POLICY_FIELDS = (
    "type", "n_sink", "window_size", "compress_every", "cache_slack", "max_drop", "budget_mode", "cap",
    "positions", "budget", "max_forward_len", "prefill_len",
)


# ------------------------------------------------------------------------------------------ loading
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
    return np.load(nll_path(cell_json)).astype(np.float64)


def _file_sha(path: Path) -> str | None:
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def group_cells(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, dict]]:
    """policy -> sample -> cell."""
    out: dict[str, dict[str, dict]] = {}
    for p in paths:
        if not str(p).endswith(".json"):
            continue
        cell = load_cell(p)
        out.setdefault(cell["_policy"], {})[cell["_sample"]] = cell
    return out


# ------------------------------------------------------------------------------------- statistics
def _nan() -> float:
    return float("nan")


def bootstrap_indices(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> np.ndarray | None:
    """(n_boot, n) indices of samples drawn with replacement; None when n < 2 (no interval)."""
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def percentile_ci(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return _nan(), _nan()
    a = (1 - level) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def pooled_ppl(nll_sum: np.ndarray, n: np.ndarray, idx: np.ndarray | None = None):
    """exp(sum nll / sum targets); with idx (B, n) one value per resample."""
    nll_sum = np.asarray(nll_sum, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):  # no targets -> NaN, not a warning
        if idx is None:
            return float(np.exp(nll_sum.sum() / n.sum())) if n.sum() > 0 else float("nan")
        return np.exp(nll_sum[idx].sum(axis=1) / n[idx].sum(axis=1))


def geomean(x: np.ndarray, idx: np.ndarray | None = None):
    logx = np.log(np.asarray(x, dtype=float))
    if idx is None:
        return float(np.exp(logx.mean()))
    return np.exp(logx[idx].mean(axis=1))


def _with_ci(row: dict, name: str, point: float, boot: np.ndarray | None, note: str | None = None) -> None:
    row[name] = float(point)
    if boot is None:
        row[f"{name}_lo"], row[f"{name}_hi"] = _nan(), _nan()
    else:
        row[f"{name}_lo"], row[f"{name}_hi"] = percentile_ci(boot)


# ------------------------------------------------------------------------------------ aggregation
def _per_sample(cells: Mapping[str, dict], samples: Sequence[str]) -> dict[str, np.ndarray]:
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


def _trace_stats(cells: Mapping[str, dict], samples: Sequence[str]) -> dict:
    lens = [np.asarray((cells[s].get("trace") or {}).get("cache_len") or [], dtype=float) for s in samples]
    lens = [x for x in lens if x.size]
    if not lens:
        return {"trace_max": _nan(), "trace_min": _nan(), "trace_mean": _nan()}
    allx = np.concatenate(lens)
    return {"trace_max": float(allx.max()), "trace_min": float(allx.min()), "trace_mean": float(allx.mean())}


def _provenance_summary(cells: Iterable[dict]) -> dict:
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


def display_name(policy: str, params: Mapping[str, Any]) -> str:
    """Human name for a policy, with the knob that distinguishes a preset taken from its parameters."""
    base = PRESET_NAMES.get(policy)
    if base is None:
        if policy.endswith("_cap") and policy[: -len("_cap")] in PRESET_NAMES:  # peak-matched variant
            inner = display_name(policy[: -len("_cap")], params)
            return (inner[:-1] + ", cap)") if inner.endswith(")") else inner + " (cap)"
        return policy
    if policy.startswith("ours_") or policy == "mit_streaming":
        r = params.get("compress_every")
        s = params.get("n_sink")
        extra = f"S={s}, R={r}" if policy == "mit_streaming" else f"R={r}"
        return f"{base[:-1]}, {extra})" if base.endswith(")") else f"{base} ({extra})"
    if policy == "window":
        return f"{base[:-1]}, W={params.get('window_size')})"
    return base


TPOT_DEFINITION = ("mean time per output token over whole eviction periods (eviction steps included) in the "
                   "dataset's speed run: one process, batch 1, cache full, policies interleaved in rounds; "
                   "intervals across rounds")


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


def _speed_columns(row: dict, pol: str, reference: str, speed: Mapping | None, source: str | None = None) -> None:
    """TPOT (mean ms per token), its spread and the speedup against the reference, from the speed run.
    source: the policy whose cells this one reuses (identical schedule); its timing stands in when this
    policy was not timed itself."""
    from kvstream.stats import log_mean_ci, ratio_ci

    timed = (speed or {}).get("policies", {})
    entry, ref = timed.get(pol), timed.get(reference)
    if entry is None and source in timed:  # an identical schedule: the same computation, timed once
        entry = timed[source]
        row["speed_from"] = source
    for name in ("tpot_ms", "speedup"):
        row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _nan(), _nan(), _nan()
    row["tpot_ms_median"] = row["tpot_ms_p10"] = row["tpot_ms_p90"] = _nan()
    row["speed_round_ms"] = None
    if entry is None:
        return
    row["tpot_ms"] = float(entry["mean_ms"])
    row["tpot_ms_lo"], row["tpot_ms_hi"] = log_mean_ci(entry["round_mean_ms"])["ci95"]
    row["tpot_ms_median"] = float(entry["median_ms"])
    row["tpot_ms_p10"], row["tpot_ms_p90"] = float(entry["p10_ms"]), float(entry["p90_ms"])
    row["speed_round_ms"] = [float(v) for v in entry["round_mean_ms"]]
    row["speed_steps"], row["speed_events"] = int(entry["steps"]), int(entry["events"])
    row["ratio_to_floor"] = (entry.get("ratio_to_floor") or {}).get("estimate", _nan())
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


class _Paired:
    """Each policy's per-target NLL paired with the reference's, on the targets both scored.

    With `recompute_every` k > 1 the reference scores every k-th decode target only; the PPL increase
    is then exp(mean paired NLL difference) - 1 on that subsample, and each bootstrap resample also
    resamples the paired targets within each drawn sample, so the interval carries the subsample's
    sampling error (docs/method.md, "Metrics").
    """

    def __init__(self, ref_cells: Mapping[str, dict], samples: Sequence[str], idx: np.ndarray | None, seed: int):
        self.samples, self.idx, self.seed = list(samples), idx, seed
        self.ref = [load_nll(ref_cells[s]["_path"]) for s in samples]
        self.prefill = [int(ref_cells[s]["policy"].get("prefill_len") or 0) for s in samples]
        self.every = int(ref_cells[samples[0]]["policy"].get("recompute_every") or 1)
        self.subsampled = any(np.isnan(r[p:]).any() for r, p in zip(self.ref, self.prefill))
        self.note = (f"PPL increase on the paired subsample: the reference scored every {self.every}-th decode target; "
                     "intervals resample samples and, within each, the paired targets"
                     if self.subsampled else "PPL increase on all targets, paired per target; intervals resample samples")

    def load(self, cells: Mapping[str, dict]) -> list[np.ndarray]:
        """A policy's per-target NLL of every sample (read once per policy)."""
        out = []
        for s, ref in zip(self.samples, self.ref):
            x = load_nll(cells[s]["_path"])
            if x.shape != ref.shape:
                raise KVStreamError(f"cell {cells[s]['_path']}: {x.size} targets but the reference has {ref.size}")
            out.append(x)
        return out

    def _pairs(self, nlls: Sequence[np.ndarray], decode: bool):
        """Per sample: (the policy's NLL, the reference's NLL) on the targets both scored."""
        for x, ref, prefill in zip(nlls, self.ref, self.prefill):
            mask = np.isfinite(ref) & np.isfinite(x)
            if decode:
                mask[:prefill] = False
            yield x[mask], ref[mask]

    def sums(self, nlls: Sequence[np.ndarray], decode: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per sample: the sum of this policy's NLL over the paired targets, and their count."""
        pairs = list(self._pairs(nlls, decode))
        return np.array([float(x.sum()) for x, _ in pairs]), np.array([x.size for x, _ in pairs], dtype=float)

    def n_pairs(self, nlls: Sequence[np.ndarray]) -> int:
        return int(sum(x.size for x, _ in self._pairs(nlls, decode=True)))

    def increase(self, nlls: Sequence[np.ndarray], decode: bool):
        """(point, bootstrap values or None, per-sample sums) of the PPL increase in percent."""
        d = [x - r for x, r in self._pairs(nlls, decode)]
        sums = np.array([x.sum() for x in d])
        cnt = np.array([x.size for x in d], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            point = 100 * (math.exp(sums.sum() / cnt.sum()) - 1) if cnt.sum() else _nan()
            boot = None
            if self.idx is not None and self.subsampled:
                rng = np.random.default_rng(self.seed + 1)
                total = np.zeros(self.idx.shape[0])
                for j in range(self.idx.shape[1]):
                    for s, x in enumerate(d):
                        rows = np.flatnonzero(self.idx[:, j] == s)
                        if rows.size and x.size:
                            total[rows] += x[rng.integers(0, x.size, (rows.size, x.size))].sum(axis=1)
                boot = 100 * (np.exp(total / cnt[self.idx].sum(axis=1)) - 1)
            elif self.idx is not None:
                boot = 100 * (np.exp(sums[self.idx].sum(axis=1) / cnt[self.idx].sum(axis=1)) - 1)
        return point, boot, {"delta_nll_sum": [float(v) for v in sums], "n": [int(v) for v in cnt]}


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
) -> dict:
    """Aggregate the cells of one experiment. Returns a JSON-ready dict (see module docstring).

    speed: the dataset's `kvstream speed` result (or its path): TPOT and speedup come from it, never
    from the eval cells (whose step times are diagnostics of a batched job that shared the machine).
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

    # Samples shared by every policy of the experiment: all relative numbers use the same samples.
    common = set.intersection(*(set(by_policy[p]) for p in order))
    if ref_cells is not None:
        common &= set(ref_cells)
    samples = sorted(common, key=lambda s: (len(s), s))
    if not samples:
        raise KVStreamError(f"experiment {experiment}: no sample is shared by all policies and the reference")
    n = len(samples)
    idx = bootstrap_indices(n, n_boot, seed)
    ci_note = None if idx is not None else "single sample: no bootstrap interval"

    paired = _Paired(ref_cells, samples, idx, seed) if ref_cells is not None else None

    rows: dict[str, dict] = {}
    for pol in order:
        cells = by_policy[pol]
        x = _per_sample(cells, samples)
        first = cells[samples[0]]
        params = {k: first["policy"].get(k) for k in POLICY_FIELDS}
        row: dict[str, Any] = {"policy": pol, "label": labels.get(pol) or display_name(pol, params)}
        row.update(params)
        row["is_reference"] = pol == reference
        row["n_samples"] = n
        row["samples"] = list(samples)
        b = idx is not None

        ppl = pooled_ppl(x["nll_sum"], x["n_targets"])
        ppl_b = pooled_ppl(x["nll_sum"], x["n_targets"], idx) if b else None
        dppl = pooled_ppl(x["decode_nll_sum"], x["n_decode_targets"])
        dppl_b = pooled_ppl(x["decode_nll_sum"], x["n_decode_targets"], idx) if b else None
        nlls = paired.load(cells) if paired is not None else None
        if paired is not None and paired.subsampled:
            # The reference scored a subsample: every row's PPL is shown on the paired targets (the same
            # targets in every row, as the increase), each policy's own all-target PPL kept beside it.
            row["ppl_all_scored"], row["decode_ppl_all_scored"] = ppl, dppl
            ps, pn = paired.sums(nlls, decode=False)
            ds, dn = paired.sums(nlls, decode=True)
            ppl, ppl_b = pooled_ppl(ps, pn), (pooled_ppl(ps, pn, idx) if b else None)
            dppl, dppl_b = pooled_ppl(ds, dn), (pooled_ppl(ds, dn, idx) if b else None)
        _with_ci(row, "ppl", ppl, ppl_b)
        _with_ci(row, "decode_ppl", dppl, dppl_b)

        if paired is not None and pol != reference:
            for name, decode in (("ppl_increase_percent", False), ("decode_ppl_increase_percent", True)):
                point, boot, sums = paired.increase(nlls, decode)
                _with_ci(row, name, point, boot)
                row.setdefault("paired", {})[name] = sums
        elif pol == reference:
            # Exactly 0 by definition: no interval to estimate.
            for name in ("ppl_increase_percent", "decode_ppl_increase_percent"):
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = 0.0, _nan(), _nan()
        else:
            for name in ("ppl_increase_percent", "decode_ppl_increase_percent"):
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _nan(), _nan(), _nan()
        if paired is not None:
            row["paired_targets"] = paired.n_pairs(nlls)
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
        row.update(_trace_stats(cells, samples))
        row["ci_note"] = ci_note
        row["per_sample"] = {k: [float(v) for v in x[k]] for k in
                             ("nll_sum", "n_targets", "decode_nll_sum", "n_decode_targets")}
        row["per_sample"]["nll_sha256"] = [_file_sha(nll_path(cells[s]["_path"])) for s in samples]
        row["per_sample"]["trace_sha256"] = [
            hashlib.sha256(json.dumps((cells[s].get("trace") or {}).get("cache_len")).encode()).hexdigest()[:16]
            for s in samples]
        row["per_sample"]["cells"] = [cells[s]["_path"] for s in samples]
        # The original key names (method.md), filled at the aggregate level.
        row["metrics"] = {
            "speedup": row["speedup"],
            "tpot_ms": row["tpot_ms"],
            "ppl_increase_percent": row["ppl_increase_percent"],
            "peak_memory_mb": row["peak_memory_mb"],
        }
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
        "provenance": _provenance_summary(all_cells),
        "policies": rows,
    }


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


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_aggregate(agg: dict, json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> None:
    """JSON (NaN written as null) and a flat CSV, one row per policy."""
    _atomic_write(json_path, json.dumps(_json_clean(agg), indent=1) + "\n")
    if csv_path is not None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for pol in agg["policies_order"]:
            w.writerow({k: ("" if v is None else v) for k, v in agg["policies"][pol].items()})
        _atomic_write(csv_path, buf.getvalue())


def read_aggregate(path: str | os.PathLike) -> dict:
    """Load an aggregate JSON, turning the nulls of numeric fields back into NaN."""
    agg = json.loads(Path(path).read_text())
    for row in agg["policies"].values():
        for k, v in list(row.items()):
            if v is None and k not in ("max_drop", "ci_note", "memory_kind", "label", "budget_mode", "cap",
                                       "positions", "n_sink", "window_size", "compress_every", "cache_slack"):
                row[k] = _nan()
        for k, v in list(row.get("metrics", {}).items()):
            if v is None:
                row["metrics"][k] = _nan()
    return agg


def contrast(agg: Mapping, weights: Mapping[str, float], metric: str = "ppl_increase_percent",
             n_boot: int | None = None, seed: int | None = None) -> dict:
    """A linear contrast sum_p w_p * metric_p between policies of one experiment, with a paired
    bootstrap interval (the same resampled samples for every policy; needs the per-sample values).
    metric: ppl_increase_percent (vs the reference, from the paired per-sample sums). Speed contrasts come
    from the speed run's rounds (`_speed_ratio`), not from samples."""
    rows = agg["policies"]
    ref = agg.get("reference")
    if ref is None or ref not in rows:
        return {"value": _nan(), "lo": _nan(), "hi": _nan(), "n_samples": 0}
    n = int(agg["n_samples"])
    n_boot = n_boot if n_boot is not None else (agg.get("n_boot") or DEFAULT_N_BOOT)
    seed = seed if seed is not None else agg.get("seed", DEFAULT_SEED)
    idx = bootstrap_indices(n, n_boot, seed)

    def value(pol, ix):
        if metric == "ppl_increase_percent":
            if pol == ref:
                return 0.0 if ix is None else np.zeros(len(ix))
            sums = rows[pol]["paired"][metric]
            d, c = np.asarray(sums["delta_nll_sum"]), np.asarray(sums["n"], dtype=float)
            if ix is None:
                return 100 * (math.exp(d.sum() / c.sum()) - 1)
            return 100 * (np.exp(d[ix].sum(axis=1) / c[ix].sum(axis=1)) - 1)
        raise KVStreamError(f"contrast: unknown metric {metric}")

    point = float(sum(w * value(p, None) for p, w in weights.items()))
    if idx is None:
        lo = hi = _nan()
    else:
        boot = sum(w * value(p, idx) for p, w in weights.items())
        lo, hi = percentile_ci(boot)
    return {"value": point, "lo": lo, "hi": hi, "n_samples": n}


# ------------------------------------------------------------------------------------ formatting
def tex_escape(s: Any) -> str:
    s = str(s)
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in s)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def fmt(x, nd: int = 2, signed: bool = False) -> str:
    """A number for LaTeX text: fixed decimals, a real minus sign, '--' for a missing value."""
    if not _finite(x):
        return "--"
    x = float(x)
    s = f"{abs(x):.{nd}f}"
    if float(s) == 0:
        return s
    if x < 0:
        return r"\textminus{}" + s
    return ("+" + s) if signed else s


def fmt_ci(row: Mapping, name: str, nd: int = 2, signed: bool = False) -> str:
    """`value` and, when the interval exists, a small `[lo, hi]` after it."""
    v = fmt(row.get(name), nd, signed)
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if _finite(lo) and _finite(hi):
        return rf"{v}\,\ci{{{fmt(lo, nd, signed)}}}{{{fmt(hi, nd, signed)}}}"
    return v


def fmt_knob(v) -> str:
    if isinstance(v, str):
        return tex_escape(v)
    if v is None:
        return r"$\infty$"
    if isinstance(v, float) and not math.isfinite(v):
        return r"$\infty$"
    return str(int(v)) if float(v) == int(float(v)) else str(v)


# ----------------------------------------------------------------------------------------- tables
def _kind(experiment: str, agg: Mapping) -> str:
    if experiment in SWEEP_KNOBS or experiment.startswith("sweep"):
        return "sweep"
    if experiment == "table2" or experiment.startswith("abl"):
        return "ablation"
    return "main"


def varying_knobs(agg: Mapping) -> list[str]:
    """Sink knobs that take more than one value among an experiment's sink policies."""
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    return [k for k in ("n_sink", "window_size", "compress_every", "cache_slack", "max_drop", "budget_mode")
            if len({str(r.get(k)) for r in rows}) > 1]


def sweep_knob(experiment: str, agg: Mapping) -> str | None:
    """The knob a sweep varies: from the experiment's name, else the one sink knob that varies."""
    if experiment in SWEEP_KNOBS:
        return SWEEP_KNOBS[experiment]
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    varying = [k for k in ("compress_every", "cache_slack", "max_drop", "n_sink", "window_size")
               if len({str(r.get(k)) for r in rows}) > 1]
    return varying[0] if varying else None


def ordinal(k: int) -> str:
    """2 -> 2nd, 16 -> 16th, 21 -> 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _caption_common(agg: Mapping) -> str:
    n = agg["n_samples"]
    ref = agg.get("reference") or "none"
    every = agg.get("recompute_every") or 1
    paired = (rf"PPL increase pairs each target with \texttt{{{tex_escape(ref)}}}'s on the same samples"
              + (rf", on every {ordinal(every)} decode target (the ones the reference scores)" if every > 1 else "") + ".")
    ci = (rf"Brackets for PPL: {int(agg['ci_level'] * 100)}\,\% percentile-bootstrap interval over the {n} samples "
          rf"({agg['n_boot']} resamples" + (", paired targets resampled within each" if every > 1 else "") + ")."
          if agg.get("n_boot") else rf"{n} sample: no PPL interval can be estimated.")
    sp = agg.get("speed") or {}
    if sp:
        speed = (r"TPOT: mean ms per token over whole eviction periods in one interleaved speed run "
                 rf"({tex_escape(sp.get('execution'))}, batch 1, {sp.get('rounds')} rounds, {sp.get('threads')} "
                 + ("thread" if sp.get("threads") == 1 else "threads") + "); "
                 r"TPOT and speedup brackets: 95\,\% $t$-intervals across the rounds.")
    else:
        speed = "No speed run: no TPOT."
    samples = "1 sample" if n == 1 else f"{n} samples"
    where = ("over the paired targets (all prefill targets and the reference's decode targets)" if every > 1
             else "over all targets")
    return (rf"{tex_escape(agg.get('model'))} on {tex_escape(agg.get('dataset'))}, {samples}, pooled PPL {where}. "
            rf"{paired} {ci} {speed}")


def _sorted_rows(agg: Mapping, key: str | None = None) -> list[dict]:
    rows = [agg["policies"][p] for p in agg["policies_order"]]
    if key is None:
        return rows
    ref = [r for r in rows if r.get("is_reference")]
    rest = [r for r in rows if not r.get("is_reference")]

    def k(r):
        v = r.get(key)
        return float("inf") if v is None else float(v)

    return ref + sorted(rest, key=k)


def table_main(agg: Mapping, experiment: str) -> str:
    lines = [
        r"\begin{tabular}{@{}lrrrrrrr@{}}",
        r"\toprule",
        r"Method & Speedup & TPOT (ms) & PPL & PPL inc.\ (\%) & Dec.\ PPL inc.\ (\%) & Max.\ $L$ & Peak mem.\ (MB) \\",
        r"\midrule",
    ]
    for r in _sorted_rows(agg):
        ref = r.get("is_reference")
        lines.append(" & ".join([
            tex_escape(r["label"]),
            fmt(1.0) + r" (ref.)" if ref else fmt_ci(r, "speedup"),
            fmt_ci(r, "tpot_ms", 1),
            fmt(r.get("ppl")),
            fmt(0.0) + r" (ref.)" if ref else fmt_ci(r, "ppl_increase_percent", 2, signed=True),
            fmt(0.0) + r" (ref.)" if ref else fmt_ci(r, "decode_ppl_increase_percent", 2, signed=True),
            fmt(r.get("trace_max"), 0),
            fmt(r.get("peak_memory_mb"), 0),
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def table_knobs(agg: Mapping, experiment: str, knobs: Sequence[str], sort_key: str | None = None) -> str:
    head = " & ".join(KNOB_TEX[k] for k in knobs)
    cols = "l" * len(knobs)
    lines = [
        rf"\begin{{tabular}}{{@{{}}{cols}rrrrrrr@{{}}}}",
        r"\toprule",
        rf"{head} & $C$ & Max.\ $L$ & Speedup & TPOT (ms) & PPL & PPL inc.\ (\%) & Dec.\ inc.\ (\%) \\",
        r"\midrule",
    ]
    for r in _sorted_rows(agg, sort_key):
        if r.get("is_reference"):
            first = rf"\multicolumn{{{len(knobs) + 1}}}{{@{{}}l}}{{{tex_escape(r['label'])} (reference)}}"
            lines.append(" & ".join([first, fmt(r.get("trace_max"), 0), fmt(1.0), fmt_ci(r, "tpot_ms", 1),
                                     fmt(r.get("ppl")), fmt(0.0), fmt(0.0)]) + r" \\")
            lines.append(r"\midrule")
            continue
        if r.get("type") != "sink":
            knobcells = [rf"\multicolumn{{{len(knobs)}}}{{@{{}}l}}{{{tex_escape(r['label'])}}}"]
        else:
            knobcells = [fmt_knob(r.get(k)) for k in knobs]
        lines.append(" & ".join(knobcells + [
            fmt(r.get("budget"), 0),
            fmt(r.get("trace_max"), 0),
            fmt_ci(r, "speedup"),
            fmt_ci(r, "tpot_ms", 1),
            fmt(r.get("ppl")),
            fmt_ci(r, "ppl_increase_percent", 2, signed=True),
            fmt_ci(r, "decode_ppl_increase_percent", 2, signed=True),
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def _fixed_knobs_text(agg: Mapping, vary: Sequence[str]) -> str:
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    parts = []
    for k in ("n_sink", "window_size", "compress_every", "cache_slack", "max_drop"):
        if k in vary:
            continue
        vals = {fmt_knob(r.get(k)) for r in rows}
        if len(vals) == 1:
            parts.append(f"{KNOB_TEX[k]}$\\,=\\,${vals.pop()}")
    return ", ".join(parts)


def experiment_table(agg: Mapping, experiment: str) -> str:
    """The complete `table` float for one experiment."""
    kind = _kind(experiment, agg)
    common = _caption_common(agg)
    label = "tab:" + re.sub(r"[^A-Za-z0-9]", "-", experiment)
    if kind == "main":
        body = table_main(agg, experiment)
        title = (rf"Main results (\texttt{{{tex_escape(experiment)}}})." if experiment == "table1" else
                 rf"Results of experiment \texttt{{{tex_escape(experiment)}}}.")
        extra = (r" Dec.\ PPL inc.: the same over decode targets only (after the prefill targets, which every policy "
                 r"scores alike). Max.\ $L$: the largest number of tokens a decode forward attended over (measured). "
                 r"Peak memory: " + tex_escape(_memory_kind_words(agg)) + ".")
    elif kind == "ablation":
        knobs = ["cache_slack", "max_drop"] + [k for k in varying_knobs(agg) if k not in ("cache_slack", "max_drop")]
        body = table_knobs(agg, experiment, knobs)
        fixed = _fixed_knobs_text(agg, knobs)
        title = rf"Slack/max-drop ablation (\texttt{{{tex_escape(experiment)}}}), {fixed}."
        extra = (r" $C$: budget $S+W$; Max.\ $L$: largest measured forward length; Dec.\ inc.: PPL increase over "
                 r"decode targets only; $\delta=\infty$: no cap.")
    else:
        knob = sweep_knob(experiment, agg) or "compress_every"
        knobs = [knob] + [k for k in varying_knobs(agg) if k != knob and not (knob == "n_sink" and k == "window_size")]
        body = table_knobs(agg, experiment, knobs, sort_key=knob)
        fixed = _fixed_knobs_text(agg, knobs + (["window_size"] if knob == "n_sink" else []))
        title = rf"Sweep of the {KNOB_WORDS.get(knob, knob)} (\texttt{{{tex_escape(experiment)}}}), {fixed}."
        extra = r" $C$: budget $S+W$; Max.\ $L$: largest measured forward length; Dec.\ inc.: PPL increase over decode targets only."
    return "\n".join([
        r"\begin{table}",
        r"\centering\small",
        rf"\caption{{{title} {common}{extra}}}",
        rf"\label{{{label}}}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        body + "}",
        r"\end{table}",
        "",
    ])


def _memory_kind_words(agg: Mapping) -> str:
    kinds = {r.get("memory_kind") for r in agg["policies"].values()}
    if kinds == {"cuda_max_allocated"}:
        return "CUDA max. allocated during decode"
    if kinds == {"process_peak_rss"}:
        return "process peak RSS (CPU run; includes the model and the Python process)"
    return "/".join(sorted(str(k) for k in kinds))


def reproduction_table(aggs: Mapping[str, Mapping]) -> str:
    """Our numbers beside the original study's published ones (method.md)."""
    t1 = aggs.get("table1")
    t2 = aggs.get("table2")
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Reproduction: the original study's \emph{published} numbers (``orig.'', " + ORIGINAL_SETUP
        + r"; copied from its report) beside ours (``ours'', this run: "
        + (tex_escape((t1 or t2 or {}).get("model")) if (t1 or t2) else "--")
        + r", see Table~\ref{tab:setup}). Model, data, scale and hardware differ, so only directions "
        r"and orders of magnitude are comparable; memory in particular measures different things.}",
        r"\label{tab:reproduction}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        r"\begin{tabular}{@{}lrrrrrrrr@{}}",
        r"\toprule",
        r" & \multicolumn{2}{c}{Speedup} & \multicolumn{2}{c}{TPOT (ms)} & \multicolumn{2}{c}{PPL inc.\ (\%)}"
        r" & \multicolumn{2}{c}{Peak mem.\ (MB)} \\",
        r"\cmidrule(lr){2-3}\cmidrule(lr){4-5}\cmidrule(lr){6-7}\cmidrule(l){8-9}",
        r"Method & orig. & ours & orig. & ours & orig. & ours & orig. & ours \\",
        r"\midrule",
    ]
    for label, pol, sp, tp, inc, mem in ORIGINAL_PUBLISHED["table1"]:
        r = (t1 or {}).get("policies", {}).get(pol, {})
        ours = r.get("label")
        orig_p = ORIGINAL_PRESET_PARAMS.get(pol, {})
        differs = bool(r) and any(r.get(k) != v for k, v in orig_p.items())
        shown = tex_escape(label) + (rf" {{\scriptsize(ours: {tex_escape(ours)})}}" if differs and ours else "")
        lines.append(" & ".join([
            shown, fmt(sp), fmt(r.get("speedup")), fmt(tp, 1), fmt(r.get("tpot_ms"), 1),
            fmt(inc, 2, signed=True), fmt(r.get("ppl_increase_percent"), 2, signed=True),
            fmt(mem, 0), fmt(r.get("peak_memory_mb"), 0)]) + r" \\")
    lines.append(r"\midrule")
    lines.append(r"\multicolumn{9}{@{}l}{\emph{Ablation at $R=32$, $S=32$} ($\sigma$, $\delta$)} \\")
    for sigma, delta, sp, tp, inc in ORIGINAL_PUBLISHED["table2"]:
        r = _find_sigma_delta(t2, sigma, delta) or _find_role(t2, sigma > 0, delta is not None) or {}
        shown = rf"$\sigma={sigma}$, $\delta=" + (r"\infty" if delta is None else str(delta)) + "$"
        if r and (r.get("cache_slack") != sigma or r.get("max_drop") != delta):
            shown += (rf" {{\scriptsize(ours: $\sigma={fmt_knob(r.get('cache_slack'))}$, "
                      rf"$\delta={fmt_knob(r.get('max_drop')).strip('$')}$)}}")
        lines.append(" & ".join([
            shown,
            fmt(sp), fmt(r.get("speedup")), fmt(tp, 1), fmt(r.get("tpot_ms"), 1),
            fmt(inc, 2, signed=True), fmt(r.get("ppl_increase_percent"), 2, signed=True), "--", "--"]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)


def _find_sigma_delta(agg: Mapping | None, sigma: int, delta: int | None, compress_every: int | None = None):
    if not agg:
        return None
    for r in agg["policies"].values():
        if r.get("type") != "sink":
            continue
        if compress_every is not None and r.get("compress_every") != compress_every:
            continue
        if r.get("cache_slack") == sigma and (r.get("max_drop") == delta or
                                               (delta is None and r.get("max_drop") is None)):
            return r
    return None


def _find_role(agg: Mapping | None, slack: bool, capped: bool):
    """The ablation cell with sigma > 0 (or = 0) and a finite (or no) delta, whatever their values."""
    if not agg:
        return None
    for r in agg["policies"].values():
        if r.get("type") == "sink" and bool(r.get("cache_slack")) == slack and (r.get("max_drop") is not None) == capped:
            return r
    return None


def setup_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    prov = merged_provenance(aggs)
    config = config or {}
    ev = config.get("eval", {})
    model = config.get("model", {})
    datasets = config.get("datasets", {})

    def j(vals):
        return tex_escape(", ".join(str(v) for v in vals)) if vals else "--"

    rows = [
        ("Model", j(prov.get("model_label") or [model.get("name")])),
        ("Model source", j([model.get("source")]) if model.get("source") else "--"),
        ("Datasets", j([f"{k} ({v.get('source', k)}): {v.get('n_samples')} samples x "
                        f"{v.get('tokens_per_sample')} tokens" for k, v in datasets.items()])),
        ("Tokens per sample (measured)", j(prov.get("n_tokens"))),
        ("Cap (recompute window)", j([ev.get("cap")]) if ev.get("cap") is not None else "--"),
        ("Positions", j([ev.get("positions")]) if ev.get("positions") else "--"),
        ("Warm-up decode steps", j([ev.get("warmup")]) if ev.get("warmup") is not None else "--"),
        ("dtype", j([str(d).replace("torch.", "") for d in prov.get("dtype") or []])),
        ("Device", j(prov.get("device_name") or prov.get("device"))),
        ("CPU cores visible", j(prov.get("cpu_count"))),
        ("Torch threads per job", j(prov.get("threads"))),
        ("torch / transformers / Python", j(["/".join([", ".join(map(str, prov.get("torch") or ["?"])),
                                                     ", ".join(map(str, prov.get("transformers") or ["?"])),
                                                     ", ".join(map(str, prov.get("python") or ["?"]))])])),
        ("Code commit", j([c[:12] for c in prov.get("git_commit") or []]) +
         (r" (uncommitted changes)" if True in (prov.get("git_dirty") or []) else "")),
        ("Bootstrap", f"{int(CI_LEVEL * 100)}\\,\\% percentile, {prov.get('n_boot', '--')} resamples over samples"),
    ]
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Setup, read from the provenance recorded in every result cell and from the run's configuration.}",
        r"\label{tab:setup}",
        r"\begin{tabular}{@{}ll@{}}",
        r"\toprule",
    ]
    lines += [rf"{a} & {b} \\" for a, b in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def merged_provenance(aggs: Mapping[str, Mapping]) -> dict:
    out: dict[str, list] = {}
    n_boot = set()
    for agg in aggs.values():
        for k, vals in (agg.get("provenance") or {}).items():
            if isinstance(vals, list):
                for v in vals:
                    if v not in out.setdefault(k, []):
                        out[k].append(v)
        if agg.get("n_boot"):
            n_boot.add(agg["n_boot"])
        if agg.get("model") and agg["model"] not in out.setdefault("model_label", []):
            out["model_label"].append(agg["model"])
    res: dict[str, Any] = dict(out)
    res["n_boot"] = ", ".join(str(x) for x in sorted(n_boot)) if n_boot else "--"
    return res


# ----------------------------------------------------------------------------------------- macros
_DIGITS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def macro_stem(name: str) -> str:
    """A LaTeX-safe CamelCase stem: letters only, digits spelled (abl_s16_d32 -> AblSOneSixDThreeTwo)."""
    if name in PRESET_STEMS:
        return PRESET_STEMS[name]
    out = []
    for part in re.split(r"[^A-Za-z0-9]+", name):
        if not part:
            continue
        out.append(part[0].upper() + part[1:] if part[0].isalpha() else part)
    s = "".join(out)
    return "".join(_DIGITS[int(ch)] if ch.isdigit() else ch for ch in s)


KNOWN_EXPERIMENTS = ("table1", "table2", "sweep_compress_every", "sweep_cache_slack", "sweep_max_drop",
                     "sweep_n_sink", "wikitext_sanity")


class _Macros:
    def __init__(self):
        self.lines: list[str] = []
        self.names: set[str] = set()
        self.noise_factor: float | None = None

    def add(self, name: str, value: str, comment: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z]+", name):
            raise ValueError(f"bad macro name {name}")
        if name in self.names:
            return
        self.names.add(name)
        if comment:
            self.lines.append(f"% {comment}")
        self.lines.append(rf"\newcommand{{\{name}}}{{{value}}}")

    def raw(self, text: str) -> None:
        self.lines.append(text)


def _sentence_ci(c: Mapping, nd: int = 2, unit: str = r"\,pp") -> str:
    if _finite(c.get("lo")) and _finite(c.get("hi")):
        return rf"{fmt(c['value'], nd, True)}{unit}, 95\,\% CI [{fmt(c['lo'], nd, True)}, {fmt(c['hi'], nd, True)}]"
    return rf"{fmt(c['value'], nd, True)}{unit} (one sample, no interval)"


def _ci_excludes_zero(c: Mapping) -> bool | None:
    if not (_finite(c.get("lo")) and _finite(c.get("hi"))):
        return None
    return c["lo"] > 0 or c["hi"] < 0


def author_block(config: Mapping | None) -> str:
    authors = (config or {}).get("authors") or [{"name": "Anonymous Author(s)", "affiliation": "", "email": ""}]
    blocks = []
    for a in authors:
        parts = [tex_escape(a.get("name") or "Anonymous")]
        if a.get("affiliation"):
            parts.append(tex_escape(a["affiliation"]))
        if a.get("email"):
            parts.append(r"\texttt{" + tex_escape(a["email"]) + "}")
        blocks.append(r" \\ ".join(parts))
    return r" \And ".join(blocks)


def macros_tex(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    """`paper/generated/macros.tex`: every number the prose quotes, the author block, and
    \\ifhave<Experiment> switches so the paper only shows what was run."""
    config = config or {}
    m = _Macros()
    m.raw("% Generated by kvstream.report.macros_tex from results/aggregate/*.json and config.yaml.")
    m.raw("% Do not edit: rerun the pipeline.")
    # Result lookup for any experiment/policy/field: \KvResult{table1}{ours_best}{speedup}
    m.raw(r"\makeatletter")
    m.raw(r"\newcommand{\KvResult}[3]{\ifcsname kv@#1@#2@#3\endcsname\csname kv@#1@#2@#3\endcsname"
          r"\else\textbf{??}\fi}")
    for exp in sorted(set(KNOWN_EXPERIMENTS) | set(aggs)):
        stem = macro_stem(exp)
        m.raw(rf"\newif\ifhave{stem}\have{stem}{'true' if exp in aggs else 'false'}")
    m.raw(r"\newif\ifhaveWikitext\haveWikitext" + ("true" if "wikitext_sanity" in aggs else "false"))
    m.raw(r"\newif\ifhaveAblation\haveAblationfalse")  # the full 2x2 (sigma, delta) design ran
    have_sweeps = any(_kind(e, a) == "sweep" for e, a in aggs.items())
    m.raw(r"\newif\ifhaveSweeps\haveSweeps" + ("true" if have_sweeps else "false"))
    for exp, agg in aggs.items():
        for pol, r in agg["policies"].items():
            for field, nd, signed in (("speedup", 2, False), ("tpot_ms", 1, False), ("ppl", 2, False),
                                      ("decode_ppl", 2, False), ("ppl_increase_percent", 2, True),
                                      ("decode_ppl_increase_percent", 2, True), ("peak_memory_mb", 0, False),
                                      ("trace_max", 0, False), ("budget", 0, False)):
                m.raw(rf"\expandafter\def\csname kv@{exp}@{pol}@{field}\endcsname{{{fmt(r.get(field), nd, signed)}}}")
    m.raw(r"\makeatother")

    # Paper metadata and setup
    m.add("KvTitle", tex_escape(config.get("title") or "KV-cache eviction for streaming decoding"))
    m.add("KvAuthors", author_block(config))
    prov = merged_provenance(aggs)

    def one(vals, default="--"):
        vals = [v for v in (vals or []) if v is not None]
        return tex_escape(", ".join(str(v) for v in vals)) if vals else default

    model = config.get("model") or {}
    ev = config.get("eval") or {}
    m.add("ModelName", one(prov.get("model_label")) if prov.get("model_label") else tex_escape(model.get("name", "--")))
    m.add("ModelSource", tex_escape(model.get("source", "--")))
    m.add("Dtype", one([str(d).replace("torch.", "") for d in prov.get("dtype") or []],
                       tex_escape(model.get("dtype", "--"))))
    m.add("DeviceName", one(prov.get("device_name")))
    m.add("DeviceKind", one(prov.get("device")))
    m.add("Threads", one(prov.get("threads")))
    m.add("CpuCount", one(prov.get("cpu_count")))
    m.add("TorchVersion", one(prov.get("torch")))
    m.add("TransformersVersion", one(prov.get("transformers")))
    m.add("PythonVersion", one(prov.get("python")))
    m.add("GitCommit", tex_escape(", ".join(c[:12] for c in prov.get("git_commit") or []) or "unrecorded"))
    dirty = prov.get("git_dirty") or []
    m.add("GitDirty", "with uncommitted changes" if True in dirty else "clean" if False in dirty else
          "working-tree state unrecorded")
    m.add("CapTokens", fmt(ev.get("cap"), 0))
    m.add("Warmup", fmt(ev.get("warmup"), 0))
    m.add("Positions", tex_escape(ev.get("positions", "--")))
    m.add("NBoot", tex_escape(prov.get("n_boot", "--")))
    main = aggs.get("table1") or next(iter(aggs.values()), None)
    if main:
        ds = main.get("dataset")
        dcfg = (config.get("datasets") or {}).get(ds, {})
        m.add("DatasetName", tex_escape(ds))
        m.add("DatasetSource", tex_escape(dcfg.get("source", ds)))
        m.add("NSamples", str(main["n_samples"]))
        m.add("TokensPerSample", one((main.get("provenance") or {}).get("n_tokens"),
                                     fmt(dcfg.get("tokens_per_sample"), 0)))
        m.add("MemoryKind", tex_escape(_memory_kind_words(main)))
        ref = main["policies"].get(main.get("reference") or "recompute", {})
        m.add("DecodeTokens", fmt(ref.get("decode_tokens"), 0))
        others = [r for r in main["policies"].values() if not r.get("is_reference")]
        n = max(int(main["n_samples"]), 1)
        m.add("DecodeTargetsPerSample", fmt(others[0]["n_decode_targets"] / n, 0) if others else "--")
        m.add("PairedTargetsPerSample", fmt(others[0].get("paired_targets", _nan()) / n, 0) if others else "--")
        k = int(main.get("recompute_every") or 1)
        m.add("RecomputeEvery", str(k))
        m.add("RecomputeScored", "every decode target" if k == 1 else f"every {ordinal(k)} decode target")
        sp = main.get("speed") or {}
        m.add("SpeedRounds", tex_escape(sp.get("rounds", "--")))
        t = sp.get("threads")
        m.add("SpeedThreads", "--" if t is None else f"{t} thread" + ("" if t == 1 else "s"))
        m.add("SpeedExecution", tex_escape(sp.get("execution", "--")))
        m.add("SpeedDevice", tex_escape(sp.get("device_name", "--")))
    else:
        for name in ("DatasetName", "DatasetSource", "NSamples", "TokensPerSample", "MemoryKind", "DecodeTokens",
                     "DecodeTargetsPerSample", "PairedTargetsPerSample", "RecomputeEvery", "RecomputeScored", "SpeedRounds",
                     "SpeedThreads", "SpeedExecution", "SpeedDevice"):
            m.add(name, "--")
    m.add("BatchSize", fmt(ev.get("batch_size", 1), 0))
    m.add("OrigSetup", ORIGINAL_SETUP)
    for k, v in ORIGINAL_FACTS.items():
        m.add(k, v)
    # The original's Table 2 (published, R = 32): improvement of the PPL increase over (sigma=0, delta=inf)
    t2o = {(sg, dl): inc for sg, dl, _sp, _tp, inc in ORIGINAL_PUBLISHED["table2"]}
    base = t2o[(0, None)]
    m.add("OrigIncBase", fmt(base, 2, True))
    m.add("OrigIncSlackOnly", fmt(t2o[(16, None)], 2, True))
    m.add("OrigIncDeltaOnly", fmt(t2o[(0, 32)], 2, True))
    m.add("OrigIncBoth", fmt(t2o[(16, 32)], 2, True))
    m.add("OrigImprovementSlack", fmt(100 * (base - t2o[(16, None)]) / base, 0))
    m.add("OrigImprovementDelta", fmt(100 * (base - t2o[(0, 32)]) / base, 0))
    m.add("OrigImprovementBoth", fmt(100 * (base - t2o[(16, 32)]) / base, 0))
    t1o = {pol: (sp, tp, inc, mem) for _l, pol, sp, tp, inc, mem in ORIGINAL_PUBLISHED["table1"]}
    for pol, st in (("mit_streaming", "Mit"), ("ours_best", "Best"), ("ours_softlite", "Softlite")):
        m.add(f"OrigSpeedup{st}", fmt(t1o[pol][0]))
        m.add(f"OrigPplInc{st}", fmt(t1o[pol][2], 2, True))

    # Named macros for the presets of Table 1 (and wherever else they appear first).
    for exp in ("table1", "table2", *[e for e in aggs if e not in ("table1", "table2")]):
        agg = aggs.get(exp)
        if not agg:
            continue
        for pol, r in agg["policies"].items():
            st = macro_stem(pol)
            m.add(f"Speedup{st}", fmt(r.get("speedup")))
            m.add(f"SpeedupLo{st}", fmt(r.get("speedup_lo")))
            m.add(f"SpeedupHi{st}", fmt(r.get("speedup_hi")))
            m.add(f"PplInc{st}", fmt(r.get("ppl_increase_percent"), 2, True))
            m.add(f"PplIncLo{st}", fmt(r.get("ppl_increase_percent_lo"), 2, True))
            m.add(f"PplIncHi{st}", fmt(r.get("ppl_increase_percent_hi"), 2, True))
            m.add(f"DecodePplInc{st}", fmt(r.get("decode_ppl_increase_percent"), 2, True))
            m.add(f"Ppl{st}", fmt(r.get("ppl")))
            m.add(f"DecodePpl{st}", fmt(r.get("decode_ppl")))
            m.add(f"Tpot{st}", fmt(r.get("tpot_ms"), 1))
            m.add(f"PeakMem{st}", fmt(r.get("peak_memory_mb"), 0))
            m.add(f"KvMB{st}", fmt(r.get("kv_cache_mb"), 1))
            m.add(f"MaxLen{st}", fmt(r.get("trace_max"), 0))
            m.add(f"Budget{st}", fmt(r.get("budget"), 0))
            m.add(f"Label{st}", tex_escape(r.get("label")))
            m.add(f"Mode{st}", tex_escape(r.get("budget_mode") or "--"))

    modes = sorted({str(r.get("budget_mode")) for a in aggs.values() for r in a["policies"].values()
                    if r.get("type") == "sink" and r.get("budget_mode")})
    m.add("BudgetModes", tex_escape(", ".join(modes) or "--"))
    m.add("NExperiments", str(len(aggs)))
    m.add("NPolicies", str(len({p for a in aggs.values() for p in a["policies"]})))
    others = [e for e in aggs if e not in ("table1", "table2", "wikitext_sanity") and _kind(e, aggs[e]) != "sweep"]
    m.raw(r"\newif\ifhaveOthers\haveOthers" + ("true" if others else "false"))
    m.add("KvOtherTables", "".join(rf"\input{{generated/tables/{e}.tex}}" for e in others))
    m.add("KvOtherNames", ", ".join(rf"\texttt{{{tex_escape(e)}}}" for e in others) or "none")
    _identical(m, aggs)
    _claims(m, aggs)
    _peak_matched(m, aggs)
    _sweep_summaries(m, aggs)
    # Defaults, so the paper compiles whichever experiments exist (the prose that needs a number sits
    # inside \ifhave... switches; these only avoid undefined-macro errors).
    for st in PRESET_STEMS.values():
        for f in ("Speedup", "SpeedupLo", "SpeedupHi", "PplInc", "PplIncLo", "PplIncHi", "DecodePplInc", "Ppl",
                  "DecodePpl", "Tpot", "PeakMem", "KvMB", "MaxLen", "Budget", "Label", "Mode"):
            m.add(f + st, "--")
    m.add("PeakMatchedSentence", r"No experiment in budget mode \texttt{cap} was run.")
    m.add("TimingNoiseSentence", "")
    for name in CLAIM_MACROS:
        m.add(name, r"\emph{(not run in this configuration)}" if name.endswith("Sentence") else "n/a")
    m.raw("")
    return "\n".join(m.lines)


CLAIM_MACROS = (
    "BestVsMitPplWord", "BestVsMitPplDiff", "BestVsMitPplSupport", "BestVsMitSpeedRatio", "BestVsMitSpeedWord",
    "SoftliteVsMitPplWord", "SoftliteVsMitPplDiff", "WindowVsMitPplWord", "WindowVsMitPplDiff", "EagerSlack",
    "EagerSlackSentence", "EagerResultClause", "DeltaAtSigmaZeroSentence", "InteractionValue", "InteractionCI", "InteractionSentence",
    "SlackEffect", "DeltaEffectAtSigmaZero", "AblCombinedInc", "AblBaseInc", "SweepRLow", "SweepRHigh",
    "SweepRSpeedLow", "SweepRSpeedHigh", "SweepRIncLow", "SweepRIncHigh", "SweepRMaxLenHigh", "SweepRSpeedWord",
    "SinkIncMin", "SinkIncMax", "PeakMatchedSentence", "BestVsMitContextSentence",
    "SweepSummarySweepCompressEvery", "SweepSummarySweepCacheSlack", "SweepSummarySweepMaxDrop",
    "SweepSummarySweepNSink", "TimingNoiseSentence", "TimingNoiseFactor", "IdenticalSentenceTableTwo",
    "IdenticalSentenceSweepCacheSlack", "IdenticalSentenceSweepMaxDrop", "IdenticalSentenceSweepCompressEvery",
    "IdenticalSentenceSweepNSink", "IdenticalSentenceTableOne",
)


def identical_groups(rows: Iterable[Mapping]) -> list[list[dict]]:
    """Policies whose cells computed the same thing: identical measured traces and bit-identical per-token
    NLL files on every sample (needs the hashes stored by `aggregate`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        ps = r.get("per_sample") or {}
        nll, tr = ps.get("nll_sha256"), ps.get("trace_sha256")
        if not nll or None in nll or r.get("is_reference"):
            continue
        groups.setdefault((tuple(nll), tuple(tr or [])), []).append(dict(r))
    return [g for g in groups.values() if len(g) > 1]


def _group_text(g: Sequence[Mapping]) -> str:
    names = ", ".join(rf"\texttt{{{tex_escape(r['policy'])}}}" for r in g)
    t = [r.get("tpot_ms") for r in g if _finite(r.get("tpot_ms")) and not r.get("speed_from")]
    txt = rf"{{{names}}}"
    shared = len(g) - len(t)
    if t and shared:  # evaluated once: the others took the timing of the policy whose cells they reuse
        txt += (rf" (TPOT of the {len(t)} timed separately: {fmt(min(t), 1)}--{fmt(max(t), 1)}\,ms; "
                rf"the other {shared} reuse their cells and timing)")
    elif t:
        txt += rf" (TPOT {fmt(min(t), 1)}--{fmt(max(t), 1)}\,ms)"
    return txt


def _identical(m: _Macros, aggs: Mapping[str, Mapping]) -> None:
    """Which cells computed identical results, per experiment and over all; the TPOT spread inside such a
    group is a direct measurement of timing noise."""
    for exp, agg in aggs.items():
        groups = identical_groups(agg["policies"].values())
        if groups:
            shared = any(r.get("reused_from") for g in groups for r in g)
            m.add("IdenticalSentence" + macro_stem(exp),
                  (r"Policies with the same eviction schedule, evaluated once (shared cells): " if shared else
                   r"Cells that evicted identically and produced bit-identical per-token NLL on every sample: ")
                  + "; ".join(_group_text(g) for g in groups) + ".")
        else:
            m.add("IdenticalSentence" + macro_stem(exp), "")
    seen: dict[str, dict] = {}
    for agg in aggs.values():
        for pol, r in agg["policies"].items():
            seen.setdefault(pol, r)
    groups = identical_groups(seen.values())
    if groups:
        reused = any(r.get("reused_from") for g in groups for r in g)
        m.add("IdenticalAllSentence",
              (r"Across all experiments, these groups of policies have the same eviction schedule (the same "
               r"cache-length trace) although their knobs differ, so they evict the same tokens at the same steps; "
               r"each group was evaluated once and its cells are shared: "
               if reused else
               r"Across all experiments, these groups of policies evicted identically (same measured cache-length "
               r"trace) and produced bit-identical per-token NLL on every sample, although their knobs differ: ")
              + "; ".join(_group_text(g) for g in groups) + ".")
        ratios = []
        for g in groups:  # only policies timed themselves (not those that took an identical one's timing)
            t = [r.get("tpot_ms") for r in g if _finite(r.get("tpot_ms")) and not r.get("speed_from")]
            if len(t) > 1 and min(t) > 0:
                ratios.append((max(t) / min(t), min(t), max(t)))
        if ratios:
            worst = max(ratios)
            m.noise_factor = worst[0]
            m.add("TimingNoiseFactor", fmt(worst[0], 2))
            m.add("TimingNoiseSentence",
                  rf"Since each such group runs exactly the same computation, the spread of the TPOTs of its members "
                  rf"timed separately in the speed run (interleaved with every other policy) is timing noise of this machine: up to a "
                  rf"factor of {fmt(worst[0], 3)} ({fmt(worst[1], 2)} to {fmt(worst[2], 2)}\,ms). "
                  r"Latency differences between policies smaller than that are not resolved by this run.")
    else:
        m.add("IdenticalAllSentence", r"No two policies produced identical results.")


def _sweep_summaries(m: _Macros, aggs: Mapping[str, Mapping]) -> None:
    """SweepSummary<Experiment> macros: ranges over the swept knob, read from the aggregate."""
    for exp, agg in aggs.items():
        if _kind(exp, agg) != "sweep":
            continue
        knob = sweep_knob(exp, agg) or "compress_every"
        rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
        if not rows:
            continue

        def rng(field, nd, signed=False):
            vals = [r.get(field) for r in rows if _finite(r.get(field))]
            if not vals:
                return "--", "--"
            return fmt(min(vals), nd, signed), fmt(max(vals), nd, signed)

        knobs = sorted({fmt_knob(r.get(knob)) for r in rows}, key=lambda v: (len(v), v))
        inc_lo, inc_hi = rng("ppl_increase_percent", 2, True)
        sp_lo, sp_hi = rng("speedup", 2)
        l_lo, l_hi = rng("trace_max", 0)
        best = min(rows, key=lambda r: r.get("ppl_increase_percent") if _finite(r.get("ppl_increase_percent")) else 1e9)
        fast = max(rows, key=lambda r: r.get("speedup") if _finite(r.get("speedup")) else -1e9)
        text = (rf"Over {KNOB_TEX.get(knob, knob)} $\in\{{${', '.join(knobs)}$\}}$ the PPL increase ranges from "
                rf"{inc_lo}\,\% to {inc_hi}\,\% (lowest at {KNOB_TEX.get(knob, knob)}$\,=\,${fmt_knob(best.get(knob))}) "
                rf"and the speedup from {sp_lo}$\times$ to {sp_hi}$\times$ (highest at "
                rf"{KNOB_TEX.get(knob, knob)}$\,=\,${fmt_knob(fast.get(knob))}); the largest measured forward spans "
                + (rf"{l_lo} tokens throughout." if l_lo == l_hi else rf"{l_lo} to {l_hi} tokens.")
                + (" Differences smaller than the intervals in the table are not resolved by these samples."
                   if agg.get("n_boot") else " With one sample there are no intervals."))
        m.add("SweepSummary" + macro_stem(exp), text)


def _modes_words(*rows) -> str:
    modes = list(dict.fromkeys(str(r.get("budget_mode")) for r in rows))
    if len(modes) == 1:
        return rf"budget mode \texttt{{{tex_escape(modes[0])}}}"
    return "budget modes " + " and ".join(rf"\texttt{{{tex_escape(x)}}}" for x in modes)


def _peak_matched(m: _Macros, aggs: Mapping[str, Mapping]) -> None:
    """Describe every experiment that has a sink policy in budget mode `cap` (peak-matched)."""
    parts = []
    for exp, agg in aggs.items():
        rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
        if not any(r.get("budget_mode") == "cap" for r in rows):
            continue
        items = [rf"{tex_escape(r['label'])} (mode \texttt{{{tex_escape(r.get('budget_mode'))}}}, $C={fmt(r.get('budget'), 0)}$, "
                 rf"max.\ $L={fmt(r.get('trace_max'), 0)}$): PPL increase {fmt(r.get('ppl_increase_percent'), 2, True)}\,\%, "
                 rf"speedup {fmt(r.get('speedup'))}$\times$" for r in rows]
        parts.append(rf"In \texttt{{{tex_escape(exp)}}}: " + "; ".join(items) + ".")
    if parts:
        m.add("PeakMatchedSentence", " ".join(parts))


def _cmp_word(x: float, higher: str, lower: str, same: str = "the same as") -> str:
    if not _finite(x):
        return "not comparable with"
    return higher if x > 0 else lower if x < 0 else same


def _speed_ratio(slow: Mapping, fast: Mapping) -> dict:
    """How many times faster `fast` is than `slow` in the speed run: {value, lo, hi} (intervals across rounds)."""
    from kvstream.stats import ratio_ci

    a, b = slow.get("speed_round_ms"), fast.get("speed_round_ms")
    if not isinstance(a, list) or not isinstance(b, list) or not a or len(a) != len(b):
        return {"value": _nan(), "lo": _nan(), "hi": _nan()}
    r = ratio_ci(a, b)
    return {"value": r["estimate"], "lo": r["ci95"][0], "hi": r["ci95"][1]}


def _claims(m: _Macros, aggs: Mapping[str, Mapping]) -> None:
    """Sentences whose direction comes from the data (each with its number and interval)."""
    t1 = aggs.get("table1")
    if t1 and {"ours_best", "mit_streaming"} <= set(t1["policies"]):
        c = contrast(t1, {"ours_best": 1, "mit_streaming": -1})
        ratio = _speed_ratio(t1["policies"]["mit_streaming"], t1["policies"]["ours_best"])
        m.add("BestVsMitPplWord", _cmp_word(c["value"], "higher", "lower"))
        m.add("BestVsMitPplDiff", _sentence_ci(c))
        ex = _ci_excludes_zero(c)
        m.add("BestVsMitPplSupport", "the interval excludes zero" if ex else
              ("the interval includes zero" if ex is False else "with one sample there is no interval"))
        m.add("BestVsMitSpeedRatio", fmt(ratio["value"]) + r"$\times$" + (
            rf", 95\,\% CI [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}]" if _finite(ratio["lo"]) else ""))
        rb, rm = t1["policies"]["ours_best"], t1["policies"]["mit_streaming"]
        lb, lm = rb.get("trace_max"), rm.get("trace_max")
        if _finite(lb) and _finite(lm) and lb != lm:
            m.add("BestVsMitContextSentence",
                  rf"Ours (Best) attends over up to {fmt(lb, 0)} tokens per forward and StreamingLLM over "
                  rf"{fmt(lm, 0)} (measured, column Max.~$L$; " + _modes_words(rb, rm) + "): they do not see the same amount of context, "
                  r"which confounds any quality or speed difference between them.")
        elif _finite(lb) and _finite(lm):
            m.add("BestVsMitContextSentence",
                  rf"Both attend over at most {fmt(lb, 0)} tokens per forward (measured), so a difference between "
                  r"them is not one of context length.")
        if _finite(ratio["lo"]) and _finite(ratio["hi"]):
            word = ("faster than" if ratio["lo"] > 1 else "slower than" if ratio["hi"] < 1 else
                    "not distinguishable in speed from")
        else:
            word = "nominally " + _cmp_word(ratio["value"] - 1 if _finite(ratio["value"]) else _nan(),
                                            "faster than", "slower than")
        m.add("BestVsMitSpeedWord", word)
    if t1 and {"ours_softlite", "mit_streaming"} <= set(t1["policies"]):
        c = contrast(t1, {"ours_softlite": 1, "mit_streaming": -1})
        m.add("SoftliteVsMitPplWord", _cmp_word(c["value"], "higher", "lower"))
        m.add("SoftliteVsMitPplDiff", _sentence_ci(c))
    if t1 and {"window", "mit_streaming"} <= set(t1["policies"]):
        c = contrast(t1, {"window": 1, "mit_streaming": -1})
        m.add("WindowVsMitPplWord", _cmp_word(c["value"], "higher", "lower"))
        m.add("WindowVsMitPplDiff", _sentence_ci(c))
    if t1 and "ours_eager" not in t1["policies"]:
        m.add("EagerResultClause", "")
        m.add("EagerSlackSentence",
              r"By the schedule alone: with $R=1$ an event happens at an overflow of one token and removes "
              r"$\max(\min(1,\delta),1-\sigma)=1$ token for any $\delta\ge1$, so the cache never exceeds $C+1$ "
              r"and the slack is never used. (The Eager preset is not in this run's configuration.)")
    if t1 and "ours_eager" in t1["policies"]:
        r = t1["policies"]["ours_eager"]
        m.add("EagerResultClause", rf", and Ours (Eager) {fmt(r.get('speedup'))}$\times$ at "
                                   rf"{fmt(r.get('ppl_increase_percent'), 2, True)}\,\%")
        budget, tmax = r.get("budget"), r.get("trace_max")
        m.add("EagerSlack", fmt_knob(r.get("cache_slack")))
        if _finite(budget) and _finite(tmax):
            m.add("EagerSlackSentence",
                  rf"With $R=1$ the measured forward length of Ours (Eager) never exceeded {fmt(tmax, 0)} tokens "
                  rf"($C+{fmt(tmax - budget, 0)}$ with $C={fmt(budget, 0)}$), so its slack "
                  rf"$\sigma={fmt_knob(r.get('cache_slack'))}$ " +
                  ("was never used: each event drops $\\min(\\text{overflow},\\delta)=1$ token, as the schedule "
                   "predicts. ``Ours (Eager)'' is therefore a StreamingLLM cache with more sinks, not a soft-eviction "
                   "policy." if tmax <= budget + 1 else
                   "was used, which Eq.~\\eqref{eq:schedule} does not allow: the implementation departs from the "
                   "schedule."))
    if t1:
        incs = [r.get("ppl_increase_percent") for r in t1["policies"].values() if r.get("type") == "sink"]
        incs = [x for x in incs if _finite(x)]
        if incs:
            m.add("SinkIncMin", fmt(min(incs), 2, True))
            m.add("SinkIncMax", fmt(max(incs), 2, True))
    t2 = aggs.get("table2")
    if t2:
        r_s0_dn = _find_sigma_delta(t2, 0, None)
        r_s16_dn = next((r for r in t2["policies"].values() if r.get("type") == "sink" and (r.get("cache_slack") or 0) > 0
                         and r.get("max_drop") is None), None)
        r_s0_d = next((r for r in t2["policies"].values() if r.get("type") == "sink" and r.get("cache_slack") == 0
                       and r.get("max_drop") is not None), None)
        r_s16_d = next((r for r in t2["policies"].values() if r.get("type") == "sink" and (r.get("cache_slack") or 0) > 0
                        and r.get("max_drop") is not None), None)
        if r_s0_dn and r_s0_d:
            same_nll = (r_s0_dn["per_sample"].get("nll_sha256") == r_s0_d["per_sample"].get("nll_sha256")
                        and None not in (r_s0_dn["per_sample"].get("nll_sha256") or [None]))
            same_trace = (r_s0_dn["per_sample"].get("trace_sha256") == r_s0_d["per_sample"].get("trace_sha256"))
            if same_nll:
                text = (r"At $\sigma=0$ the runs with and without a max-drop cap produced bit-identical per-token "
                        r"NLL files, as the schedule predicts (with $\sigma=0$ an event always removes the whole "
                        r"overflow, so $\delta$ cannot act).")
            else:
                text = (rf"At $\sigma=0$ the runs with and without a max-drop cap differ "
                        rf"({fmt(r_s0_dn['ppl_increase_percent'], 4, True)}\,\% vs "
                        rf"{fmt(r_s0_d['ppl_increase_percent'], 4, True)}\,\%) although with $\sigma=0$ the "
                        r"schedule cannot depend on $\delta$; " +
                        (r"their measured cache-length traces are identical, so the difference is numerical "
                         r"run-to-run variation, not an effect of $\delta$." if same_trace else
                         r"their measured cache-length traces differ too, which points to an implementation "
                         r"that does not follow the schedule."))
            m.add("DeltaAtSigmaZeroSentence", text)
        full = bool(r_s0_dn and r_s16_dn and r_s0_d and r_s16_d)
        m.raw(r"\haveAblation" + ("true" if full else "false"))
        if full:
            w = {r_s16_d["policy"]: 1, r_s16_dn["policy"]: -1, r_s0_d["policy"]: -1, r_s0_dn["policy"]: 1}
            c = contrast(t2, w)
            hashes = {tuple(r["per_sample"].get("nll_sha256") or [None]) for r in (r_s0_dn, r_s16_dn, r_s0_d, r_s16_d)}
            if len(hashes) == 1 and None not in next(iter(hashes)):
                m.add("InteractionSentence",
                      r"All four cells produced bit-identical per-token NLL on every sample, so the effects of slack "
                      r"and max-drop and their interaction are exactly zero in this run.")
            m.add("InteractionValue", fmt(c["value"], 2, True))
            m.add("InteractionCI", _sentence_ci(c))
            ex = _ci_excludes_zero(c)
            m.add("InteractionSentence",
                  r"The interaction contrast $(\Delta_{\sigma,\delta}-\Delta_{\sigma,\infty})-(\Delta_{0,\delta}-\Delta_{0,\infty})$ "
                  rf"of the PPL increase is {_sentence_ci(c)}; " +
                  ("its interval excludes zero." if ex else
                   "its interval includes zero, so these data give no evidence of an interaction between slack and "
                   "max-drop."
                   if ex is False else "with one sample its sign cannot be tested."))
            # main effects (each at the other's baseline)
            cs = contrast(t2, {r_s16_dn["policy"]: 1, r_s0_dn["policy"]: -1})
            cd = contrast(t2, {r_s0_d["policy"]: 1, r_s0_dn["policy"]: -1})
            m.add("SlackEffect", _sentence_ci(cs))
            m.add("DeltaEffectAtSigmaZero", _sentence_ci(cd))
            m.add("AblCombinedInc", fmt(r_s16_d["ppl_increase_percent"], 2, True))
            m.add("AblBaseInc", fmt(r_s0_dn["ppl_increase_percent"], 2, True))
    sw = aggs.get("sweep_compress_every")
    if sw:
        rows = sorted([r for r in sw["policies"].values() if r.get("type") == "sink"],
                      key=lambda r: r.get("compress_every") or 0)
        if len(rows) >= 2:
            lo, hi = rows[0], rows[-1]
            m.add("SweepRLow", fmt_knob(lo["compress_every"]))
            m.add("SweepRHigh", fmt_knob(hi["compress_every"]))
            m.add("SweepRSpeedLow", fmt(lo.get("speedup")))
            m.add("SweepRSpeedHigh", fmt(hi.get("speedup")))
            m.add("SweepRIncLow", fmt(lo.get("ppl_increase_percent"), 2, True))
            m.add("SweepRIncHigh", fmt(hi.get("ppl_increase_percent"), 2, True))
            m.add("SweepRMaxLenHigh", fmt(hi.get("trace_max"), 0))
            word = _cmp_word((hi.get("speedup") or _nan()) - (lo.get("speedup") or _nan()), "higher", "lower")
            a, b = lo.get("speedup"), hi.get("speedup")
            noise = getattr(m, "noise_factor", None)
            if noise and _finite(a) and _finite(b) and min(a, b) > 0 and max(a, b) / min(a, b) < noise:
                word += rf"; a change smaller than the timing noise measured below, factor {fmt(noise, 2)}"
            m.add("SweepRSpeedWord", word)


# -------------------------------------------------------------------------------------- file I/O
def load_aggregates(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    out = {}
    for p in paths:
        agg = read_aggregate(p)
        out[agg.get("experiment") or Path(p).stem] = agg
    return out


def write_tables(aggs: Mapping[str, Mapping], out_dir: str | os.PathLike, config: Mapping | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    for exp, agg in aggs.items():
        p = out_dir / f"{exp}.tex"
        _atomic_write(p, experiment_table(agg, exp))
        written.append(p)
    p = out_dir / "reproduction.tex"
    _atomic_write(p, reproduction_table(aggs))
    written.append(p)
    p = out_dir / "setup.tex"
    _atomic_write(p, setup_table(aggs, config))
    written.append(p)
    return written


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


# ------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="pool the cells of one experiment (CSV + JSON)")
    p.add_argument("cells", nargs="+", help="cell JSON files (their .nll.npy beside them)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--policies", nargs="*", help="policy order (default: all found, sorted)")
    p.add_argument("--reference", default="recompute")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--speed", help="the dataset's `kvstream speed` JSON (TPOT and speedup come from it)")
    p.add_argument("--json", required=True)
    p.add_argument("--csv")
    p.set_defaults(func=_cmd_aggregate)

    p = subparsers.add_parser("tables", help="LaTeX tables (booktabs) from aggregate JSONs")
    p.add_argument("aggregates", nargs="+")
    p.add_argument("--config")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_tables)

    p = subparsers.add_parser("macros", help="paper/generated/macros.tex from aggregate JSONs")
    p.add_argument("aggregates", nargs="+")
    p.add_argument("--config")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_macros)

    p = subparsers.add_parser("figures", help="figures (PDF + PNG) from aggregates and cells")
    p.add_argument("--aggregates", nargs="+", required=True)
    p.add_argument("--cells", nargs="*", default=[])
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_figures)


def _cmd_aggregate(args) -> int:
    agg = aggregate(args.cells, experiment=args.experiment, policies=args.policies, reference=args.reference,
                    n_boot=args.n_boot, seed=args.seed, speed=args.speed)
    write_aggregate(agg, args.json, args.csv)
    return 0


def _cmd_tables(args) -> int:
    write_tables(load_aggregates(args.aggregates), args.out_dir, _load_config(args.config))
    return 0


def _cmd_macros(args) -> int:
    _atomic_write(args.out, macros_tex(load_aggregates(args.aggregates), _load_config(args.config)))
    return 0


def _cmd_figures(args) -> int:
    from kvstream import figures

    figures.all_figures(load_aggregates(args.aggregates), args.cells, args.out_dir)
    return 0

"""Pooled perplexity and its intervals: percentile bootstrap across samples, paired per target.

docs/method.md, "Metrics": pooled PPL = exp(total NLL / total targets); the PPL increase pairs every
target with the reference's on the same sample; 95 % percentile-bootstrap intervals resample samples with
replacement, seeded, the same resamples for every policy (so contrasts between policies are paired).
With a single sample there is no interval: the bounds are NaN.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kvstream.errors import KVStreamError
from kvstream.study.inputs import cell_nll

CI_LEVEL = 0.95
DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0


def nan() -> float:
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
        return nan(), nan()
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


def with_ci(row: dict, name: str, point: float, boot: np.ndarray | None) -> None:
    """row[name] = point and row[name_lo], row[name_hi] = the percentile interval of boot (NaN without)."""
    row[name] = float(point)
    if boot is None:
        row[f"{name}_lo"], row[f"{name}_hi"] = nan(), nan()
    else:
        row[f"{name}_lo"], row[f"{name}_hi"] = percentile_ci(boot)


class PairedTargets:
    """Each policy's per-target NLL paired with the reference's, on the targets both scored.

    With `recompute_every` k > 1 the reference scores every k-th decode target only; the PPL increase
    is then exp(mean paired NLL difference) - 1 on that subsample, and each bootstrap resample also
    resamples the paired targets within each drawn sample, so the interval carries the subsample's
    sampling error (docs/method.md, "Metrics").
    """

    def __init__(self, ref_cells: Mapping[str, dict], samples: Sequence[str], idx: np.ndarray | None, seed: int):
        self.samples, self.idx, self.seed = list(samples), idx, seed
        self.ref = [cell_nll(ref_cells[s]) for s in samples]
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
            x = cell_nll(cells[s])
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
            point = 100 * (math.exp(sums.sum() / cnt.sum()) - 1) if cnt.sum() else nan()
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


def contrast(agg: Mapping, weights: Mapping[str, float], metric: str = "ppl_increase_percent",
             n_boot: int | None = None, seed: int | None = None) -> dict:
    """A linear contrast sum_p w_p * metric_p between policies of one experiment, with a paired
    bootstrap interval (the same resampled samples for every policy; needs the per-sample values).
    metric: ppl_increase_percent or decode_ppl_increase_percent (vs the reference, from the paired
    per-sample sums). Speed contrasts come from the speed run's rounds (`claims.speed_ratio`), not from
    samples."""
    rows = agg["policies"]
    ref = agg.get("reference")
    if ref is None or ref not in rows:
        return {"value": nan(), "lo": nan(), "hi": nan(), "n_samples": 0}
    n = int(agg["n_samples"])
    n_boot = n_boot if n_boot is not None else (agg.get("n_boot") or DEFAULT_N_BOOT)
    seed = seed if seed is not None else agg.get("seed", DEFAULT_SEED)
    idx = bootstrap_indices(n, n_boot, seed)

    def value(pol, ix):
        if metric in ("ppl_increase_percent", "decode_ppl_increase_percent"):
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
        lo = hi = nan()
    else:
        boot = sum(w * value(p, idx) for p, w in weights.items())
        lo, hi = percentile_ci(boot)
    return {"value": point, "lo": lo, "hi": hi, "n_samples": n}

"""Intervals across the rounds of a speed run (torch-free; used by `kvstream speed` and the aggregate).

A speed run times every policy in R interleaved rounds; machine noise that drifts over time hits all
policies of a round alike, so ratios are formed per round and their logs averaged. The interval is
a Student-t interval on the per-round log ratios (docs/method.md, "Speed").
"""

from __future__ import annotations

import math
from typing import Sequence

# two-sided 97.5 % quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def log_mean_ci(values: Sequence[float]) -> dict:
    """Geometric mean of positive values with a 95 % t-interval on their logs: {estimate, ci95}."""
    logs = [math.log(v) for v in values]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return {"estimate": math.exp(mean), "ci95": [float("nan"), float("nan")]}
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"estimate": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)]}


def ratio_ci(numerator_rounds: Sequence[float], denominator_rounds: Sequence[float]) -> dict:
    """Ratio of two policies' mean step times: the point estimate is the ratio of the means over all
    rounds (the amortised costs); the interval comes from the per-round ratios."""
    if len(numerator_rounds) != len(denominator_rounds) or not numerator_rounds:
        raise ValueError("ratio_ci needs the same number (>= 1) of rounds on both sides")
    estimate = (sum(numerator_rounds) / len(numerator_rounds)) / (sum(denominator_rounds) / len(denominator_rounds))
    per_round = [a / b for a, b in zip(numerator_rounds, denominator_rounds)]
    return {"estimate": estimate, "ci95": log_mean_ci(per_round)["ci95"]}

"""Which experiment and which policy play which part in the paper: read from the config, never from names.

- An experiment's role (config `experiments.<name>.role`: main | ablation | sweep | peak_matched | sanity
  | zoo | other) and a sweep's knob (`experiments.<name>.knob`) are stored in its aggregate by `aggregate`;
  an aggregate without them (written before roles existed) is an `other` experiment, and a sweep
  without a knob sweeps the one sink knob that varies.
- The top-level `paper:` block names the StreamingLLM preset the claims compare against (`baseline`),
  the R = 1 preset (`eager`), the lazy presets (`presets`), display names (`labels`) and macro stems
  (`stems`). Every key is optional: without a label a policy is shown by its name, without a stem its
  macros use the CamelCase of its name (`latex.macro_stem`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from kvstream.schedule import SCORED_TYPES
from kvstream.study.latex import macro_stem

ROLES = ("main", "ablation", "sweep", "peak_matched", "sanity", "zoo", "factorial", "other")
# A policy kind's display name (docs/method.md, "Sequence and policies" and "Score-based kinds"), in the
# order the zoo's tables and figures list them.
KIND_NAMES = {"recompute": "Full recomputation", "dense": "Dense (no eviction)", "sink": "Sink (StreamingLLM)",
              "window": "Window (no sinks)", "h2o": "H2O", "tova": "TOVA", "knorm": "Key-norm", "random": "Random"}
# The sink knobs a sweep may vary, in the order a sweep without a configured knob is searched.
SWEEPABLE = ("compress_every", "cache_slack", "max_drop", "n_sink", "window_size")


def role(agg: Mapping) -> str:
    """The experiment's role; `other` when the aggregate has none."""
    r = agg.get("role")
    return r if r in ROLES else "other"


def with_role(aggs: Mapping[str, Mapping], wanted: str) -> list[str]:
    """The experiments of that role, in the given order."""
    return [e for e, a in aggs.items() if role(a) == wanted]


def first_with_role(aggs: Mapping[str, Mapping], wanted: str) -> Mapping | None:
    names = with_role(aggs, wanted)
    return aggs[names[0]] if names else None


def main_aggregate(aggs: Mapping[str, Mapping]) -> Mapping | None:
    """The experiment whose role is main, else the first one (the setup macros describe it)."""
    return first_with_role(aggs, "main") or next(iter(aggs.values()), None)


def paper_order(aggs: Mapping[str, Mapping]) -> list[str]:
    """The main experiment(s) first, then the ablation(s), then the others in the given order."""
    first = with_role(aggs, "main") + with_role(aggs, "ablation")
    return first + [e for e in aggs if e not in first]


def experiment_roles(config: Mapping | None) -> dict[str, dict]:
    """experiment -> {"role": ..., "knob": ...} from the config's `experiments` block."""
    out = {}
    for name, exp in ((config or {}).get("experiments") or {}).items():
        exp = exp or {}
        out[name] = {"role": exp.get("role") or "other", "knob": exp.get("knob")}
    return out


def varying_knobs(agg: Mapping) -> list[str]:
    """Sink knobs that take more than one value among an experiment's sink policies."""
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    return [k for k in ("n_sink", "window_size", "compress_every", "cache_slack", "max_drop", "budget_mode")
            if len({str(r.get(k)) for r in rows}) > 1]


def sweep_knob(agg: Mapping) -> str | None:
    """The knob a sweep varies: the configured one (stored in the aggregate), else the one that varies."""
    if agg.get("knob"):
        return agg["knob"]
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    varying = [k for k in SWEEPABLE if len({str(r.get(k)) for r in rows}) > 1]
    return varying[0] if varying else None


@dataclass(frozen=True)
class PaperPolicies:
    """The config's `paper:` block (all keys optional)."""

    baseline: str | None = None
    eager: str | None = None
    presets: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    stems: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping | None) -> "PaperPolicies":
        p = (config or {}).get("paper") or {}
        return cls(baseline=p.get("baseline"), eager=p.get("eager"), presets=tuple(p.get("presets") or ()),
                   labels=dict(p.get("labels") or {}), stems=dict(p.get("stems") or {}))

    def stem(self, policy: str) -> str:
        return macro_stem(policy, self.stems)

    def short_name(self, row: Mapping) -> str:
        """A figure's point label: a preset's (or the eager preset's) stem, else its display name without
        the parenthesis (StreamingLLM, Window), else the policy name."""
        pol = row["policy"]
        if pol in self.stems and (pol in self.presets or pol == self.eager):
            return self.stems[pol]
        label = row.get("label")
        return label.split(" (")[0] if isinstance(label, str) and label else pol


def policy_label(policy: str, params: Mapping[str, Any], label: str | None = None) -> str:
    """A policy's display name: its configured label completed with the knobs that identify it in its
    kind (R of a sink cache, and S where it has neither slack nor max-drop, StreamingLLM's shape; R of a
    score-based kind; W of a window; `cap` in budget mode cap, the peak-matched variant). Without a label
    a score-based kind is named by its kind (`KIND_NAMES`), any other policy by its name."""
    scored = params.get("type") in SCORED_TYPES
    if not label and not scored:
        return policy
    label = label or KIND_NAMES[params["type"]]
    extra = []
    if scored:
        extra.append(f"R={params.get('compress_every')}")
    elif params.get("type") == "sink":
        if not params.get("cache_slack") and params.get("max_drop") is None:
            extra.append(f"S={params.get('n_sink')}")
        extra.append(f"R={params.get('compress_every')}")
    elif params.get("type") == "window":
        extra.append(f"W={params.get('window_size')}")
    if params.get("budget_mode") == "cap":
        extra.append("cap")
    if not extra:
        return label
    extra_text = ", ".join(extra)
    return f"{label[:-1]}, {extra_text})" if label.endswith(")") else f"{label} ({extra_text})"


def ablation_cell(agg: Mapping | None, sigma: int, delta: int | None, compress_every: int | None = None):
    """The ablation's sink policy with exactly this slack and max-drop (None: no cap)."""
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


def ablation_corner(agg: Mapping | None, slack: bool, capped: bool):
    """The ablation's sink policy with sigma > 0 (or = 0) and a finite (or no) delta, whatever their values."""
    if not agg:
        return None
    for r in agg["policies"].values():
        if r.get("type") == "sink" and bool(r.get("cache_slack")) == slack and (r.get("max_drop") is not None) == capped:
            return r
    return None

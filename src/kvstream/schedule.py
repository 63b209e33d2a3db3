"""Policies and their eviction schedule, as pure functions (no model, no torch).

docs/method.md, "The `sink` schedule": after each forward the cache holds L tokens (the new one included),
overflow = L - C with budget C = S + W. An eviction event happens when overflow >= R and removes
n = max(min(overflow, delta), L - (C + sigma)) tokens, the oldest non-sink ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kvstream import defects as defect_switches
from kvstream.errors import KVStreamError

# score-based kinds: the sink schedule, and a rule for which non-sink tokens an event removes (kvstream.eviction)
SCORED_TYPES = ("h2o", "tova", "knorm", "random")
POLICY_TYPES = ("recompute", "dense", "window", "sink") + SCORED_TYPES
SCORED_FIELDS = ("recent", "seed")  # fields only the scored kinds use
BUDGET_MODES = ("fixed", "cap")
POSITION_MODES = ("relative", "absolute")
DERIVED_KEYS = ("budget", "max_forward_len")  # written beside the fields in policy blocks, never inputs


@dataclass(frozen=True)
class Policy:
    """One cache policy with all its knobs (names as in the original command line).

    type: recompute | dense | window | sink
    n_sink (S), window_size (W), compress_every (R), cache_slack (sigma), max_drop (delta, None = no cap),
    budget_mode: fixed (C = S + W) or cap (W derived so that no forward sees more than `cap` tokens),
    cap: the recompute window and the peak length in budget mode cap; positions: relative | absolute.
    """

    type: str
    n_sink: int = 4  # StreamingLLM's default; 0 for every type but sink (resolved())
    window_size: int | None = None
    compress_every: int = 1
    cache_slack: int = 0
    max_drop: int | None = None
    budget_mode: str = "fixed"
    cap: int | None = None
    positions: str = "relative"
    recent: int = 0  # scored kinds: the newest tokens no event may remove (H2O's recent window)
    seed: int = 0  # random: the seed of its choices
    defects: tuple[str, ...] = ()  # the original's defects switched on (kvstream.defects); () = the clean method

    # --- derived quantities -------------------------------------------------------------------
    @property
    def evicts(self) -> bool:
        return self.type in ("window", "sink") + SCORED_TYPES

    @property
    def scored(self) -> bool:
        """A kind that chooses which tokens go (not the oldest): kvstream.eviction."""
        return self.type in SCORED_TYPES

    @property
    def budget(self) -> int | None:
        """C = S + W for window/sink; None for policies without eviction."""
        if not self.evicts:
            return None
        if "slack_window" in self.defects:  # DEFECT switch: the original's slack runs had W - sigma
            return self.n_sink + self.window_size - self.cache_slack
        return self.n_sink + self.window_size

    @property
    def max_forward_len(self) -> int | None:
        """The most tokens any decode forward attends over: C + max(R, sigma + 1), or cap for recompute."""
        if self.type == "recompute":
            return self.cap
        if not self.evicts:
            return None
        return self.budget + max(self.compress_every, self.cache_slack + 1)

    def prefill_len(self, n_tokens: int) -> int:
        """P: tokens fed in the prefill forward (docs/method.md: min(C, N) or min(cap, N))."""
        limit = self.budget if self.evicts else self.cap
        return min(limit, n_tokens)

    @property
    def kept_overflow(self) -> int | None:
        """r: the overflow an event leaves in the steady state (docs/method.md, "The `sink` schedule"): an event
        at overflow R removes max(min(R, delta), R - sigma), leaving r = min(sigma, max(R - delta, 0)) (delta
        None: 0). sigma and delta act only through r. One exception: delta = 0 with sigma >= R removes nothing
        at overflow R; the cache then grows to C + sigma + 1 and every step removes one token (r = sigma).
        None for policies without eviction."""
        if not self.evicts:
            return None
        R, sigma, delta = self.compress_every, self.cache_slack, self.max_drop
        if delta == 0 and sigma >= R:
            return sigma
        return 0 if delta is None else min(sigma, max(R - delta, 0))

    @property
    def band(self) -> tuple[int, int] | None:
        """(C + r, C + R): the cache's steady-state saw-tooth, from the length an event leaves to the largest
        forward (decode forwards attend over C + r + 1 .. C + R tokens); (C + sigma, C + sigma + 1) in the
        exception of kept_overflow. None for policies without eviction."""
        if not self.evicts:
            return None
        r = self.kept_overflow
        return self.budget + r, self.budget + max(self.compress_every, r + 1)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.scored:  # fields of the scored kinds only (earlier cells' policy blocks unchanged)
            for key in SCORED_FIELDS:
                d.pop(key)
        if self.defects:  # a clean policy's block is as before the switches existed
            d["defects"] = list(self.defects)
        else:
            d.pop("defects")
        d["budget"] = self.budget
        d["max_forward_len"] = self.max_forward_len
        return d

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, *, strict: bool = False, name=None) -> "Policy":
        """A resolved Policy from a dict of its fields (a config entry, a cell's or a speed run's policy
        block); the derived keys budget and max_forward_len may be present and must then agree. strict: a
        field the type does not use (or derives) given at another value than the resolved one is refused
        (refuse_unused), so that no knob is silently dropped; name(field) says how the error names it."""
        if not isinstance(d, dict):
            raise KVStreamError(f"expected an object of policy fields, got {type(d).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields and key not in DERIVED_KEYS:
                raise KVStreamError(f"unknown key {key!r}: use {', '.join(fields)} (or the derived {', '.join(DERIVED_KEYS)})")
        if "type" not in d:
            raise KVStreamError("key 'type' is required")
        policy = cls(**{k: v for k, v in d.items() if k in fields}).resolved()
        for key in DERIVED_KEYS:
            # A policy without eviction has no budget; the workflow writes recompute's as its cap.
            allowed = (getattr(policy, key),) + ((None, policy.cap) if not policy.evicts else ())
            if key in d and d[key] not in allowed:
                raise KVStreamError(f"{key}={d[key]!r} differs from the resolved policy's {key}={getattr(policy, key)!r}")
        if strict:
            refuse_unused(d, policy, name or (lambda field: f"{field}={d[field]!r}"))
        return policy

    def resolved(self) -> "Policy":
        """Validate every field and return the policy with derived values filled in.

        window: S = 0, R = 1, no slack, no drop cap. budget_mode cap (docs/method.md, "The `sink`
        schedule"): W = cap - S - max(R, sigma + 1), for window W = cap - 1. A field the type does not use
        is set to its neutral value (cap without budget_mode cap, positions without a cache that evicts,
        recent and seed but for the scored kinds), so a value given for it differs from the resolved
        one (kvstream.cli.eval refuses that). Raises KVStreamError naming the field and the allowed range.
        """
        p = self
        if not isinstance(p.defects, tuple) or p.defects != defect_switches.normalized(p.defects):
            p = dataclasses.replace(p, defects=defect_switches.normalized(p.defects))
        if p.type not in POLICY_TYPES:
            raise KVStreamError(f"policy type {p.type!r} is unknown: use one of {', '.join(POLICY_TYPES)}")
        if p.positions not in POSITION_MODES:
            raise KVStreamError(f"positions {p.positions!r} is unknown: use relative or absolute")
        if p.budget_mode not in BUDGET_MODES:
            raise KVStreamError(f"budget_mode {p.budget_mode!r} is unknown: use fixed or cap")
        _check_int("cap", p.cap, minimum=1, optional=True)
        if p.type in ("recompute", "dense"):
            if p.cap is None:
                raise KVStreamError(f"cap is required for policy type {p.type} (the recompute window / prefill length): set cap >= 1")
            # knobs of the eviction schedule do not apply: record them at their neutral values
            return _check_scored(dataclasses.replace(p, n_sink=0, window_size=None, compress_every=1, cache_slack=0,
                                                     max_drop=None, budget_mode="fixed", positions="relative"))
        if p.budget_mode == "fixed":
            p = dataclasses.replace(p, cap=None)  # the peak length of budget_mode cap only
        if p.type == "window":
            if p.budget_mode == "cap":  # S = 0, R = 1, sigma = 0: W = cap - max(1, 0 + 1)
                if p.cap is None or p.cap < 2:
                    raise KVStreamError(f"budget_mode cap needs cap >= 2 for a window policy (W = cap - 1), got cap={p.cap}")
                p = dataclasses.replace(p, window_size=p.cap - 1)
            _check_int("window_size", p.window_size, minimum=1)
            return _check_scored(dataclasses.replace(p, n_sink=0, compress_every=1, cache_slack=0, max_drop=None))
        # sink and the scored kinds (the same schedule)
        _check_int("n_sink", p.n_sink, minimum=0)
        _check_int("compress_every", p.compress_every, minimum=1)
        _check_int("cache_slack", p.cache_slack, minimum=0)
        _check_int("max_drop", p.max_drop, minimum=0, optional=True)
        if p.budget_mode == "cap":
            if p.cap is None:
                raise KVStreamError("cap is required with budget_mode cap: set cap (the largest forward length)")
            extra = max(p.compress_every, p.cache_slack + 1)
            window = p.cap - p.n_sink - extra
            if window < 1:
                raise KVStreamError(
                    f"cap={p.cap} is too small for n_sink={p.n_sink} + max(compress_every, cache_slack + 1)={extra}: "
                    f"budget_mode cap needs cap >= {p.n_sink + extra + 1}"
                )
            return _check_scored(dataclasses.replace(p, window_size=window))
        if p.window_size is None:
            raise KVStreamError(f"window_size is required for a {p.type} policy with budget_mode fixed: set window_size >= 1")
        _check_int("window_size", p.window_size, minimum=1)
        return _check_scored(p)


def unused_knob(given: dict, policy: Policy) -> tuple[str, str] | None:
    """(field, why) of the first field given with another value than the resolved policy holds: one the
    type does not use (or derives). Given at that value it changes nothing and is accepted (the pipeline
    passes every field of the resolved policy). None when there is none."""
    resolved = dataclasses.asdict(policy)
    for field, value in given.items():
        if field == "defects":
            value = defect_switches.normalized(value)  # JSON gives a list, in any order
        if field in DERIVED_KEYS or field == "type" or resolved.get(field) == value:
            continue
        if field == "window_size" and policy.budget_mode == "cap":
            return field, f"budget_mode cap derives window_size from cap (here {policy.window_size})"
        return field, f"a {policy.type} policy does not use {field} (it holds {resolved.get(field)!r})"
    return None


def refuse_unused(given: dict, policy: Policy, name) -> None:
    """Refuse a knob the policy does not use (unused_knob), so that none is silently dropped; name(field):
    how the error names it."""
    unused = unused_knob(given, policy)
    if unused:
        raise KVStreamError(f"{name(unused[0])}: {unused[1]}: leave it out")


def _check_scored(p: Policy) -> Policy:
    """recent and seed: checked for the scored kinds, neutral (0) for sink; the defect switches checked."""
    defect_switches.check(p)
    if not p.scored:
        return dataclasses.replace(p, recent=0, seed=0)
    _check_int("recent", p.recent, minimum=0)
    _check_int("seed", p.seed, minimum=0)
    if p.recent > p.window_size:
        raise KVStreamError(f"recent={p.recent} exceeds window_size={p.window_size}: an event could find nothing to "
                            "remove; use recent <= window_size")
    return p


def _check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    if value is None:
        if optional:
            return
        raise KVStreamError(f"{name} is required: set an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVStreamError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise KVStreamError(f"{name} must be an integer >= {minimum}, got {value}")


def eviction_size(length: int, budget: int, compress_every: int, cache_slack: int, max_drop: int | None) -> int:
    """Tokens one event removes when the cache holds `length` tokens after a forward (0 = no event)."""
    overflow = length - budget
    if overflow <= 0 or overflow < compress_every:
        return 0
    capped = overflow if max_drop is None else min(overflow, max_drop)
    return max(capped, length - (budget + cache_slack))


def cache_lengths(policy: Policy, n_tokens: int) -> list[int]:
    """Tokens each decode forward attends over (the new token included), one int per decode step.

    Decode feeds x_P .. x_{N-2} (P = prefill length), so there are N - 1 - P steps.
    """
    policy = policy.resolved()
    prefill = policy.prefill_len(n_tokens)
    steps = max(n_tokens - 1 - prefill, 0)
    if policy.type == "recompute":
        return [min(t + 1, policy.cap) for t in range(prefill, prefill + steps)]
    if policy.type == "dense":
        return [t + 1 for t in range(prefill, prefill + steps)]
    lengths = []
    length = _start_length(policy, prefill)  # after the prefill forward (P <= C: never an event)
    for _ in range(steps):
        length -= eviction_size(length, policy.budget, policy.compress_every, policy.cache_slack, policy.max_drop)
        length += 1
        lengths.append(length)
    return lengths


def _start_length(policy: Policy, prefill: int) -> int:
    """Tokens held when decode starts: the prefill, plus the boundary token fed again (DEFECT switch)."""
    return prefill + 1 if "boundary_twice" in policy.defects else prefill


def eviction_events(policy: Policy, n_tokens: int) -> list[tuple[int, int]]:
    """(decode step, tokens removed) for every event, in order; the event before step i's forward."""
    policy = policy.resolved()
    if not policy.evicts:
        return []
    lengths = cache_lengths(policy, n_tokens)
    events = []
    previous = _start_length(policy, policy.prefill_len(n_tokens))
    for step, length in enumerate(lengths):
        removed = previous + 1 - length
        if removed:
            events.append((step, removed))
        previous = length
    return events


# --- the steady state (what speed and bench time) ---------------------------------------------


@dataclass(frozen=True)
class Schedule:
    transient: int  # decode steps after the prefill before the periodic part starts
    period: int
    events_per_period: int
    lengths: tuple[int, ...]  # forward lengths over one period, from the cycle's start


def steady_schedule(policy: Policy) -> Schedule:
    """The steady-state period of a policy's cache-length sequence (period 1 without eviction)."""
    policy = policy.resolved()
    if not policy.evicts:
        return Schedule(0, 1, 0, (policy.cap,))
    # The next length depends only on the current one (prefill included: decode step i goes from
    # seq[i] to seq[i + 1]) and never exceeds max_forward_len, so seq is periodic within
    # max_forward_len + 1 steps: the first repeated length closes the cycle, and the distance back
    # to its first occurrence is the smallest period. Steps from the cycle's start on repeat both
    # their lengths and their events (an event: a length other than the previous one + 1).
    seq = [policy.budget] + cache_lengths(policy, policy.budget + 1 + 2 * (policy.max_forward_len + 1))
    first: dict[int, int] = {}
    for i, length in enumerate(seq):
        if length in first:
            start = first[length]
            states = seq[start:i]
            events = sum(states[j] + 1 != states[(j + 1) % len(states)] for j in range(len(states)))
            return Schedule(start, len(states), events, tuple(seq[start + 1 : i + 1]))
        first[length] = i
    raise RuntimeError("internal error: no period found in the schedule")


def timed_window(schedule: Schedule, min_steps: int, min_events: int) -> int:
    """Smallest whole number of periods with >= min_steps steps and >= min_events events (if it evicts)."""
    periods = math.ceil(min_steps / schedule.period)
    if schedule.events_per_period:
        periods = max(periods, math.ceil(min_events / schedule.events_per_period))
    return periods * schedule.period

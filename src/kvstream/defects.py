"""Switches that reproduce the original implementation's defects, one at a time (docs/method.md, "Defect
switches"). Torch-free: the registry is the one source of each switch's name, description and where it applies.

A policy turns switches on with its `defects` field (kvstream.schedule.Policy; empty by default: the clean
method). Where the mechanics live:

- `fp16_rerotation` (kvstream.cache, kvstream.rope): at every eviction event the window keys are rotated
  back by the number of evicted tokens, in float16 arithmetic, so the window always starts at S and each key
  is rounded once per event it lives through (the clean cache rotates a key at most about once, in float64).
- `boundary_twice` (kvstream.decode, kvstream.schedule.cache_lengths): the last prefill token is fed again
  as the first decode token, so it sits in the cache twice and every later cache length is one larger.
- `positions_past_trained` (kvstream.cache): every key after the sinks, and the query, sit M - C positions
  further on (M: the model's max_position_embeddings, C: the budget), so a full cache ends at M - 1 and a
  forward over more than C tokens reaches past the trained context, as the original's cap of 2048 did on
  Pythia (trained on 2048); distances inside the window are unchanged.
- `slack_window` (kvstream.schedule.Policy.budget): the window shrinks by the slack, W' = W - sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvstream.errors import KVStreamError

FIELD = "defects"


@dataclass(frozen=True)
class Defect:
    name: str
    label: str  # a few words for tables and prose
    description: str  # one line: what the original did
    why_not: Callable  # policy -> None when the switch applies to it, else the reason it does not


def _relative_cache(kinds: tuple[str, ...]) -> Callable:
    def why_not(p) -> str | None:
        if p.type not in kinds:
            return f"it applies to {' and '.join(kinds)} policies, not {p.type}"
        if p.positions != "relative":
            return "it applies to cache-relative positions (positions: relative) only"
        return None
    return why_not


def _window_kinds(p) -> str | None:
    return None if p.type in ("sink", "window") else f"it applies to sink and window policies, not {p.type}"


def _past_trained(p) -> str | None:
    reason = _relative_cache(("sink",))(p)
    if reason is None and p.n_sink == 0:
        return "it moves the window away from the sinks, and n_sink=0 has none"
    return reason


def _slack_window(p) -> str | None:
    if p.type != "sink":
        return f"it applies to sink policies, not {p.type}"
    if p.cache_slack == 0:
        return "it shrinks the window by cache_slack, which is 0 here, so it would change nothing"
    if p.window_size - p.cache_slack < 1:
        return f"window_size={p.window_size} minus cache_slack={p.cache_slack} leaves no window"
    return None


DEFECTS: dict[str, Defect] = {d.name: d for d in (
    Defect("fp16_rerotation", "keys re-rotated in fp16",
           "at every eviction the window keys are rotated back by the number of evicted tokens in float16",
           _relative_cache(("sink", "window"))),
    Defect("boundary_twice", "boundary token fed twice",
           "the last prefill token is fed again as the first decode token (it sits in the cache twice)",
           _window_kinds),
    Defect("positions_past_trained", "positions past the trained length",
           "positions after the sinks offset so that the budget ends at the model's trained length",
           _past_trained),
    Defect("slack_window", "window reduced by the slack", "the window shrinks by the slack: W' = W - sigma",
           _slack_window),
)}
NAMES = tuple(DEFECTS)


def normalized(value) -> tuple[str, ...]:
    """The `defects` field as a tuple of known names in registry order; KVStreamError naming the field."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise KVStreamError(f"{FIELD} must be a list of switch names ({', '.join(NAMES)}), got {value!r}")
    for name in value:
        if name not in DEFECTS:
            raise KVStreamError(f"{FIELD}: unknown switch {name!r}: use any of {', '.join(NAMES)}")
    if len(set(value)) != len(value):
        raise KVStreamError(f"{FIELD}: a switch is listed twice in {list(value)}")
    return tuple(n for n in NAMES if n in value)


def check(policy) -> None:
    """Refuse a switch that cannot act on the resolved policy, as an unused knob is refused."""
    for name in policy.defects:
        reason = DEFECTS[name].why_not(policy)
        if reason:
            raise KVStreamError(f"{FIELD}: {name!r} does not apply to this {policy.type} policy ({reason}): leave it out")


def has(policy, name: str) -> bool:
    if name not in DEFECTS:
        raise KeyError(name)
    return name in getattr(policy, FIELD, ())


def applicable(policy) -> list[str]:
    """The switches that can act on a (clean) resolved policy, registry order."""
    return [n for n, d in DEFECTS.items() if d.why_not(policy) is None]


def trained_offset(max_position_embeddings: int | None, budget: int) -> int:
    """positions_past_trained: how far the window and the query move so that a full cache of C tokens ends at
    the model's trained length M (M - C)."""
    if not max_position_embeddings:
        raise KVStreamError("defects: positions_past_trained needs the model's max_position_embeddings (its config has none)")
    if max_position_embeddings < budget:
        raise KVStreamError(f"defects: positions_past_trained needs budget C={budget} <= the model's trained length "
                            f"{max_position_embeddings}: use a smaller window_size")
    return max_position_embeddings - budget

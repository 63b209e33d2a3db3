"""`kvstream speed`: each policy's amortised cost per decode token, measured apart from quality.

One process, batch 1. Every entry (a dense floor, then the given policies) keeps its own decode
state across rounds, and rounds are interleaved (round 1: floor, A, B, ...; round 2 in reverse order,
...) so slow machine drift hits every entry alike. A policy's timed window is a whole number of its steady-state
schedule periods with every step timed (eviction steps included), so the window's mean step time is
exactly the amortised cost per token. Ratios carry a 95% interval across rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstream.errors import KVStreamError
from kvstream.io import json_argument
from kvstream.decode import Decoder, StepTimer
from kvstream.schedule import SCORED_TYPES, Policy, steady_schedule, timed_window
from kvstream.stats import ratio_ci

HELD = "(one token written per step, host state rolled back, as bench's floor)"
TIMED_AS = {"floor": f"dense cache held at floor_len tokens {HELD}",
            "dense": f"dense cache held at its steady length = cap {HELD}",
            "recompute": "a fresh forward over the last cap tokens per step (use_cache=False, logits_to_keep=1)",
            "window": "streaming cache, whole schedule periods", "sink": "streaming cache, whole schedule periods",
            **{kind: "scored streaming cache (eager), whole schedule periods, scoring included" for kind in SCORED_TYPES}}


# --- policies and their schedule (no model) -----------------------------------------------------


def load_policies(spec: str) -> dict[str, Policy]:
    """name -> resolved Policy from a JSON file or a literal JSON object."""
    raw = json_argument(spec, "--policies")
    if not isinstance(raw, dict) or not raw:
        raise KVStreamError("--policies: expected a non-empty JSON object name -> policy fields")
    policies = {}
    for name, d in raw.items():
        try:
            policies[name] = p = Policy.from_dict(d, strict=True)
            if p.type == "dense" and p.cap < 2:
                raise KVStreamError("cap must be >= 2 for a dense cache held at cap")
        except KVStreamError as exc:
            raise KVStreamError(f"--policies: policy {name!r}: {exc}") from None
    return policies


# --- timed entries ------------------------------------------------------------------------------


class Entry:
    """One timed entry with its own decode state, kept across rounds."""

    def __init__(self, name: str, policy: Policy, kind: str, *, min_steps: int, min_events: int,
                 steady_steps: int | None = None, warmup_periods: int = 1):
        self.name, self.policy, self.kind = name, policy, kind
        self.schedule = s = steady_schedule(policy)
        steps = min_steps if policy.evicts else (steady_steps or min_steps)
        self.window = timed_window(s, steps, min_events)
        self.warmup_steps = s.transient + warmup_periods * s.period  # timing then starts at the cycle's start
        # the first token a decode step feeds: after the prefill (dense: cap - 1 held) or the recompute history
        self.first_step = policy.cap - 1 if policy.type in ("dense", "recompute") else policy.budget
        self.step_ms, self.round_ms, self.lengths = [], [], []
        self.events = self.rebases = 0

    def start(self, model, ids: torch.Tensor, graph: bool) -> None:
        """Prefill, then the transient and the warm-up periods untimed."""
        p = self.policy
        try:
            # dense: cap - 1 tokens held and rolled back after each step, so every forward attends cap
            self.decoder = Decoder(model, p, ids[None], start=0 if p.type != "recompute" else self.first_step,
                                   reserve=p.cap if p.type == "dense" else None, static=graph, graph=True,
                                   hold=p.type == "dense")
            if p.type != "recompute":
                self.decoder.prefill(self.first_step)
            self.run(self.warmup_steps)  # the first static step captures its graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: never fall back to mixed modes
            if not graph or isinstance(exc, KVStreamError):
                raise
            raise KVStreamError(f"--execution graph: entry {self.name!r} ({p.type}) could not be captured as a "
                                f"CUDA graph ({exc}); use --execution eager") from None

    def run(self, n: int, clock=None) -> None:
        """n decode steps; timed (planning + maintenance + forward) when a StepTimer is given."""
        before = self.decoder.counters()
        lengths = []
        for _ in range(n):
            self.decoder.step(clock)
            lengths.append(self.decoder.length)
        if clock is None:
            return
        # A window starts at the cycle's start and spans whole periods: the cache must follow the schedule.
        if lengths != list(self.schedule.lengths) * (n // self.schedule.period):
            raise RuntimeError(f"internal error: {self.name}: the cache's lengths differ from the schedule")
        self.lengths += lengths
        events, rebases = self.decoder.counters()
        self.events, self.rebases = self.events + events - before[0], self.rebases + rebases - before[1]

    def summary(self, reference: "Entry", floor: "Entry") -> dict:
        ms = np.asarray(self.step_ms)
        s = self.schedule
        return {
            "policy": self.policy.as_dict(), "timed_as": TIMED_AS[self.kind],
            "period": s.period, "transient": s.transient, "events_per_period": s.events_per_period,
            "warmup_steps": self.warmup_steps, "window_steps": self.window, "steps": int(len(ms)),
            "events": self.events, "rebases": self.rebases, "mean_forward_len": float(np.mean(self.lengths)),
            "mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90)),
            "round_mean_ms": self.round_ms,
            "ratio_to_reference": self._ratio(reference), "ratio_to_floor": self._ratio(floor),
        }

    def _ratio(self, other: "Entry") -> dict:
        if other is self:
            return {"estimate": 1.0, "ci95": [1.0, 1.0]}
        return ratio_ci(self.round_ms, other.round_ms)


def run_speed(model, entries: list[Entry], ids: torch.Tensor, rounds: int, graph: bool) -> None:
    from kvstream.graphs import decode_context

    device = ids.device
    with torch.inference_mode(), decode_context(device, static=graph):
        for entry in entries:
            entry.start(model, ids, graph)
        for r in range(rounds):
            # Every other round in reverse order (A B C, C B A, ...): a linear drift of the machine's
            # speed then falls alike on every entry (fully so over an even number of rounds).
            for entry in entries if r % 2 == 0 else entries[::-1]:
                clock = StepTimer(device)
                entry.run(entry.window, clock)
                ms = clock.milliseconds()
                entry.step_ms += ms
                entry.round_ms.append(float(np.mean(ms)))


# --- output and command line --------------------------------------------------------------------


def format_table(result: dict) -> str:
    head = (f"kvstream speed: {result['model']} on {result['device_name']} ({result['device']}, {result['dtype']}, "
            f"{result['threads']} threads), {result['execution']}, {result['rounds']} interleaved rounds, "
            f"reference {result['reference']}, floor = dense held at {result['floor_len']} tokens")
    lines = [head, "", "| policy | mean ms | median ms | p10-p90 ms | ratio to reference [95% CI] | "
                       "ratio to floor [95% CI] | steps | events | execution |", "|---|---|---|---|---|---|---|---|---|"]

    def r(x):
        return f"{x['estimate']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"

    for name, e in [(f"floor (dense@{result['floor_len']})", result["floor"]), *result["policies"].items()]:
        lines.append(f"| {name} | {e['mean_ms']:.3f} | {e['median_ms']:.3f} | {e['p10_ms']:.3f}-{e['p90_ms']:.3f} | "
                     f"{r(e['ratio_to_reference'])} | {r(e['ratio_to_floor'])} | {e['steps']} | {e['events']} | "
                     f"{result['execution']} |")
    lines += ["", "Mean over whole schedule periods, every step timed (= amortised cost per token). "
                  "Dense policies are timed at their steady length = cap."]
    return "\n".join(lines)

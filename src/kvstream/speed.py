"""`kvstream speed`: each policy's amortised cost per decode token, measured apart from quality.

One process, batch 1. Every entry (a dense floor, then the given policies) keeps its own decode
state across rounds, and rounds are interleaved (round 1: floor, A, B, ...; round 2 in reverse order,
...) so slow machine drift hits every entry alike. A policy's timed window is a whole number of its steady-state
schedule periods with every step timed (eviction steps included), so the window's mean step time is
exactly the amortised cost per token. Ratios carry a 95% interval across rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths
from kvstream.stats import ratio_ci

HELD = "(one token written per step, host state rolled back, as bench's floor)"
TIMED_AS = {"floor": f"dense cache held at floor_len tokens {HELD}",
            "dense": f"dense cache held at its steady length = cap {HELD}",
            "recompute": "a fresh forward over the last cap tokens per step (use_cache=False, logits_to_keep=1)",
            "window": "streaming cache, whole schedule periods", "sink": "streaming cache, whole schedule periods"}


# --- policies and their schedule (no model) -----------------------------------------------------


def load_policies(spec: str) -> dict[str, Policy]:
    """name -> resolved Policy from a JSON file or a literal JSON object."""
    literal = spec.strip().startswith("{")
    if not literal and not Path(spec).is_file():
        raise KVStreamError(f"--policies {spec}: neither a JSON object nor an existing file")
    try:
        raw = json.loads(spec if literal else Path(spec).read_text())
    except json.JSONDecodeError as exc:
        raise KVStreamError(f"--policies: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise KVStreamError("--policies: expected a non-empty JSON object name -> policy fields")
    policies = {}
    for name, d in raw.items():
        try:
            policies[name] = p = Policy.from_dict(d)
            if p.type == "dense" and p.cap < 2:
                raise KVStreamError("cap must be >= 2 for a dense cache held at cap")
        except KVStreamError as exc:
            raise KVStreamError(f"--policies: policy {name!r}: {exc}") from None
    return policies


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


# --- timed entries ------------------------------------------------------------------------------


class GraphRecompute:
    """The fixed-size fresh forward of recompute, replayed from a CUDA graph."""

    def __init__(self, model, cap: int, device: torch.device):
        self.model, self.ids = model, torch.zeros(1, cap, dtype=torch.long, device=device)
        self.positions = torch.arange(cap, device=device)[None]
        from kvstream.graphs import capture

        self.graph, _ = capture(self._forward)

    def _forward(self):
        return self.model(self.ids, position_ids=self.positions, use_cache=False, logits_to_keep=1).logits

    def step(self, window: torch.Tensor) -> None:
        self.ids.copy_(window[None])
        self.graph.replay()


class Entry:
    """One timed entry with its own decode state, kept across rounds."""

    def __init__(self, name: str, policy: Policy, kind: str, args: argparse.Namespace):
        self.name, self.policy, self.kind = name, policy, kind
        self.schedule = s = steady_schedule(policy)
        steps = args.min_steps if policy.evicts else (args.steady_steps or args.min_steps)
        self.window = timed_window(s, steps, args.min_events)
        self.warmup_steps = s.transient + args.warmup_periods * s.period  # timing then starts at the cycle's start
        # the first token a decode step feeds: after the prefill (dense: cap - 1 held) or the recompute history
        self.first_step = policy.cap - 1 if policy.type in ("dense", "recompute") else policy.budget
        self.step_ms, self.round_ms, self.lengths = [], [], []
        self.events = self.rebases = 0

    def start(self, model, ids: torch.Tensor, graph: bool) -> None:
        """Prefill, then the transient and the warm-up periods untimed."""
        from kvstream.cache import StreamingCache
        from kvstream.graphs import StaticDecoder

        p, device = self.policy, ids.device
        self.ids, self.t, self.cache, self.decoder = ids, self.first_step, None, None
        try:
            if p.type == "recompute":
                self.decoder = GraphRecompute(model, p.cap, device) if graph else None
            else:  # dense: cap - 1 tokens held, so every step's forward attends exactly cap
                self.cache = StreamingCache(model, p, rebase_at="auto", reserve=p.cap if p.type == "dense" else None)
                model(ids[None, : self.t], cache=self.cache)
                self.decoder = StaticDecoder(model, self.cache, use_graph=True) if graph else None
            self.run(model, self.warmup_steps)  # the first StaticDecoder step captures its graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: never fall back to mixed modes
            if not graph or isinstance(exc, KVStreamError):
                raise
            raise KVStreamError(f"--execution graph: entry {self.name!r} ({p.type}) could not be captured as a "
                                f"CUDA graph ({exc}); use --execution eager") from None

    def run(self, model, n: int, clock=None) -> None:
        """n decode steps; timed (planning + maintenance + forward) when a StepTimer is given."""
        p, cache = self.policy, self.cache
        before = (cache.events, cache.rebases) if cache is not None else (0, 0)
        lengths = []
        for _ in range(n):
            t = self.t
            started = clock.start() if clock else None
            if p.type == "recompute":
                window = self.ids[t + 1 - p.cap : t + 1]
                if self.decoder is not None:
                    self.decoder.step(window)
                else:
                    model(window[None], use_cache=False, logits_to_keep=1)
            elif self.decoder is not None:
                self.decoder.step(self.ids[t : t + 1])
            else:
                model(self.ids[None, t : t + 1], cache=cache)
            if clock:
                clock.stop(started)
            lengths.append(p.cap if cache is None else cache.length)
            if p.type == "dense":  # the next forward again sees cap
                cache.forget_newest()
            self.t += 1
        if clock is None:
            return
        # A window starts at the cycle's start and spans whole periods: the cache must follow the schedule.
        if lengths != list(self.schedule.lengths) * (n // self.schedule.period):
            raise RuntimeError(f"internal error: {self.name}: the cache's lengths differ from the schedule")
        self.lengths += lengths
        if cache is not None:
            self.events, self.rebases = self.events + cache.events - before[0], self.rebases + cache.rebases - before[1]

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
    from kvstream.evaluate import StepTimer
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
                entry.run(model, entry.window, clock)
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("speed", help="amortised time per decode token of several policies, interleaved rounds")
    p.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    p.add_argument("--tokens", required=True, help="1-D .npy of token ids (tiled as needed; content does not affect cost)")
    p.add_argument("--policies", required=True, help="JSON file or literal JSON object: name -> policy fields")
    p.add_argument("--reference", required=True, help="the policy every ratio_to_reference divides by")
    p.add_argument("--out", required=True, help="SPEED.json; the table goes beside it as .md")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 2: the CI is across rounds)")
    p.add_argument("--min-steps", type=int, default=64, help="timed steps per round at least")
    p.add_argument("--min-events", type=int, default=2, help="eviction events per round at least (evicting policies)")
    p.add_argument("--steady-steps", type=int, default=None,
                   help="timed steps per round of entries that never evict (floor, dense, recompute); default --min-steps")
    p.add_argument("--warmup-periods", type=int, default=1, help="untimed whole periods after the prefill (>= 1)")
    p.add_argument("--floor-len", type=int, default=None, help="floor length (default: the largest cap/budget)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--execution", default="auto", choices=("eager", "graph", "auto"),
                   help="eager (= auto): model(ids, cache=...) per step; graph: every entry from a CUDA graph (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.data import atomic_path
    from kvstream.evaluate import _git_state, cpu_name, load_tokens
    from kvstream.models import load_model, resolve_device, resolve_dtype

    # Everything that can be checked without the model is checked first.
    out = Path(args.out)
    if out.suffix != ".json":
        raise KVStreamError(f"--out {out}: must end in .json")
    folder = out.absolute().parent
    while not folder.exists():  # atomic_path creates the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise KVStreamError(f"--out {out}: folder {folder} is not writable")
    policies = load_policies(args.policies)
    if args.reference not in policies:
        raise KVStreamError(f"--reference {args.reference!r} is not a policy name: use one of {', '.join(policies)}")
    for flag, value, low in (("--rounds", args.rounds, 2), ("--min-steps", args.min_steps, 1),
                             ("--min-events", args.min_events, 1), ("--steady-steps", args.steady_steps, 1),
                             ("--warmup-periods", args.warmup_periods, 1), ("--floor-len", args.floor_len, 2),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise KVStreamError(f"{flag} must be >= {low}, got {value}")
    tokens = load_tokens(args.tokens)
    if not len(tokens):
        raise KVStreamError(f"--tokens {args.tokens}: no tokens")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    execution = "eager" if args.execution == "auto" else args.execution
    if execution == "graph" and device.type != "cuda":
        raise KVStreamError(f"--execution graph needs CUDA (CUDA graphs) but the device is {device.type}: "
                            "use --execution eager")
    floor_len = args.floor_len or max(p.cap if p.cap is not None else p.budget for p in policies.values())
    floor = Entry("floor", Policy("dense", cap=floor_len).resolved(), "floor", args)
    entries = [floor] + [Entry(name, p, p.type, args) for name, p in policies.items()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, _ = load_model(args.model, device=device, dtype=dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(tokens.max()) >= vocab:
        raise KVStreamError(f"--tokens {args.tokens}: token id {int(tokens.max())} is out of the model's vocabulary ({vocab})")
    needed = max(e.first_step + e.warmup_steps + args.rounds * e.window for e in entries) + 1
    ids = torch.as_tensor(np.resize(tokens, needed), device=device)  # tiled: content does not affect cost
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run_speed(model, entries, ids, args.rounds, execution == "graph")

    import transformers

    commit, dirty = _git_state()
    reference = entries[1 + list(policies).index(args.reference)]
    result = {
        "kind": "kvstream-speed", "execution": execution, "rounds": args.rounds, "reference": args.reference,
        "floor_len": floor_len, "min_steps": args.min_steps, "min_events": args.min_events,
        "steady_steps": args.steady_steps or args.min_steps,
        "warmup_periods": args.warmup_periods, "model": str(args.model), "tokens_file": str(args.tokens),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "seed": args.seed,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "git_commit": commit, "git_dirty": dirty, "started_at": started_at,
        "note": "mean over whole schedule periods with every step timed = amortised cost per token; "
                "dense policies are timed at their steady length = cap",
        "floor": floor.summary(reference, floor),
        "policies": {e.name: e.summary(reference, floor) for e in entries[1:]},
    }
    table = format_table(result)
    print(table, flush=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table + "\n")
    return 0

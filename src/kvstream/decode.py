"""The decode step: the one place where a policy feeds a token and the model attends over its cache.

`kvstream eval` (quality cells), `kvstream speed` and `kvstream bench` all drive a `Decoder`: a
prefill, then one token per row per step (docs/method.md, "Prefill and the decode loop"). A step
is what the timing measures: eviction planning, cache maintenance and the forward, nothing else.

- `recompute` is a baseline of this loop, not a cache: each step is a fresh forward over the last
  `cap` tokens (use_cache=False, logits_to_keep=1).
- `dense`, `window`, `sink`: a `StreamingCache`; with `static=True` the step has fixed shapes
  (`graphs.StaticDecoder`, replayed from a CUDA graph on a GPU).
- `hold=True` (dense only): the host state is rolled back after each step, so every forward attends
  over the same length: the dense floor that speed and bench compare against.
"""

from __future__ import annotations

import contextlib
import time

import torch

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy


class StepTimer:
    """Per-step wall time of the timed region; CUDA events on a GPU (no host sync inside the loop)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: list[float] = []
        self.events: list[tuple] = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, started):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append((started, e))
        else:
            self.host.append((time.perf_counter() - started) * 1000.0)

    def milliseconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.events]
        return self.host


class PeakMemory:
    """Peak memory during decode: the CUDA allocator's peak, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "process_peak_rss_since_start"

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        import resource

        self.kind = "process_peak_rss_since_start"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GraphRecompute:
    """The fixed-size fresh forward of recompute, replayed from a CUDA graph."""

    def __init__(self, model, cap: int, batch: int, device: torch.device):
        from kvstream.graphs import capture

        self.model, self.ids = model, torch.zeros(batch, cap, dtype=torch.long, device=device)
        self.positions = torch.arange(cap, device=device)[None]
        self.graph, self.logits = capture(self._forward)

    def _forward(self):
        return self.model(self.ids, position_ids=self.positions, use_cache=False, logits_to_keep=1).logits[:, -1]

    def step(self, window: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(window)
        self.graph.replay()
        return self.logits


class Decoder:
    """One policy's decode state over token rows `ids` [batch, n] (on the model's device).

    `prefill(P)` feeds ids[:, :P] in one forward; then each `step()` feeds token t = the next one and
    returns the [batch, V] logits that predict token t + 1. `t` may start anywhere (`start`), e.g.
    speed's recompute starts with a full window of history and no prefill.
    """

    def __init__(self, model, policy: Policy, ids: torch.Tensor, *, start: int = 0, reserve: int | None = None,
                 static: bool = False, graph: bool | None = None, hold: bool = False):
        from kvstream.cache import StreamingCache

        self.model, self.policy, self.ids, self.t = model, policy.resolved(), ids, start
        self.static, self.graph, self.hold = static, graph, hold
        self.cache = self.fixed = None
        if hold and self.policy.type != "dense":
            raise KVStreamError("hold=True is for a dense cache (the floor)")
        if self.policy.scored:
            from kvstream.scored import ScoredCache

            if static:
                raise KVStreamError(f"policy {self.policy.type} runs eagerly only: no fixed-shape / CUDA-graph steps")
            self.cache = ScoredCache(model, self.policy, reserve=reserve)
        elif self.policy.type != "recompute":
            self.cache = StreamingCache(model, self.policy, rebase_at="auto", reserve=reserve)
        elif static:
            self.fixed = GraphRecompute(model, self.policy.cap, ids.shape[0], ids.device)
        self.length = 0  # tokens the last forward attended over

    def prefill(self, length: int):
        """Feed ids[:, t : t + length] in one forward; returns its logits [batch, length, V]."""
        t, self.t = self.t, self.t + length
        with self._scoring():
            logits = self.model(self.ids[:, t : t + length], cache=self.cache, use_cache=self.cache is not None).logits
            if "boundary_twice" in self.policy.defects:  # DEFECT switch: the last prefill token fed again
                self.model(self.ids[:, t + length - 1 : t + length], cache=self.cache)
        if self.static and self.cache is not None:
            from kvstream.graphs import StaticDecoder

            self.fixed = StaticDecoder(self.model, self.cache, use_graph=self.graph)
        return logits

    def skip(self) -> None:
        """Move past a token without feeding it (recompute scored on every k-th target only)."""
        if self.cache is not None:
            raise KVStreamError("only recompute can skip a step: a cache must see every token")
        self.t += 1

    def step(self, clock: StepTimer | None = None) -> torch.Tensor:
        """Feed token t of every row; timed (planning + maintenance + forward) when a clock is given."""
        t, policy, cache = self.t, self.policy, self.cache
        started = clock.start() if clock is not None else None
        if cache is None:
            start = max(0, t + 1 - policy.cap)
            window = self.ids[:, start : t + 1]
            if self.fixed is not None:
                logits = self.fixed.step(window)
            else:
                logits = self.model(window, use_cache=False, logits_to_keep=1).logits[:, -1]
            length = t + 1 - start
        elif self.fixed is not None:
            logits = self.fixed.step(self.ids[:, t])
        else:
            # Planning the eviction is maintenance: it happens inside the step, and the length the
            # forward attended over is read afterwards.
            with self._scoring():
                logits = self.model(self.ids[:, t : t + 1], cache=cache).logits[:, -1]
        if clock is not None:
            clock.stop(started)
        if cache is not None:
            length = cache.length
            if self.hold:  # the next forward again sees the same length
                cache.forget_newest()
        self.length = length
        self.t += 1
        return logits

    def _scoring(self):
        """Attention scores to the cache during a forward (scored kinds that need them), else nothing."""
        if not self.policy.scored:
            return contextlib.nullcontext()
        from kvstream.scored import scoring

        return scoring(self.model, self.cache)

    def counters(self) -> tuple[int, int]:
        """(eviction events, rebases) so far."""
        return (0, 0) if self.cache is None else (self.cache.events, self.cache.rebases)

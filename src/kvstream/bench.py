"""`kvstream bench`: what one decode step costs, cache maintenance included, against a dense floor.

Rows, all timed in one process and interleaved across repeats (so machine noise hits them alike):

- dense@C   the floor: a cache that holds exactly C tokens and is never maintained (each step
            writes one token and the host bookkeeping rolls it back), so every forward sees C.
- sink R=1, R=32, R=64 (S = 4, budget mode cap = C: no forward sees more than C tokens).
- recompute a fresh forward over the last C tokens per step.
- naive R=1, naive R=64: the original implementation's way, for comparison: the cache grows by
            concatenation, an event slices it and re-rotates every kept key in the cache dtype.

Weights are random (timing depends on shapes, not values). Times are per decode step: forward plus
cache maintenance, synchronised (CUDA events on a GPU). Each repeat of a row times a whole number of
that row's steady-state eviction periods (>= the requested steps, >= 2 events; the schedule's
transient and the warm-up untimed) and every step in it, eviction steps included, so the primary
figure, the mean, is the amortised cost per token; median and p10-p90 are extra columns, and
ratio_to_floor is a ratio of means. On a GPU it also measures device memory bandwidth and prints
the bandwidth floor: (weight bytes + KV bytes read per step) / bandwidth.
Results written before this rule (benchmarks/h100/*.json) have medians only: `tpot_ms` reads them.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from kvstream.errors import KVStreamError
from kvstream.decode import Decoder, StepTimer
from kvstream.provenance import device_name
from kvstream.schedule import SCORED_TYPES, Policy, eviction_size, steady_schedule, timed_window
from kvstream.tiny import TINY_ARCHITECTURES

SHAPES = {
    "tiny-llama": ("llama", {**TINY_ARCHITECTURES["llama"], "vocab_size": 256, "max_position_embeddings": 4096}),
    # name: (family, config kwargs)
    "pythia-70m": ("gpt_neox", dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                    intermediate_size=2048, rotary_pct=0.25, vocab_size=50304,
                                    max_position_embeddings=2048, use_parallel_residual=True)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                   rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)),
    "pythia-2.8b": ("gpt_neox", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                                     intermediate_size=10240, rotary_pct=0.25, vocab_size=50304,
                                     max_position_embeddings=2048, use_parallel_residual=True)),
}
N_SINK = 4


def build_model(shape: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    if shape not in SHAPES:
        raise KVStreamError(f"--shape {shape!r} is unknown: use one of {', '.join(SHAPES)}")
    family, kwargs = SHAPES[shape]
    config = (GPTNeoXConfig if family == "gpt_neox" else LlamaConfig)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the naive reference (how the original did it)


class NaiveSinkCache:
    """Grow by torch.cat; an event slices the window and re-rotates every kept key by -n in the cache dtype."""

    def __init__(self, model, n_sink: int, window: int, compress_every: int):
        from transformers import DynamicCache

        from kvstream.rope import Rotary

        self.cache = DynamicCache(config=model.config)
        self.rotary = Rotary.from_model(model)
        self.n_sink, self.budget, self.compress_every = n_sink, n_sink + window, compress_every
        self.events = 0

    def length(self) -> int:
        return self.cache.get_seq_length()

    def evict(self) -> None:
        overflow = eviction_size(self.length(), self.budget, self.compress_every, 0, None)  # all the overflow
        if not overflow:
            return
        self.events += 1
        s = self.n_sink
        if self.rotary.inv_freq.device != self.cache.layers[0].keys.device:
            self.rotary = self.rotary.to(self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            kept_k = layer.keys[:, :, s + overflow :]
            kept_k = self.rotary.rotate(kept_k, -overflow, work=kept_k.dtype)  # in the cache dtype
            layer.keys = torch.cat([layer.keys[:, :, :s], kept_k], dim=-2)
            layer.values = torch.cat([layer.values[:, :, :s], layer.values[:, :, s + overflow :]], dim=-2)


# ------------------------------------------------------------------------------------------------
# one row


class Row:
    def __init__(self, name: str, kind: str, **knobs):
        self.name, self.kind, self.knobs = name, kind, knobs
        self.step_ms: list[float] = []
        self.lengths: list[int] = []
        self.events = 0
        self.warmup = self.window = self.period = 0

    def policy(self, budget: int) -> Policy:
        """The policy whose schedule this row follows (naive: the sink schedule it implements)."""
        if self.kind in ("floor", "recompute"):
            return Policy("dense" if self.kind == "floor" else "recompute", cap=budget)
        r = self.knobs["compress_every"]
        if self.kind == "naive":  # the same peak as the sink rows: W = C - S - R
            return Policy("sink", n_sink=N_SINK, window_size=budget - N_SINK - r, compress_every=r)
        return Policy(self.kind, n_sink=N_SINK, compress_every=r, budget_mode="cap", cap=budget)  # sink, scored

    def plan(self, budget: int, warmup: int, steps: int) -> None:
        """Timed steps per repeat: whole periods, >= steps and >= 2 events; untimed: transient + warmup."""
        schedule = steady_schedule(self.policy(budget))
        self.warmup = schedule.transient + warmup
        self.window = timed_window(schedule, steps, min_events=2)
        self.period = schedule.period


def _rows(budget: int, naive: bool, graphs: bool, scored: bool = True) -> list[Row]:
    rows = [Row("dense@C (floor)", "floor", graph=False)]
    for r in (1, 32, 64):
        rows.append(Row(f"sink R={r}", "sink", compress_every=r, graph=False))
    rows.append(Row("recompute", "recompute", graph=False))
    for kind in SCORED_TYPES if scored else ():  # the price of choosing which tokens go, eager only
        for r in (1, 64):
            rows.append(Row(f"{kind} R={r}", kind, compress_every=r, graph=False))
    if naive:
        for r in (1, 64):
            rows.append(Row(f"naive R={r}", "naive", compress_every=r, graph=False))
    if graphs:  # fixed shapes + CUDA graph replay (kvstream.graphs); compared with their own floor
        rows.append(Row("dense@C (floor) graph", "floor", graph=True))
        for r in (1, 32, 64):
            rows.append(Row(f"sink R={r} graph", "sink", compress_every=r, graph=True))
    return rows


def run_row(model, row: Row, budget: int, ids: torch.Tensor) -> None:
    """Prefill, warm up, then time row.window decode steps of one row; append to row.step_ms."""
    from kvstream.graphs import decode_context

    device = ids.device
    clock = StepTimer(device)
    warmup, total = row.warmup, row.warmup + row.window
    with torch.inference_mode(), decode_context(device, static=row.knobs["graph"]):
        if row.kind == "naive":
            _run_naive(model, row, budget, ids, clock)
            return
        policy = row.policy(budget).resolved()
        if row.kind == "recompute":  # a full window of history, no prefill
            decoder = Decoder(model, policy, ids[None], start=budget)
        else:  # the floor holds C - 1 tokens and rolls each step back, so every forward sees C
            decoder = Decoder(model, policy, ids[None], reserve=budget if row.kind == "floor" else None,
                              static=row.knobs["graph"], hold=row.kind == "floor")
            decoder.prefill(budget - 1 if row.kind == "floor" else policy.budget)
        for i in range(total):
            if i == warmup:
                events = decoder.counters()[0]
            decoder.step(clock if i >= warmup else None)  # eviction planning included: it is maintenance
            if i >= warmup:
                row.lengths.append(decoder.length)
        row.step_ms += clock.milliseconds()
        row.events += decoder.counters()[0] - events


def _run_naive(model, row: Row, budget: int, ids: torch.Tensor, clock: StepTimer) -> None:
    """The original's way: DynamicCache grown by concatenation, sliced and re-rotated at each event."""
    device = ids.device
    warmup, total = row.warmup, row.warmup + row.window
    policy = row.policy(budget)
    cache = NaiveSinkCache(model, N_SINK, policy.window_size, policy.compress_every)
    prefill = cache.budget
    model(ids[None, :prefill], cache=cache.cache)
    for i in range(total):
        t = prefill + i
        if i == warmup:
            events = cache.events
        started = clock.start()
        cache.evict()
        length = cache.length() + 1
        model(ids[None, t : t + 1], cache=cache.cache, position_ids=torch.tensor([[length - 1]], device=device))
        if i >= warmup:
            clock.stop(started)
            row.lengths.append(length)
    row.step_ms += clock.milliseconds()
    row.events += cache.events - events


def measure_bandwidth(device: torch.device, mib: int = 1024) -> float | None:
    """Device memory bandwidth in GB/s from a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    n = mib * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    return 2 * a.numel() * 4 * reps / seconds / 1e9


def bytes_per_token(model, budget: int) -> int:
    """Weights read once per token plus the KV cache read at length C."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    elem = next(model.parameters()).element_size()
    return weights + 2 * config.num_hidden_layers * budget * kv_heads * head_dim * elem


def run_bench(shape: str, budget: int, device: torch.device, dtype: torch.dtype, *, steps: int, warmup: int,
              repeats: int, naive: bool = True, attn: str = "sdpa", graphs: bool | None = None,
              recompute_steps: int | None = None, scored: bool = True) -> dict:
    model = build_model(shape, device, dtype, attn)
    vocab = model.config.vocab_size
    rows = _rows(budget, naive, graphs=device.type == "cuda" if graphs is None else graphs, scored=scored and attn == "sdpa")
    for row in rows:
        row.plan(budget, warmup, recompute_steps if row.kind == "recompute" and recompute_steps else steps)
    total_tokens = budget + max(r.warmup + r.window for r in rows) + 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (total_tokens,), generator=gen).to(device)
    for _ in range(repeats):
        for row in rows:
            run_row(model, row, budget, ids)
    floors = {g: statistics.mean(r.step_ms) for r in rows if r.kind == "floor" for g in [r.knobs["graph"]]}
    bandwidth = measure_bandwidth(device)
    moved = bytes_per_token(model, budget)
    out_rows = []
    for row in rows:
        ms = np.asarray(row.step_ms)
        mean = float(np.mean(ms))
        floor = floors[row.knobs["graph"]]
        out_rows.append({
            "row": row.name,
            "cuda_graph": row.knobs["graph"],
            "tpot_ms_mean": mean,
            "tpot_ms_median": float(np.median(ms)),
            "tpot_ms_p10": float(np.percentile(ms, 10)),
            "tpot_ms_p90": float(np.percentile(ms, 90)),
            "ratio_to_floor": mean / floor,
            "mean_forward_len": float(np.mean(row.lengths)),
            "timed_steps": int(len(ms)),
            "period": row.period,
            "window_steps": row.window,
            "events": row.events,
        })
    import transformers

    result = {
        "shape": shape, "budget": budget, "n_sink": N_SINK, "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "attn": attn,
        "steps": steps, "warmup": warmup, "repeats": repeats, "recompute_steps": recompute_steps,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bytes_per_token": moved, "bandwidth_gb_s": bandwidth,
        "bandwidth_floor_ms": None if bandwidth is None else moved / (bandwidth * 1e9) * 1000.0,
        "statistic": "mean over whole eviction periods, every step timed",
        "rows": out_rows,
    }
    return result

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

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvstream.errors import KVStreamError
from kvstream.evaluate import StepTimer, cpu_name
from kvstream.schedule import Policy
from kvstream.speed import steady_schedule, timed_window

SHAPES = {
    "tiny-llama": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=256, max_position_embeddings=4096)),
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
        overflow = self.length() - self.budget
        if overflow <= 0 or overflow < self.compress_every:
            return
        self.events += 1
        s = self.n_sink
        rotary = self.rotary if self.rotary.inv_freq.device == self.cache.layers[0].keys.device else None
        if rotary is None:
            self.rotary = rotary = self.rotary.to(self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            kept_k = layer.keys[:, :, s + overflow :]
            cos, sin = (x.to(kept_k.dtype) for x in rotary.cos_sin(-overflow))  # in the cache dtype
            rd = rotary.rotary_ndims
            xr = kept_k[..., :rd]
            rot = torch.cat([-xr[..., rd // 2 :], xr[..., : rd // 2]], dim=-1)
            kept_k = torch.cat([xr * cos + rot * sin, kept_k[..., rd:]], dim=-1)
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
        return Policy("sink", n_sink=N_SINK, compress_every=r, budget_mode="cap", cap=budget)

    def plan(self, budget: int, warmup: int, steps: int) -> None:
        """Timed steps per repeat: whole periods, >= steps and >= 2 events; untimed: transient + warmup."""
        schedule = steady_schedule(self.policy(budget))
        self.warmup = schedule.transient + warmup
        self.window = timed_window(schedule, steps, min_events=2)
        self.period = schedule.period


def _rows(budget: int, naive: bool, graphs: bool) -> list[Row]:
    rows = [Row("dense@C (floor)", "floor", graph=False)]
    for r in (1, 32, 64):
        rows.append(Row(f"sink R={r}", "sink", compress_every=r, graph=False))
    rows.append(Row("recompute", "recompute", graph=False))
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
    from kvstream.cache import StreamingCache
    from kvstream.graphs import StaticDecoder, decode_context

    device = ids.device
    clock = StepTimer(device)
    warmup, total = row.warmup, row.warmup + row.window
    with torch.inference_mode(), decode_context(device, static=row.knobs["graph"]):
        if row.kind == "recompute":
            for i in range(total):
                t = budget + i
                started = clock.start()
                model(ids[None, t + 1 - budget : t + 1], use_cache=False, logits_to_keep=1)
                if i >= warmup:
                    clock.stop(started)
                    row.lengths.append(budget)
            row.step_ms += clock.milliseconds()
            return
        if row.kind == "naive":
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
            return
        policy = row.policy(budget).resolved()
        if row.kind == "floor":
            cache = StreamingCache(model, policy, reserve=budget)
            prefill = budget - 1
        else:
            cache = StreamingCache(model, policy, rebase_at="auto")
            prefill = policy.budget
        model(ids[None, :prefill], cache=cache)
        decoder = StaticDecoder(model, cache) if row.knobs["graph"] else None
        for i in range(total):
            t = prefill + i
            if i == warmup:
                events = cache.events
            started = clock.start()  # eviction planning included: it is cache maintenance
            if decoder is not None:
                decoder.step(ids[t])
            else:
                model(ids[None, t : t + 1], cache=cache)
            if i >= warmup:
                clock.stop(started)
                row.lengths.append(cache.length)
            if row.kind == "floor":  # the next forward again sees C tokens
                cache.forget_newest()
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
              recompute_steps: int | None = None) -> dict:
    model = build_model(shape, device, dtype, attn)
    vocab = model.config.vocab_size
    rows = _rows(budget, naive, graphs=device.type == "cuda" if graphs is None else graphs)
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
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "attn": attn,
        "steps": steps, "warmup": warmup, "repeats": repeats, "recompute_steps": recompute_steps,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bytes_per_token": moved, "bandwidth_gb_s": bandwidth,
        "bandwidth_floor_ms": None if bandwidth is None else moved / (bandwidth * 1e9) * 1000.0,
        "statistic": "mean over whole eviction periods, every step timed",
        "rows": out_rows,
    }
    return result


def tpot_ms(row: dict) -> float:
    """A row's primary figure: the mean; the median in results written before the mean rule."""
    return row["tpot_ms_mean"] if "tpot_ms_mean" in row else row["tpot_ms_median"]


def statistic(result: dict) -> str:
    """"mean", or "median" for a result written before the mean rule."""
    return "mean" if all("tpot_ms_mean" in r for r in result["rows"]) else "median"


def format_table(result: dict) -> str:
    head = (f"{result['shape']}  C={result['budget']}  {result['device_name']} ({result['device']}, {result['dtype']}, "
            f"{result['threads']} threads, attn={result['attn']})  >= {result['steps']} steps "
            f"(recompute: {result.get('recompute_steps') or result['steps']})")
    stat = statistic(result)
    head += (f" in whole eviction periods x repeats={result['repeats']}, after {result['warmup']} warm-up"
             if stat == "mean" else f" x repeats={result['repeats']} (run before the mean rule: medians)")
    lines = [head, "", f"| row | TPOT {stat} ms | median ms | p10-p90 ms | ratio to dense floor ({stat}s, same mode) | "
                       "mean forward len | timed steps | events |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {tpot_ms(r):.3f} | {r['tpot_ms_median']:.3f} | {r['tpot_ms_p10']:.3f}-"
                     f"{r['tpot_ms_p90']:.3f} | {r['ratio_to_floor']:.3f} | {r['mean_forward_len']:.1f} | "
                     f"{r['timed_steps']} | {r.get('events', '')} |")
    if result["bandwidth_floor_ms"] is not None:
        lines += ["", f"memory bandwidth {result['bandwidth_gb_s']:.0f} GB/s (measured copy), "
                      f"{result['bytes_per_token'] / 1e9:.3f} GB moved per token -> bandwidth floor "
                      f"{result['bandwidth_floor_ms']:.3f} ms"]
        for r in result["rows"]:
            if r["row"].startswith("sink R=1"):
                lines.append(f"{r['row']}: {tpot_ms(r) / result['bandwidth_floor_ms']:.2f}x the bandwidth floor")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time decode steps: dense floor, sink R=1/32/64, recompute, naive reference")
    p.add_argument("--shape", action="append", choices=tuple(SHAPES), help="model shape (repeatable)")
    p.add_argument("--budget", type=int, action="append", help="C: tokens each forward sees (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default float32 on CPU, float16 on CUDA")
    p.add_argument("--steps", type=int, default=64,
                   help="timed steps per repeat at least; each row times whole eviction periods with >= 2 events")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recompute-steps", type=int, default=None,
                   help="timed steps for the recompute row (default --steps; it is O(C) times slower on a CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive reference rows")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="also time fixed-shape steps (CUDA-graph replay on a GPU, eager on a CPU); auto: on CUDA")
    p.add_argument("--out", default=None, help="write the results as JSON here, and the table beside it as .md")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.data import atomic_path
    from kvstream.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    shapes = args.shape or ["pythia-70m"]
    budgets = args.budget or [512]
    for name, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            raise KVStreamError(f"{name} must be >= 1, got {value}")
    for b in budgets:
        if b < 4 * N_SINK + 64 + 2:
            raise KVStreamError(f"--budget {b} is too small for sink R=64 with S={N_SINK}: use >= {4 * N_SINK + 66}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for shape in shapes:
        for budget in budgets:
            result = run_bench(shape, budget, device, dtype, steps=args.steps, warmup=args.warmup,
                               repeats=args.repeats, naive=args.naive, attn=args.attn,
                               graphs={"auto": None, "on": True, "off": False}[args.graphs],
                               recompute_steps=args.recompute_steps)
            print(format_table(result) + "\n", flush=True)
            results.append(result)
    if args.out:
        out = Path(args.out)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text("\n\n".join(format_table(r) for r in results) + "\n")
    return 0


def latex_table(results: list[dict], caption: str, label: str = "tab:bench") -> str:
    """A booktabs table of one or more bench results (one block per shape/budget/device)."""

    def esc(text: str) -> str:
        return str(text).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Row & mean ms & p10--p90 ms & $\times$ floor & mean length \\"]
    for result in results:
        stat = "" if statistic(result) == "mean" else ", median of steps (run before the mean rule)"
        lines += [r"\midrule",
                  rf"\multicolumn{{5}}{{l}}{{\emph{{{esc(result['shape'])}, $C={result['budget']}$, "
                  rf"{esc(result['device_name'])}, {esc(result['dtype'])}{stat}}}}} \\"]
        for r in result["rows"]:
            name = re.sub(r"R=(\d+)", r"$R=\1$", esc(r["row"])).replace("dense@C", "dense@$C$")
            lines.append(f"{name} & {tpot_ms(r):.2f} & {r['tpot_ms_p10']:.2f}--{r['tpot_ms_p90']:.2f} & "
                         f"{r['ratio_to_floor']:.3f} & {r['mean_forward_len']:.1f} \\\\")
        if result.get("bandwidth_floor_ms"):
            lines.append(rf"\multicolumn{{5}}{{l}}{{\footnotesize memory-bandwidth floor "
                         rf"{result['bandwidth_floor_ms']:.2f} ms ({result['bytes_per_token'] / 1e9:.2f} GB per token at "
                         rf"{result['bandwidth_gb_s']:.0f} GB/s measured)}} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def latex_macros(results: list[dict]) -> str:
    """\\newcommand macros for the prose: ratios of the first CPU and the first CUDA result."""
    lines = []
    seen = set()
    for result in results:
        tag = "Gpu" if result["device"] == "cuda" else "Cpu"
        if tag in seen:
            continue
        seen.add(tag)
        rows = {r["row"]: r for r in result["rows"]}
        names = {"sink R=1": "SinkROne", "sink R=64": "SinkRSixtyFour", "naive R=1": "NaiveROne",
                 "recompute": "Recompute", "sink R=1 graph": "SinkROneGraph", "sink R=64 graph": "SinkRSixtyFourGraph"}
        for row, name in names.items():
            if row in rows:
                lines.append(rf"\newcommand{{\Bench{tag}{name}}}{{{rows[row]['ratio_to_floor']:.2f}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Device}}{{{result['device_name']}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Shape}}{{{result['shape']}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Budget}}{{{result['budget']}}}")
        if result.get("bandwidth_floor_ms") and "sink R=1 graph" in rows:
            ratio = tpot_ms(rows["sink R=1 graph"]) / result["bandwidth_floor_ms"]
            lines.append(rf"\newcommand{{\Bench{tag}BandwidthX}}{{{ratio:.2f}}}")
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> list[dict]:
    """Bench results from a `kvstream bench --out` file (a list) or a gpu_check.py report (key 'bench')."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = [data["bench"]] if "bench" in data else [data]
    return data

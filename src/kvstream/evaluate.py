"""Decode-loop evaluation of one (policy, sample) cell, and the `kvstream eval` command.

method.md, "Prefill and the decode loop": prefill feeds x_0 .. x_{P-1} in one forward and scores
x_1 .. x_P; decode feeds x_P, x_{P+1}, ... one token per step and scores the next one. Every policy
scores the same N - 1 targets and no token is fed twice. Only the forward and the cache
maintenance are timed (device synchronised, CUDA events on a GPU); the loss is computed outside
the timed region, after warm-up steps the step times form TPOT.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvstream.cells import nll_path  # noqa: F401  (part of this module's interface)
from kvstream.errors import KVStreamError
from kvstream.schedule import POLICY_TYPES, Policy, cache_lengths





# ------------------------------------------------------------------------------------------------
# inputs


def load_tokens(path: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    """A 1-D integer token array from a .npy file (first max_tokens tokens)."""
    path = Path(path)
    if not path.is_file():
        raise KVStreamError(f"--tokens {path}: no such file (the pipeline's tokenize step writes it)")
    try:
        tokens = np.load(path, allow_pickle=False)
    except Exception as exc:  # a broken or foreign file
        raise KVStreamError(f"--tokens {path}: not a readable .npy array ({exc})") from exc
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise KVStreamError(
            f"--tokens {path}: expected a 1-D array of integer token ids, got shape {tokens.shape} dtype {tokens.dtype}"
        )
    if max_tokens is not None:
        if max_tokens < 2:
            raise KVStreamError(f"--max-tokens must be >= 2, got {max_tokens}")
        tokens = tokens[:max_tokens]
    if tokens.size and tokens.min() < 0:
        raise KVStreamError(f"--tokens {path}: negative token id {int(tokens.min())}")
    return tokens.astype(np.int64)


def check_cell_inputs(samples: list[np.ndarray], policy: Policy, recompute_every: int = 1,
                      names: list[str] | None = None) -> int:
    """Validate a batch of samples (equal lengths, enough tokens) and recompute_every against the
    policy; return the prefill length P. names: what the error calls each sample (default: its index)."""
    lengths = [len(t) for t in samples]
    if len(set(lengths)) != 1:
        names = names or [f"sample {i}" for i in range(len(samples))]
        raise KVStreamError("--tokens: a batch needs samples of equal length, got "
                            + ", ".join(f"{name}: {n}" for name, n in zip(names, lengths)))
    if recompute_every < 1 or (recompute_every > 1 and policy.type != "recompute"):
        raise KVStreamError(f"--recompute-every {recompute_every}: must be >= 1, and > 1 only for policy recompute")
    n = lengths[0]
    prefill = policy.prefill_len(n)
    if n < prefill + 2 or n <= prefill:
        limit = "budget C = n_sink + window_size" if policy.evicts else "cap"
        raise KVStreamError(
            f"too few tokens for the prefill: N={n} tokens but the prefill takes P={policy.prefill_len(10**12)} "
            f"({limit}); decoding needs N >= P + 2: use a longer sample (tokens_per_sample / --max-tokens) or a smaller {limit}"
        )
    return prefill


# ------------------------------------------------------------------------------------------------
# the decode loop


@dataclass
class CellResult:
    nll: np.ndarray  # float32, N - 1 values, target order
    prefill_len: int
    step_ms: list[float]
    cache_len: list[int]
    prefill_time_sec: float
    decode_time_sec: float
    runtime_sec: float
    peak_memory_mb: float
    memory_kind: str
    kv_cache_bytes: int
    extra: dict = field(default_factory=dict)
    batch_size: int = 1


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


class _Memory:
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


def _nll_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target NLL in float32 (logits [T, V], targets [T])."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def run_cell(model, tokens: np.ndarray, policy: Policy, *, warmup: int = 8, progress: bool = False,
             cuda_graphs: bool | None = None, recompute_every: int = 1) -> CellResult:
    """Evaluate one policy on one token sequence (the model is already on its device)."""
    return run_cells(model, [tokens], policy, warmup=warmup, progress=progress, cuda_graphs=cuda_graphs,
                     recompute_every=recompute_every)[0]


def run_cells(model, samples: list[np.ndarray], policy: Policy, *, warmup: int = 8, progress: bool = False,
              cuda_graphs: bool | None = None, recompute_every: int = 1) -> list[CellResult]:
    """Evaluate one policy on equal-length token sequences as one batch: one CellResult per sample.

    The schedule does not depend on content, so every row of the batch evicts at the same steps and
    row b's NLL is that of a one-sample run of samples[b] (up to kernel rounding). Timing, memory and
    the cache trace belong to the batch and are shared by its cells.
    cuda_graphs: decode window/sink steps with fixed shapes replayed from a CUDA graph (default: on
    CUDA). The numbers are the same as the eager path's; only the per-step overhead changes.
    recompute_every: the recompute baseline scores only every k-th decode target (decode steps
    0, k, 2k, ...; the others are NaN in the NLL), the prefill targets always.
    """
    from kvstream.cache import StreamingCache
    from kvstream.graphs import StaticDecoder, decode_context

    policy = policy.resolved()
    prefill = check_cell_inputs(samples, policy, recompute_every)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.stack(samples), device=device)
    batch, n = ids.shape
    steps = n - 1 - prefill
    nll = torch.full((batch, n - 1), float("nan"), dtype=torch.float32, device=device)
    timer, memory = StepTimer(device), _Memory(device)
    cache_len: list[int] = []
    scored_steps: list[int] = []
    bar = _progress(steps, policy.type, progress)
    t_run = time.perf_counter()

    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    static = bool(cuda_graphs and policy.evicts)
    with torch.inference_mode(), decode_context(device, static=static):
        cache = None
        if policy.type != "recompute":
            reserve = n if policy.type == "dense" else None
            cache = StreamingCache(model, policy, rebase_at="auto", reserve=reserve)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(ids[:, :prefill], cache=cache, use_cache=cache is not None).logits
        for b in range(batch):  # row by row: the float32 copy of [P, V] logits is made once per row
            nll[b, :prefill] = _nll_of(logits[b], ids[b, 1 : prefill + 1])
        del logits
        _sync(device)
        prefill_time = time.perf_counter() - t0
        decoder = StaticDecoder(model, cache, use_graph=device.type == "cuda") if static else None
        memory.reset()

        t0 = time.perf_counter()
        for t in range(prefill, n - 1):
            if policy.type == "recompute":
                if (t - prefill) % recompute_every:
                    continue
                start = max(0, t + 1 - policy.cap)
                cache_len.append(t + 1 - start)
                started = timer.start()
                logits = model(ids[:, start : t + 1], use_cache=False, logits_to_keep=1).logits[:, -1]
                timer.stop(started)
            else:
                # Planning the eviction is maintenance: it happens inside the timed step, and the
                # length the forward attended over is read afterwards.
                started = timer.start()
                if decoder is not None:
                    logits = decoder.step(ids[:, t])
                else:
                    logits = model(ids[:, t : t + 1], cache=cache).logits[:, -1]
                timer.stop(started)
                cache_len.append(cache.length)
            scored_steps.append(t - prefill)
            nll[:, t] = _nll_of(logits, ids[:, t + 1])
            if bar is not None:
                bar.update(1)
        _sync(device)
        decode_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    step_ms = timer.milliseconds()
    peak = memory.peak_mb()
    nll_host = nll.cpu().numpy().astype(np.float32)
    scored = np.zeros(n - 1, dtype=bool)
    scored[:prefill] = True
    scored[prefill + np.asarray(scored_steps, dtype=np.int64)] = True
    bad = ~np.isfinite(nll_host) & scored
    if bad.any():
        row, target = (int(x[0]) for x in np.nonzero(bad))
        raise KVStreamError(
            f"the loss is NaN or inf at target {target + 1} of sample {row} (policy {policy.type}): "
            "try --dtype float32 or bfloat16"
        )
    extra = {}
    if cache is not None:
        extra = {"eviction_events": cache.events, "rebases": cache.rebases, "static_shapes": decoder is not None,
                 "cuda_graph": decoder is not None and decoder.use_graph}
        if policy.evicts:
            expected = cache_lengths(policy, n)
            if expected != cache_len:  # the cache must follow the pure schedule exactly
                raise RuntimeError("internal error: the cache's lengths differ from the schedule function")
    if recompute_every > 1:
        extra = {"recompute_every": recompute_every, "scored_decode_steps": len(scored_steps)}
    runtime = time.perf_counter() - t_run
    return [
        CellResult(
            nll=nll_host[b],
            prefill_len=prefill,
            step_ms=step_ms,
            cache_len=cache_len,
            prefill_time_sec=prefill_time,
            decode_time_sec=decode_time,
            runtime_sec=runtime,
            peak_memory_mb=peak,
            memory_kind=memory.kind,
            kv_cache_bytes=0 if cache is None else cache.kv_cache_bytes,
            extra=dict(extra),
            batch_size=batch,
        )
        for b in range(batch)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _progress(total: int, desc: str, enabled: bool):
    """A progress bar on a terminal, nothing in logs."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="tok", leave=False)


# ------------------------------------------------------------------------------------------------
# the cell JSON


DIAGNOSTIC_NOTE = (
    "per-step wall time of this eval job (a batch of batch_size samples; other jobs may share the cores): "
    "a diagnostic only; the speed figures come from `kvstream speed` (docs/method.md, Speed)"
)


def summarize(result: CellResult, policy: Policy, warmup: int) -> dict:
    """The metrics of docs/method.md, original key names kept.

    Speed is not a property of a quality cell: `metrics.tpot_ms` and `metrics.speedup` stay null here
    and the aggregate fills them from the experiment's speed run. The eval job's own step times are
    kept under `timing` as a diagnostic. NaN targets (recompute scored on every k-th target) are left out.
    """
    nll = result.nll.astype(np.float64)
    scored = np.isfinite(nll)
    decode = nll[result.prefill_len :]
    decode_scored = np.isfinite(decode)
    timed = np.asarray(result.step_ms[warmup:] if len(result.step_ms) > warmup else result.step_ms, dtype=np.float64)
    d = policy.as_dict()
    d["prefill_len"] = result.prefill_len
    if result.extra.get("recompute_every"):
        d["recompute_every"] = result.extra["recompute_every"]
    return {
        "policy": d,
        "metrics": {
            "speedup": None,
            "tpot_ms": None,
            "ppl_increase_percent": None,
            "peak_memory_mb": result.peak_memory_mb,
        },
        "streaming": {
            "perplexity": float(np.exp(nll[scored].mean())),
            "decode_perplexity": float(np.exp(decode[decode_scored].mean())) if decode_scored.any() else None,
            "runtime_sec": result.runtime_sec,
            "prefill_time_sec": result.prefill_time_sec,
            "decode_time_sec": result.decode_time_sec,
            "decode_tokens": len(result.step_ms),
            "n_targets": int(scored.sum()),
            "nll_sum": float(nll[scored].sum()),
            "n_decode_targets": int(decode_scored.sum()),
            "decode_nll_sum": float(decode[decode_scored].sum()),
            "n_targets_total": int(len(nll)),
        },
        "timing": {
            "diagnostic_note": DIAGNOSTIC_NOTE,
            "batch_size": result.batch_size,
            "diagnostic_step_ms_median": float(np.median(timed)) if len(timed) else None,
            "diagnostic_step_ms_mean": float(timed.mean()) if len(timed) else None,
            "diagnostic_step_ms_p90": float(np.percentile(timed, 90)) if len(timed) else None,
            "warmup_steps": min(warmup, len(result.step_ms)),
            "timed_steps": int(len(timed)),
            "step_ms": [round(x, 4) for x in result.step_ms],
        },
        "memory": {
            "peak_memory_mb": result.peak_memory_mb,
            "kv_cache_bytes": result.kv_cache_bytes,
            "memory_kind": result.memory_kind,
            "batch_size": result.batch_size,
        },
        "trace": {"cache_len": result.cache_len},
        "cache": result.extra,
    }


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(args: argparse.Namespace, policy: Policy, device: torch.device, dtype: torch.dtype, n_tokens: int,
               tokens_file: str | os.PathLike | None = None) -> dict:
    import transformers

    commit, dirty = _git_state()
    tokens_file = args.tokens if tokens_file is None else tokens_file
    hashed = {
        "model": str(args.model), "tokens_sha256": _sha256(tokens_file), "policy": policy.as_dict(),
        "dtype": str(dtype), "max_tokens": args.max_tokens, "warmup": args.warmup, "seed": args.seed,
    }
    if getattr(args, "recompute_every", 1) != 1:
        hashed["recompute_every"] = args.recompute_every
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "config_hash": hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16],
        "seed": args.seed,
        "model": str(args.model),
        "tokens_file": str(tokens_file),
        "n_tokens": n_tokens,
        "hostname": socket.gethostname(),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# command line


def policy_from_args(args: argparse.Namespace) -> Policy:
    return Policy(
        type=args.policy,
        n_sink=args.n_sink,
        window_size=args.window_size,
        compress_every=args.compress_every,
        cache_slack=args.cache_slack,
        max_drop=args.max_drop,
        budget_mode=args.budget_mode,
        cap=args.cap,
        positions=args.positions,
    ).resolved()


def _optional_int(value: str):
    if value.lower() in ("none", "null", "inf", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {value!r}")


def _label(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"--label expects KEY=VALUE, got {value!r}")
    key, val = value.split("=", 1)
    return key, val


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate (policy, sample) cells: NLL, PPL, memory, cache trace")
    p.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    p.add_argument("--tokens", required=True, nargs="+",
                   help="1-D .npy of int token ids; several equal-length samples are evaluated as one batch")
    p.add_argument("--policy", required=True, choices=POLICY_TYPES)
    p.add_argument("--n-sink", type=int, default=4, help="S: attention-sink tokens never evicted (sink)")
    p.add_argument("--window-size", type=int, default=None, help="W: most recent tokens kept (window, sink with fixed budget)")
    p.add_argument("--compress-every", type=int, default=1, help="R: evict only when overflow >= R (lazy pruning)")
    p.add_argument("--cache-slack", type=int, default=0, help="sigma: overflow allowed to remain after an event")
    p.add_argument("--max-drop", type=_optional_int, default=None, help="delta: most tokens one event removes (none = no cap)")
    p.add_argument("--budget-mode", choices=("fixed", "cap"), default="fixed")
    p.add_argument("--cap", type=int, default=None, help="recompute window / prefill length; the peak length in budget mode cap")
    p.add_argument("--positions", choices=("relative", "absolute"), default="relative")
    p.add_argument("--recompute-every", type=int, default=1,
                   help="recompute only: score every k-th decode target (the others are NaN in the .nll.npy)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--warmup", type=int, default=8, help="decode steps left out of the timing statistics")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="fixed-shape decode steps replayed from a CUDA graph (window/sink; auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=_label, action="append", default=[], help="KEY=VALUE stored under 'cell' in the JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on a terminal")
    p.add_argument("--out", required=True, nargs="+",
                   help="cell JSON path, one per --tokens file; the per-target NLL goes beside it as <cell>.nll.npy")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.data import atomic_path
    from kvstream.models import load_model, resolve_device, resolve_dtype

    # Everything that can be checked without the model is checked first.
    outs = [Path(o) for o in args.out]
    if len(outs) != len(args.tokens):
        raise KVStreamError(f"--out names {len(outs)} cell(s) but --tokens {len(args.tokens)}: give one --out per --tokens file")
    if len(set(outs)) != len(outs):
        raise KVStreamError("--out: the same path is given twice")
    for out in outs:
        if not str(out).endswith(".json"):
            raise KVStreamError(f"--out {out}: must end in .json")
    labels = dict(args.label)
    if len(outs) > 1 and "sample" in labels:
        raise KVStreamError("--label sample=...: with several cells the sample label is each --out file's name (s0.json -> s0)")
    if args.warmup < 0:
        raise KVStreamError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise KVStreamError(f"--threads must be >= 1, got {args.threads}")
    policy = policy_from_args(args)
    samples = [load_tokens(t, args.max_tokens) for t in args.tokens]
    check_cell_inputs(samples, policy, args.recompute_every, names=list(args.tokens))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, _ = load_model(args.model, device=device, dtype=dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    for path, tokens in zip(args.tokens, samples):
        if int(tokens.max()) >= vocab:
            raise KVStreamError(
                f"--tokens {path}: token id {int(tokens.max())} is out of the model's vocabulary ({vocab}): "
                "were the tokens made with this model's tokenizer?"
            )
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    results = run_cells(model, samples, policy, warmup=args.warmup, progress=args.progress, cuda_graphs=graphs,
                        recompute_every=args.recompute_every)
    for out, path, tokens, result in zip(outs, args.tokens, samples, results):
        cell_labels = dict(labels)
        if len(outs) > 1:
            cell_labels["sample"] = out.name[: -len(".json")]
        record = {"cell": cell_labels}
        record.update(summarize(result, policy, args.warmup))
        record["provenance"] = provenance(args, policy, device, dtype, len(tokens), tokens_file=path)
        with atomic_path(nll_path(out)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.nll)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        s = record["streaming"]
        print(
            f"{policy.type}: ppl {s['perplexity']:.4f} decode ppl {s['decode_perplexity']:.4f} "
            f"(job step {record['timing']['diagnostic_step_ms_median']:.2f} ms, batch {result.batch_size}) "
            f"peak {result.peak_memory_mb:.0f} MB -> {out}",
            file=sys.stderr,
        )
    return 0

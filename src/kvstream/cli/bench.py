"""`kvstream bench`: time decode steps of each row against a dense floor (kvstream.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvstream.errors import KVStreamError


def add_parser(subparsers) -> None:
    from kvstream.bench import SHAPES

    p = subparsers.add_parser("bench", help="time decode steps: dense floor, sink R=1/32/64, recompute, score-based kinds, naive reference")
    p.add_argument("--shape", action="append", choices=tuple(SHAPES), help="model shape (repeatable)")
    p.add_argument("--budget", type=int, action="append", help="C: tokens each forward sees (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default float32 on CPU, float16 on CUDA")
    p.add_argument("--steps", type=int, default=64,
                   help="timed steps per repeat at least; each row times whole eviction periods with >= 2 events")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recompute-steps", type=int, default=None,
                   help="timed steps for the recompute row (default --steps; it is O(C) times slower on a CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive reference rows")
    p.add_argument("--no-scored", dest="scored", action="store_false",
                   help="skip the score-based rows (h2o, tova, knorm, random at R=1 and R=64; sdpa only)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="also time fixed-shape steps (CUDA-graph replay on a GPU, eager on a CPU); auto: on CUDA")
    p.add_argument("--out", default=None, help="write the results as JSON here, and the table beside it as .md")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.bench import N_SINK, run_bench
    from kvstream.io import atomic_path
    from kvstream.models import resolve_device, resolve_dtype
    from kvstream.study.bench_table import format_table

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    shapes = args.shape or ["pythia-70m"]
    budgets = args.budget or [512]
    for name, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            raise KVStreamError(f"{name} must be >= 1, got {value}")
    for b in budgets:
        if b < 4 * N_SINK + 64 + 2:
            raise KVStreamError(f"--budget {b} is too small for sink R=64 with S={N_SINK}: use >= {4 * N_SINK + 66}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for shape in shapes:
        for budget in budgets:
            result = run_bench(shape, budget, device, dtype, steps=args.steps, warmup=args.warmup,
                               repeats=args.repeats, naive=args.naive, scored=args.scored, attn=args.attn,
                               graphs={"auto": None, "on": True, "off": False}[args.graphs],
                               recompute_steps=args.recompute_steps)
            print(format_table(result) + "\n", flush=True)
            results.append(result)
    if args.out:
        out = Path(args.out)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text("\n\n".join(format_table(r) for r in results) + "\n")
    return 0



"""`kvstream speed`: the amortised time per decode token of several policies, in interleaved rounds
(kvstream.speed; docs/method.md, Speed)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("speed", help="amortised time per decode token of several policies, interleaved rounds")
    p.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    p.add_argument("--tokens", required=True, help="1-D .npy of token ids (tiled as needed; content does not affect cost)")
    p.add_argument("--policies", required=True, help="JSON file or literal JSON object: name -> policy fields")
    p.add_argument("--reference", required=True, help="the policy every ratio_to_reference divides by")
    p.add_argument("--out", required=True, help="SPEED.json; the table goes beside it as .md")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 2: the CI is across rounds)")
    p.add_argument("--min-steps", type=int, default=64, help="timed steps per round at least")
    p.add_argument("--min-events", type=int, default=2, help="eviction events per round at least (evicting policies)")
    p.add_argument("--steady-steps", type=int, default=None,
                   help="timed steps per round of entries that never evict (floor, dense, recompute); default --min-steps")
    p.add_argument("--warmup-periods", type=int, default=1, help="untimed whole periods after the prefill (>= 1)")
    p.add_argument("--floor-len", type=int, default=None, help="floor length (default: the largest cap/budget)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--execution", default="auto", choices=("eager", "graph", "auto"),
                   help="eager (= auto): model(ids, cache=...) per step; graph: every entry from a CUDA graph (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.evaluate import load_tokens
    from kvstream.io import atomic_path
    from kvstream.models import load_model, resolve_device, resolve_dtype
    from kvstream.codeversion import SPEED_ENTRY, code_version
    from kvstream.provenance import device_name, git_state, now
    from kvstream.speed import Entry, format_table, load_policies, run_speed

    # Everything that can be checked without the model is checked first.
    out = Path(args.out)
    if out.suffix != ".json":
        raise KVStreamError(f"--out {out}: must end in .json")
    folder = out.absolute().parent
    while not folder.exists():  # atomic_path creates the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise KVStreamError(f"--out {out}: folder {folder} is not writable")
    policies = load_policies(args.policies)
    if args.reference not in policies:
        raise KVStreamError(f"--reference {args.reference!r} is not a policy name: use one of {', '.join(policies)}")
    for flag, value, low in (("--rounds", args.rounds, 2), ("--min-steps", args.min_steps, 1),
                             ("--min-events", args.min_events, 1), ("--steady-steps", args.steady_steps, 1),
                             ("--warmup-periods", args.warmup_periods, 1), ("--floor-len", args.floor_len, 2),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise KVStreamError(f"{flag} must be >= {low}, got {value}")
    tokens = load_tokens(args.tokens)
    if not len(tokens):
        raise KVStreamError(f"--tokens {args.tokens}: no tokens")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    execution = "eager" if args.execution == "auto" else args.execution
    if execution == "graph" and device.type != "cuda":
        raise KVStreamError(f"--execution graph needs CUDA (CUDA graphs) but the device is {device.type}: "
                            "use --execution eager")
    floor_len = args.floor_len or max(p.cap if p.cap is not None else p.budget for p in policies.values())
    timing = dict(min_steps=args.min_steps, min_events=args.min_events, steady_steps=args.steady_steps,
                  warmup_periods=args.warmup_periods)
    floor = Entry("floor", Policy("dense", cap=floor_len).resolved(), "floor", **timing)
    entries = [floor] + [Entry(name, p, p.type, **timing) for name, p in policies.items()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, _ = load_model(args.model, device=device, dtype=dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(tokens.max()) >= vocab:
        raise KVStreamError(f"--tokens {args.tokens}: token id {int(tokens.max())} is out of the model's vocabulary ({vocab})")
    needed = max(e.first_step + e.warmup_steps + args.rounds * e.window for e in entries) + 1
    ids = torch.as_tensor(np.resize(tokens, needed), device=device)  # tiled: content does not affect cost
    started_at = now()
    run_speed(model, entries, ids, args.rounds, execution == "graph")

    import transformers

    commit, dirty = git_state()
    reference = entries[1 + list(policies).index(args.reference)]
    result = {
        "kind": "kvstream-speed", "execution": execution, "rounds": args.rounds, "reference": args.reference,
        "floor_len": floor_len, "min_steps": args.min_steps, "min_events": args.min_events,
        "steady_steps": args.steady_steps or args.min_steps,
        "warmup_periods": args.warmup_periods, "model": str(args.model), "tokens_file": str(args.tokens),
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "seed": args.seed,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "git_commit": commit, "git_dirty": dirty, "code_version": code_version(SPEED_ENTRY), "started_at": started_at,
        "note": "mean over whole schedule periods with every step timed = amortised cost per token; "
                "dense policies are timed at their steady length = cap",
        "floor": floor.summary(reference, floor),
        "policies": {e.name: e.summary(reference, floor) for e in entries[1:]},
    }
    table = format_table(result)
    print(table, flush=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table + "\n")
    return 0

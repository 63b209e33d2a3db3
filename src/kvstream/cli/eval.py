"""`kvstream eval`: evaluate one policy on one or more equal-length samples (one cell per sample).

The policy comes as one JSON object (`--policy-json`, the fields of `kvstream.schedule.Policy`: what
the pipeline passes), or through the per-field flags, a thin alias whose unset flags take Policy's
defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvstream.errors import KVStreamError
from kvstream.io import json_argument
from kvstream.schedule import POLICY_TYPES, Policy

# flag -> Policy field; a flag left unset takes the Policy default (one source of defaults)
POLICY_FLAGS = {"policy": "type", "n_sink": "n_sink", "window_size": "window_size", "compress_every": "compress_every",
                "cache_slack": "cache_slack", "max_drop": "max_drop", "budget_mode": "budget_mode", "cap": "cap",
                "positions": "positions"}
_UNSET = object()


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The resolved Policy of `--policy-json` or of the per-field flags (not both)."""
    given = {field: getattr(args, flag) for flag, field in POLICY_FLAGS.items() if getattr(args, flag) is not _UNSET}
    if args.policy_json is not None:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in POLICY_FLAGS if getattr(args, f) is not _UNSET)
            raise KVStreamError(f"--policy-json and {flags}: give the policy one way, not both")
        return load_policy_json(args.policy_json)
    if "type" not in given:
        raise KVStreamError("give the policy: --policy-json '{\"type\": ...}' or --policy TYPE with its flags")
    flags = {field: "--" + flag.replace("_", "-") for flag, field in POLICY_FLAGS.items()}
    try:
        return Policy.from_dict(given, strict=True, name=lambda field: f"{flags[field]} {given[field]}")
    except KVStreamError as exc:
        raise KVStreamError(f"policy: {exc}") from None


def load_policy_json(spec: str) -> Policy:
    """A Policy from a JSON object given literally or as a file name."""
    raw = json_argument(spec, "--policy-json")
    try:
        return Policy.from_dict(raw, strict=True)
    except KVStreamError as exc:
        raise KVStreamError(f"--policy-json: {exc}") from None


def _optional_int(value: str):
    if value.lower() in ("none", "null", "inf", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {value!r}")


def _label(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"--label expects KEY=VALUE, got {value!r}")
    key, val = value.split("=", 1)
    return key, val


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate (policy, sample) cells: NLL, PPL, memory, cache trace")
    p.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    p.add_argument("--tokens", required=True, nargs="+",
                   help="1-D .npy of int token ids; several equal-length samples are evaluated as one batch")
    p.add_argument("--policy-json", default=None,
                   help="the policy as one JSON object (or a file holding one): the fields of kvstream.schedule.Policy")
    g = p.add_argument_group("policy fields (an alias of --policy-json; unset flags take Policy's defaults; "
                             "a flag the policy type does not use is refused)")
    g.add_argument("--policy", choices=POLICY_TYPES, default=_UNSET)
    g.add_argument("--n-sink", type=int, default=_UNSET, help="S: attention-sink tokens never evicted (sink; default 4)")
    g.add_argument("--window-size", type=int, default=_UNSET, help="W: most recent tokens kept (window, sink with fixed budget)")
    g.add_argument("--compress-every", type=int, default=_UNSET, help="R: evict only when overflow >= R (lazy pruning)")
    g.add_argument("--cache-slack", type=int, default=_UNSET, help="sigma: overflow allowed to remain after an event")
    g.add_argument("--max-drop", type=_optional_int, default=_UNSET, help="delta: most tokens one event removes (none = no cap)")
    g.add_argument("--budget-mode", choices=("fixed", "cap"), default=_UNSET)
    g.add_argument("--cap", type=int, default=_UNSET, help="recompute window / prefill length; the peak length in budget mode cap")
    g.add_argument("--positions", choices=("relative", "absolute"), default=_UNSET)
    p.add_argument("--recompute-every", type=int, default=1,
                   help="recompute only: score every k-th decode target (the others are NaN in the .nll.npy)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--warmup", type=int, default=8, help="decode steps left out of the timing statistics")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="fixed-shape decode steps replayed from a CUDA graph (window/sink; auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=_label, action="append", default=[], help="KEY=VALUE stored under 'cell' in the JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on a terminal")
    p.add_argument("--out", required=True, nargs="+",
                   help="cell JSON path, one per --tokens file; the per-target NLL goes beside it as <cell>.nll.npy")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvstream.cells import check_cell_outputs, decode_steps
    from kvstream.evaluate import check_cell_inputs, load_tokens, run_cells, write_cells
    from kvstream.models import load_model, resolve_device, resolve_dtype
    from kvstream.provenance import cell_provenance

    # Everything that can be checked without the model is checked first.
    outs = [Path(o) for o in args.out]
    if len(outs) != len(args.tokens):
        raise KVStreamError(f"--out names {len(outs)} cell(s) but --tokens {len(args.tokens)}: give one --out per --tokens file")
    if len(set(outs)) != len(outs):
        raise KVStreamError("--out: the same path is given twice")
    labels = dict(args.label)
    if len(outs) > 1 and "sample" in labels:
        raise KVStreamError("--label sample=...: with several cells the sample label is each --out file's name (s0.json -> s0)")
    if args.warmup < 0:
        raise KVStreamError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise KVStreamError(f"--threads must be >= 1, got {args.threads}")
    policy = policy_from_args(args)
    samples = [load_tokens(t, args.max_tokens) for t in args.tokens]
    check_cell_inputs(samples, policy, args.recompute_every, names=list(args.tokens))
    n, steps = len(samples[0]), decode_steps(policy, len(samples[0]))
    if args.warmup >= steps:
        raise KVStreamError(f"--warmup {args.warmup}: the run has only {steps} decode step(s) (N={n} tokens, prefill "
                            f"{policy.prefill_len(n)}), so none would be left to time: use --warmup < {steps} or more tokens")
    timed = len(range(0, steps, args.recompute_every))
    if args.warmup >= timed:  # recompute scoring every k-th target: a diagnostic over few forwards
        print(f"note: --warmup {args.warmup} >= the {timed} forwards that recompute runs with --recompute-every "
              f"{args.recompute_every}: its step-time diagnostic covers all of them (timing.warmup_steps 0)", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    check_cell_outputs(outs)  # the last check: it makes the output folders
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, _ = load_model(args.model, device=device, dtype=dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    for path, tokens in zip(args.tokens, samples):
        if int(tokens.max()) >= vocab:
            raise KVStreamError(
                f"--tokens {path}: token id {int(tokens.max())} is out of the model's vocabulary ({vocab}): "
                "were the tokens made with this model's tokenizer?"
            )
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    results = run_cells(model, samples, policy, warmup=args.warmup, progress=args.progress, cuda_graphs=graphs,
                        recompute_every=args.recompute_every)
    provenances = [
        cell_provenance(model=args.model, tokens_file=path, policy=policy, device=device, dtype=dtype,
                        n_tokens=len(tokens), max_tokens=args.max_tokens, warmup=args.warmup, seed=args.seed,
                        recompute_every=args.recompute_every)
        for path, tokens in zip(args.tokens, samples)
    ]
    write_cells(outs, results, policy, args.warmup, labels, provenances)
    return 0

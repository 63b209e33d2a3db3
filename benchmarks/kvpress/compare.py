"""kvpress 0.5.5's decode-time StreamingLLM beside kvstream's sink cache: same model, tokens, C, absolute positions.

kvpress needs transformers < 5.3 and kvstream's cache needs transformers >= 5.24 (their Cache APIs differ:
`get_mask_sizes`, the `cache=` argument), so each side runs in its own environment and process, and each is timed
against its own dense floor in that process; the ratio to the floor is what compares across the two.

    bash benchmarks/kvpress/setup.sh                                   # .venv-kvpress (once)
    bash benchmarks/kvpress/run.sh                                     # both sides, then `combine`
    .venv/bin/python benchmarks/kvpress/compare.py side ours --out ours.json
    .venv-kvpress/bin/python benchmarks/kvpress/compare.py side kvpress --out kvpress.json
    .venv/bin/python benchmarks/kvpress/compare.py combine ours.json kvpress.json --out benchmarks/kvpress/X.json

A side: (1) quality, untimed: a prefill of C tokens, then `--steps` decode steps, per-target NLL and the
original positions every forward attended over, for no eviction and each R (kvpress also with its kept indices
sorted, the diagnosis); (2) timing: its floor (a dense cache held at C + 1 tokens, so every forward attends as many
as R = 1's) and each R, each with its own decode state, in interleaved rounds (every other round reversed),
every step timed, after a warm-up of whole compression intervals. `combine` checks that both sides saw the same
tokens and settings and writes the result that kvstream.study.kvpress reads (JSON + Markdown).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_inputs(model_path: str, documents: str, n_tokens: int):
    """The model (fp32, SDPA, eval) and the first n_tokens of the first KJV document long enough, tokenized as
    kvstream's token samples are (kvstream.tokens.select_samples)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kvstream.texts import read_documents
    from kvstream.tokens import load_tokenizer, select_samples

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    (sample,), _ = select_samples(load_tokenizer(model_path), read_documents(documents), 1, n_tokens)
    ids = np.asarray(sample["tokens"], dtype=np.int64)
    info = {"document": sample["id"], "n_tokens": n_tokens, "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
    return model, torch.from_numpy(ids), info


def make_run(side: str, model, ids, budget: int, rate, **kw):
    from sides import KvpressRun, OursRun

    if side == "ours":
        kw.pop("track", None)
        return OursRun(model, ids, budget, rate, **kw)
    return KvpressRun(model, ids, budget, rate, **kw)


def quality_run(side: str, model, ids, budget: int, steps: int, rate, sorted_keep: bool = False) -> dict:
    """Per-target NLL and, per step, the positions evicted since the previous forward."""
    import torch

    from sides import nll_of

    extra = {"sorted_keep": True} if sorted_keep else {}
    run = make_run(side, model, ids, budget, rate, track=rate is not None, **extra)
    decode_nll, evicted, lengths, slot_orders = [], [], [], []
    with torch.inference_mode(), run.session():
        prefill_nll = run.prefill(budget)
        previous = set(range(budget))
        for k in range(steps):
            logits = run.step()
            decode_nll += nll_of(logits[None], ids[budget + k + 1 : budget + k + 2])
            held = set(run.held())
            gone = sorted(previous - held)
            if gone:
                evicted.append({"step": k, "positions": gone})
            lengths.append(len(held))
            previous = held
    tracker = getattr(run, "tracker", None)
    if tracker is not None:
        layer0 = [(at, after) for layer, at, _, after in tracker.calls if layer == 0]
        slot_orders = [{"step": at - budget, "slots": after[:12], "ascending": after == sorted(after)}
                       for at, after in layer0[:3]]
        by_call = {}
        for layer, at, _, after in tracker.calls:
            by_call.setdefault(at, {})[layer] = after
        agree = all(len({tuple(v) for v in layers.values()}) == 1 for layers in by_call.values())
    else:
        agree = None
    variant = side + ("_sorted" if sorted_keep else "")
    return {"variant": variant, "rate": rate, "prefill_nll": [round(x, 6) for x in prefill_nll],
            "decode_nll": [round(x, 6) for x in decode_nll], "evicted": evicted, "attended_len": lengths,
            "events": run.event_count(), "slot_order": slot_orders, "layers_agree": agree}


def timing(side: str, model, ids, budget: int, rates: list[int], rounds: int, round_steps: int, warmup: int) -> dict:
    import numpy as np
    import torch

    from kvstream.decode import StepTimer

    names = ["floor"] + [f"R={r}" for r in rates]
    runs = [make_run(side, model, ids, budget, None, floor_len=budget + 1)]
    runs += [make_run(side, model, ids, budget, r) for r in rates]
    steps_ms = {n: [] for n in names}
    round_ms = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        for run in runs:
            with run.session():
                run.prefill(budget)
                for _ in range(warmup):
                    run.step()
        for r in range(rounds):
            order = list(zip(names, runs))
            for name, run in order if r % 2 == 0 else order[::-1]:
                clock = StepTimer(torch.device("cpu"))
                with run.session():
                    for _ in range(round_steps):
                        run.step(clock)
                ms = clock.milliseconds()
                steps_ms[name] += ms
                round_ms[name].append(float(np.mean(ms)))
            loads.append(os.getloadavg()[0])
    return {"rounds": rounds, "round_steps": round_steps, "warmup_steps": warmup, "floor_len": budget + 1,
            "load_1min": loads,
            "entries": {n: {"mean_ms": float(np.mean(steps_ms[n])), "median_ms": float(np.median(steps_ms[n])),
                            "p10_ms": float(np.percentile(steps_ms[n], 10)),
                            "p90_ms": float(np.percentile(steps_ms[n], 90)), "round_mean_ms": round_ms[n],
                            "steps": len(steps_ms[n])} for n in names}}


def versions(side: str) -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if side == "kvpress":
        from importlib.metadata import version

        out["kvpress"] = version("kvpress")
    return out


def model_source(model_path: str) -> str | None:
    """Where kvstream prepare-model took the model from (its kvstream_model.json), for the paper's wording."""
    import json

    record = Path(model_path) / "kvstream_model.json"
    return json.loads(record.read_text()).get("source") if record.is_file() else None


def run_side(args) -> None:
    import torch

    from kvstream.io import write_json
    from kvstream.provenance import cpu_name, git_state, now

    torch.set_num_threads(args.threads)
    rates = [int(r) for r in args.rates.split(",")]
    if args.warmup % max(rates) or args.round_steps % max(rates):
        raise SystemExit(f"--warmup {args.warmup} and --round-steps {args.round_steps} must be whole numbers of the "
                         f"largest R ({max(rates)}): kvpress resets its step counters when its hooks are removed")
    n_tokens = args.budget + max(args.steps, args.warmup + args.rounds * args.round_steps) + 1
    model, ids, tokens = load_inputs(args.model, args.documents, n_tokens)
    started, clock0 = now(), time.perf_counter()
    commit, dirty = git_state()
    quality = [quality_run(args.side, model, ids, args.budget, args.steps, rate) for rate in [None, *rates]]
    if args.side == "kvpress":
        quality += [quality_run(args.side, model, ids, args.budget, args.steps, r, sorted_keep=True) for r in rates]
    timed = None if args.rounds == 0 else timing(args.side, model, ids, args.budget, rates, args.rounds,
                                                  args.round_steps, args.warmup)
    write_json(args.out, {
        "side": args.side, "budget": args.budget, "n_sink": 4, "steps": args.steps, "rates": rates,
        "positions": "absolute", "dtype": "float32", "threads": torch.get_num_threads(), "model": args.model,
        "model_source": model_source(args.model),
        "tokens": tokens, "versions": versions(args.side), "git_commit": commit, "git_dirty": dirty,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "started_at": started, "finished_at": now(),
        "seconds": round(time.perf_counter() - clock0, 1), "quality": quality, "timing": timed})
    print(f"{args.side}: wrote {args.out}")


def run_combine(args) -> None:
    import json

    from kvstream.io import atomic_path, write_json
    from kvstream.study.kvpress import combine_sides, format_markdown

    ours, kvpress = (json.loads(Path(p).read_text()) for p in (args.ours, args.kvpress))
    uptime = {k: Path(v).read_text().strip() if v else None for k, v in (("before", args.uptime_before),
                                                                           ("after", args.uptime_after))}
    result = combine_sides(ours, kvpress, uptime=uptime, hostname=platform.node())
    write_json(args.out, result)
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text(format_markdown(result) + "\n")
    print(format_markdown(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    side = sub.add_parser("side", help="run one side (ours: main env; kvpress: .venv-kvpress)")
    side.add_argument("side", choices=["ours", "kvpress"])
    side.add_argument("--out", required=True)
    side.add_argument("--model", default=str(ROOT / "results/models/smollm2-135m"))
    side.add_argument("--documents", default=str(ROOT / "results/data/kjv/documents.jsonl"))
    side.add_argument("--budget", type=int, default=512, help="C (kvpress target_size; ours S + W)")
    side.add_argument("--steps", type=int, default=256, help="decode steps of the quality runs")
    side.add_argument("--rates", default="1,32", help="R values (kvpress compression_interval; ours compress_every)")
    side.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (0: no timing)")
    side.add_argument("--round-steps", type=int, default=64, help="timed steps per entry and round")
    side.add_argument("--warmup", type=int, default=32, help="untimed steps per entry before the rounds")
    side.add_argument("--threads", type=int, default=1)
    comb = sub.add_parser("combine", help="both sides' files -> the committed result (.json + .md)")
    comb.add_argument("ours")
    comb.add_argument("kvpress")
    comb.add_argument("--out", required=True)
    comb.add_argument("--uptime-before", help="a file holding `uptime` before the run")
    comb.add_argument("--uptime-after", help="a file holding `uptime` after the run")
    args = parser.parse_args(argv)
    run_side(args) if args.command == "side" else run_combine(args)


if __name__ == "__main__":
    main()

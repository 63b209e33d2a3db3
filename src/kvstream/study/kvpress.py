"""kvpress's decode-time StreamingLLM beside ours (benchmarks/kvpress/compare.py): the two sides' files combined
into one result, checked when read, and turned into a Markdown table, the paper's table and its macros.

Torch-free: the result is committed data (benchmarks/kvpress/*.json), read by the report environment. A side's
`evicted` lists, per decode step, the original positions that left the set its forwards attended over, so the
held set of every step is rebuilt here (the prefill's C positions, plus one new token a step, minus those).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvstream.errors import KVStreamError
from kvstream.stats import ratio_ci
from kvstream.study.latex import fmt, ordinal, tex_escape
from kvstream.study.wording import and_list, model_name

SAME_ON_BOTH_SIDES = ("budget", "n_sink", "steps", "rates", "positions", "dtype", "threads")
NLL_EQUAL = 1e-4  # nats: two NLLs this close count as the same prediction (fp32, two transformers versions)
RESULT_FIELDS = {"benchmark": str, "model": str, "budget": int, "n_sink": int, "steps": int, "threads": int,
                 "dtype": str, "processes": str, "versions": dict, "provenance": dict, "no_eviction": dict,
                 "rates": list, "timing": dict}
RATE_FIELDS = {"R": int, "nll": dict, "first_held_difference_step": (int, type(None)),
               "first_nll_difference_step": (int, type(None)), "sinks_held_at_end": dict, "ratio_to_floor": dict,
               "tpot_ms": dict, "sorted_max_abs_dnll": float, "sorted_held_identical": bool, "slot_order": list}


# --- combining the two sides (benchmarks/kvpress/compare.py combine) ---------------------------------------


def held_sets(run: dict, budget: int) -> list[set[int]]:
    """The original positions each decode step's forward attended over."""
    gone = {e["step"]: set(e["positions"]) for e in run["evicted"]}
    held, out = set(range(budget)), []
    for k in range(len(run["decode_nll"])):
        held = (held | {budget + k}) - gone.get(k, set())
        out.append(set(held))
    return out


def _first(flags) -> int | None:
    return next((k for k, flag in enumerate(flags) if flag), None)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def compare_rate(ours: dict, kvpress: dict, fixed: dict, budget: int, n_sink: int) -> dict:
    """One R: where the held sets and the NLLs part, and what each side evicted at the first event that differs."""
    held_o, held_k = held_sets(ours, budget), held_sets(kvpress, budget)
    nll_o, nll_k, nll_f = ours["decode_nll"], kvpress["decode_nll"], fixed["decode_nll"]
    first_held = _first(a != b for a, b in zip(held_o, held_k))
    first_nll = _first(abs(a - b) > NLL_EQUAL for a, b in zip(nll_o, nll_k))
    events_o = {e["step"]: e["positions"] for e in ours["evicted"]}
    events_k = {e["step"]: e["positions"] for e in kvpress["evicted"]}
    differing = [k for k in sorted(set(events_o) | set(events_k)) if events_o.get(k) != events_k.get(k)]
    first_event = None
    if differing:
        k = differing[0]
        first_event = {"step": k, "ours": events_o.get(k, [])[:8], "kvpress": events_k.get(k, [])[:8]}
    sinks = set(range(n_sink))
    after = first_held if first_held is not None else len(nll_o)
    return {
        "R": kvpress["rate"], "events": {"ours": ours["events"], "kvpress": kvpress["events"]},
        "nll": {"ours": _mean(nll_o), "kvpress": _mean(nll_k), "kvpress_sorted": _mean(nll_f),
                "ours_after_difference": _mean(nll_o[after:]), "kvpress_after_difference": _mean(nll_k[after:])},
        "max_abs_dnll_before_difference": max((abs(a - b) for a, b in zip(nll_o[:after], nll_k[:after])), default=0.0),
        "first_held_difference_step": first_held, "first_nll_difference_step": first_nll,
        "steps_with_different_held": sum(a != b for a, b in zip(held_o, held_k)),
        "first_differing_event": first_event,
        "sinks_held_at_end": {"ours": len(sinks & held_o[-1]), "kvpress": len(sinks & held_k[-1])},
        "first_step_without_all_sinks": {"ours": _first(not sinks <= h for h in held_o),
                                         "kvpress": _first(not sinks <= h for h in held_k)},
        "sorted_max_abs_dnll": max(abs(a - b) for a, b in zip(nll_o, nll_f)),
        "sorted_held_identical": held_o == held_sets(fixed, budget),
        "slot_order": kvpress["slot_order"], "layers_agree": kvpress["layers_agree"],
        "decode_nll": {"ours": nll_o, "kvpress": nll_k, "kvpress_sorted": nll_f},
    }


def _timing(side: dict, name: str) -> tuple[float, dict]:
    entries = side["timing"]["entries"]
    return entries[name]["mean_ms"], ratio_ci(entries[name]["round_mean_ms"], entries["floor"]["round_mean_ms"])


def combine_sides(ours: dict, kvpress: dict, uptime: dict, hostname: str) -> dict:
    """The committed result from the two sides' files; refuses sides that did not see the same inputs."""
    for field in SAME_ON_BOTH_SIDES:
        if ours.get(field) != kvpress.get(field):
            raise KVStreamError(f"{field}: ours has {ours.get(field)!r}, kvpress {kvpress.get(field)!r}; "
                                "run both sides with the same settings")
    if ours["tokens"]["sha256"] != kvpress["tokens"]["sha256"]:
        raise KVStreamError("tokens.sha256: the two sides tokenized different ids; give both the same "
                            "--model and --documents")
    if ours["side"] != "ours" or kvpress["side"] != "kvpress":
        raise KVStreamError(f"side: expected ours then kvpress, got {ours['side']!r} and {kvpress['side']!r}")
    runs = {(q["variant"], q["rate"]): q for q in ours["quality"] + kvpress["quality"]}
    budget, n_sink = ours["budget"], ours["n_sink"]
    rates = []
    for rate in ours["rates"]:
        row = compare_rate(runs["ours", rate], runs["kvpress", rate], runs["kvpress_sorted", rate], budget, n_sink)
        for name, side in (("ours", ours), ("kvpress", kvpress)):
            ms, ratio = _timing(side, f"R={rate}")
            row.setdefault("tpot_ms", {})[name] = ms
            row.setdefault("ratio_to_floor", {})[name] = ratio
        rates.append(row)
    plain_o, plain_k = runs["ours", None], runs["kvpress", None]
    pairs = list(zip(plain_o["prefill_nll"] + plain_o["decode_nll"], plain_k["prefill_nll"] + plain_k["decode_nll"]))
    loads = ours["timing"]["load_1min"] + kvpress["timing"]["load_1min"]
    return {
        "benchmark": "kvpress-streamingllm", "model": Path(ours["model"]).name, "model_source": ours.get("model_source"), "budget": budget, "n_sink": n_sink,
        "steps": ours["steps"], "threads": ours["threads"], "dtype": ours["dtype"], "positions": ours["positions"],
        "tokens": ours["tokens"],
        "processes": "separate: each side in its own environment and process, timed against its own dense floor",
        "versions": {"ours": ours["versions"], "kvpress": kvpress["versions"]},
        "provenance": {"git_commit": ours["git_commit"], "git_dirty": ours["git_dirty"], "cpu": ours["cpu"],
                       "cpu_count": ours["cpu_count"], "hostname": hostname, "uptime_before": uptime.get("before"),
                       "uptime_after": uptime.get("after"), "load_1min_min": min(loads), "load_1min_max": max(loads),
                       "sides": {n: {"started_at": s["started_at"], "finished_at": s["finished_at"],
                                     "load_1min": s["timing"]["load_1min"]} for n, s in (("ours", ours),
                                                                                         ("kvpress", kvpress))}},
        "no_eviction": {"max_abs_dnll": max(abs(a - b) for a, b in pairs), "targets": len(pairs)},
        "timing": {k: ours["timing"][k] for k in ("rounds", "round_steps", "warmup_steps", "floor_len")}
                  | {"floor_ms": {"ours": ours["timing"]["entries"]["floor"]["mean_ms"],
                                  "kvpress": kvpress["timing"]["entries"]["floor"]["mean_ms"]}},
        "rates": rates,
    }


# --- reading the committed result --------------------------------------------------------------------------


def _check_fields(obj: dict, fields: dict, where: str) -> None:
    for name, kind in fields.items():
        if name not in obj:
            raise KVStreamError(f"{where}: field {name!r} is missing; rerun benchmarks/kvpress/run.sh")
        if not isinstance(obj[name], kind) or (kind is int and isinstance(obj[name], bool)):
            raise KVStreamError(f"{where}: field {name!r} has {type(obj[name]).__name__} {obj[name]!r}; expected "
                                f"{getattr(kind, '__name__', kind)}; rerun benchmarks/kvpress/run.sh")


def check_result(result, where: str) -> dict:
    """A combined result as compare.py writes it, or a KVStreamError naming the field and the fix."""
    if not isinstance(result, dict):
        raise KVStreamError(f"{where}: expected a JSON object written by benchmarks/kvpress/compare.py combine")
    _check_fields(result, RESULT_FIELDS, where)
    if not result["rates"]:
        raise KVStreamError(f"{where}: field 'rates' is empty; rerun benchmarks/kvpress/run.sh")
    for i, row in enumerate(result["rates"]):
        _check_fields(row, RATE_FIELDS, f"{where}: rates[{i}]")
        for side in ("ours", "kvpress"):
            ratio = row["ratio_to_floor"].get(side)
            if not isinstance(ratio, dict) or len(ratio.get("ci95") or []) != 2:
                raise KVStreamError(f"{where}: rates[{i}].ratio_to_floor.{side} needs an estimate and a ci95 pair")
    for side in ("ours", "kvpress"):
        if side not in result["versions"]:
            raise KVStreamError(f"{where}: field 'versions' has no {side!r} entry")
    return result


def load_result(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVStreamError(f"{path}: cannot read the kvpress comparison ({exc}); config bench.kvpress_results "
                            "names files written by benchmarks/kvpress/compare.py combine") from None
    return check_result(data, str(path))


# --- what the numbers support ------------------------------------------------------------------------------


def separated(a: dict, b: dict) -> bool:
    """Two ratios whose 95 % intervals do not overlap (the timing can tell them apart)."""
    (alo, ahi), (blo, bhi) = a["ci95"], b["ci95"]
    return all(map(math.isfinite, (alo, ahi, blo, bhi))) and (ahi < blo or bhi < alo)


def timing_sentence(row: dict) -> str:
    ours, kv = row["ratio_to_floor"]["ours"], row["ratio_to_floor"]["kvpress"]
    r = row["R"]
    if not separated(ours, kv):
        return (f"At $R={r}$ the two ratios' intervals overlap: on this machine the timing cannot tell the two "
                "caches' overheads apart.")
    dearer = "kvpress" if kv["estimate"] > ours["estimate"] else "ours"
    return (f"At $R={r}$ the intervals do not overlap: "
            + ("kvpress's maintenance costs more, relative to its floor, than ours." if dearer == "kvpress"
               else "ours costs more, relative to its floor, than kvpress's."))


def kept_sentence(row: dict, n_sink: int) -> str:
    r, step = row["R"], row["first_held_difference_step"]
    if step is None:
        return f"At $R={r}$ both caches attended over the same tokens at every step."
    lost = row["sinks_held_at_end"]["kvpress"]
    sorted_words = ("with the kept indices sorted, kvpress attends over exactly our tokens at every step"
                    if row["sorted_held_identical"] else "sorting the kept indices does not restore our tokens")
    nth = step // r  # kvpress compresses at the end of steps R - 1, 2R - 1, ...: those before this step
    return (f"At $R={r}$ kvpress first attends over other tokens than ours at decode step {step} (counted from 0), "
            f"after its {ordinal(nth)} compression; at the end it still holds {lost} of the {n_sink} sinks, ours all "
            f"{row['sinks_held_at_end']['ours']}; {sorted_words}.")


# --- tables and macros -------------------------------------------------------------------------------------


def sci(x: float) -> str:
    """A small non-negative number for math mode: 0, or 3.1\\times 10^{-6}."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.1e}".split("e")
    return rf"{mantissa}\times 10^{{{int(exponent)}}}"


def _ratio(r: dict) -> str:
    return rf"{fmt(r['estimate'], 2)}\,\ci{{{fmt(r['ci95'][0], 2)}}}{{{fmt(r['ci95'][1], 2)}}}"


def format_markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"kvpress {v['kvpress'].get('kvpress')} (transformers {v['kvpress']['transformers']}) beside kvstream "
             f"(transformers {v['ours']['transformers']}): {result['model']}, C={result['budget']}, "
             f"S={result['n_sink']}, {result['steps']} decode steps, {result['dtype']}, {result['threads']} thread(s), "
             f"absolute positions; {result['processes']}",
             f"load (1 min) during the runs: {result['provenance']['load_1min_min']:.2f}-"
             f"{result['provenance']['load_1min_max']:.2f}; uptime before: {result['provenance']['uptime_before']}; "
             f"after: {result['provenance']['uptime_after']}",
             f"no eviction: max |NLL ours - NLL kvpress| = {result['no_eviction']['max_abs_dnll']:.2e} over "
             f"{result['no_eviction']['targets']} targets", "",
             "| R | side | mean NLL | ms/token | ratio to own floor [95% CI] | first step held differs | "
             "sinks held at end |", "|---|---|---|---|---|---|---|"]
    for row in result["rates"]:
        for side in ("ours", "kvpress"):
            ratio = row["ratio_to_floor"][side]
            lines.append(f"| {row['R']} | {side} | {row['nll'][side]:.4f} | {row['tpot_ms'][side]:.2f} | "
                         f"{ratio['estimate']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}] | "
                         f"{row['first_held_difference_step'] if side == 'kvpress' else '-'} | "
                         f"{row['sinks_held_at_end'][side]} |")
        lines.append(f"| {row['R']} | kvpress, kept indices sorted | {row['nll']['kvpress_sorted']:.4f} | - | - | "
                     f"{'none' if row['sorted_held_identical'] else 'differs'} | - |")
    lines.append("")
    for row in result["rates"]:
        lines.append(f"R={row['R']}: first differing event {row.get('first_differing_event')}; kvpress slots after "
                     f"its first compressions: {row['slot_order']}")
    return "\n".join(lines)


def latex_table(result: dict, label: str = "tab:kvpress") -> str:
    """The table, defined as the macro \\KvpressTable (placed after the paragraph that cites it)."""
    v = result["versions"]
    caption = (rf"kvpress {tex_escape(v['kvpress'].get('kvpress'))} (decode-time StreamingLLM) beside our sink "
               rf"cache: {model_name(result.get('model_source'), result['model'])[0]}, $C={result['budget']}$, $S={result['n_sink']}$, "
               rf"{result['steps']} decode steps of one text, absolute positions, {result['threads']} CPU thread. "
               r"Mean decode NLL (nats); time per token and its ratio to each side's own dense floor (a cache "
               r"held at $C+1$ tokens in the same process), with a 95\,\% interval across "
               rf"{result['timing']['rounds']} interleaved rounds; the step at which kvpress first attends over "
               r"other tokens than ours; sinks still held at the end.")
    lines = [r"\newcommand{\KvpressTable}{%", r"\begin{table}", r"\centering", r"\small", rf"\caption{{{caption}}}",
             rf"\label{{{label}}}", r"\begin{tabular}{rlrrrrr}", r"\toprule",
             r"$R$ & cache & NLL & ms & $\times$ floor & differs at & sinks \\", r"\midrule"]
    for row in result["rates"]:
        for side, name in (("ours", "ours"), ("kvpress", "kvpress")):
            step = row["first_held_difference_step"] if side == "kvpress" else None
            lines.append(rf"{row['R']} & {name} & {fmt(row['nll'][side], 3)} & {fmt(row['tpot_ms'][side], 1)} & "
                         rf"{_ratio(row['ratio_to_floor'][side])} & {'--' if step is None else step} & "
                         rf"{row['sinks_held_at_end'][side]} \\")
        lines.append(rf"{row['R']} & kvpress, sorted & {fmt(row['nll']['kvpress_sorted'], 3)} & & & "
                     rf"{'--' if row['sorted_held_identical'] else 'yes'} & \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}}"]
    return "\n".join(lines) + "\n"


def latex_macros(result: dict) -> str:
    """The section's switch and the numbers its prose quotes."""
    v = result["versions"]
    out = [r"\newif\ifhaveKvpress", r"\haveKvpresstrue"]

    def add(name: str, value) -> None:
        out.append(rf"\newcommand{{\Kvpress{name}}}{{{value}}}")

    add("Version", tex_escape(v["kvpress"].get("kvpress")))
    add("Transformers", tex_escape(v["kvpress"]["transformers"]))
    add("OursTransformers", tex_escape(v["ours"]["transformers"]))
    add("Model", model_name(result.get("model_source"), result["model"])[0])
    add("Budget", result["budget"])
    add("Sinks", result["n_sink"])
    add("Steps", result["steps"])
    add("Rounds", result["timing"]["rounds"])
    add("Rates", and_list([f"$R={r['R']}$" for r in result["rates"]]))
    add("NoEvictionMaxDiff", sci(result["no_eviction"]["max_abs_dnll"]))
    low, high = (fmt(result["provenance"][f"load_1min_{k}"], 1) for k in ("min", "max"))
    add("Load", low if low == high else f"{low}--{high}")
    add("CpuCount", result["provenance"].get("cpu_count") or "--")
    rows = result["rates"]
    add("KeptSentences", " ".join(kept_sentence(row, result["n_sink"]) for row in rows))
    add("NllSentence", "Mean decode NLL in nats: " + "; ".join(
        rf"at $R={row['R']}$, kvpress {fmt(row['nll']['kvpress'], 2)}, ours {fmt(row['nll']['ours'], 2)} and kvpress "
        rf"with its kept indices sorted {fmt(row['nll']['kvpress_sorted'], 2)}" for row in rows) + ".")
    add("RatioSentence", "Time per token relative to each side's own floor: " + "; ".join(
        rf"at $R={row['R']}$, ours {_ratio(row['ratio_to_floor']['ours'])} and kvpress "
        rf"{_ratio(row['ratio_to_floor']['kvpress'])}" for row in rows) + ".")
    add("TimingSentences", " ".join(timing_sentence(row) for row in rows))
    return "\n".join(out) + "\n"


def switch_off() -> str:
    """The macros file of a run whose config names no kvpress result: the section stays out."""
    return "\\newif\\ifhaveKvpress\n\\haveKvpressfalse\n"

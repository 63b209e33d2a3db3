"""The tables that describe the run rather than rank its policies: the presets' configuration (`presets.tex`),
the setup read from provenance (`setup.tex`) and the original study's published numbers beside ours
(`reproduction.tex`)."""

from __future__ import annotations

from typing import Any, Mapping

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy
from kvstream.study import published
from kvstream.study.bootstrap import CI_LEVEL
from kvstream.study.latex import KNOB_TEX, finite, fmt, fmt_knob, tex_escape
from kvstream.study.roles import KIND_NAMES, PaperPolicies, ablation_cell, ablation_corner, first_with_role
from kvstream.study.wording import dataset_name, model_name

RESIZE = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
QUALITY = "decode_ppl_increase_percent"  # the primary quality figure; all targets beside it


def mixed_code_text(aggs) -> str:
    """A sentence for a caption when some aggregate pooled cells of different code versions (allowed by
    eval.allow_mixed_code; kvstream.study.verify), else ''."""
    notes = [a["code_note"] for a in aggs if a and a.get("code_note")]
    return "".join(rf" \textbf{{Mixed code:}} {tex_escape(n)}." for n in dict.fromkeys(notes))


def memory_kind_words(agg: Mapping) -> str:
    kinds = {r.get("memory_kind") for r in agg["policies"].values()}
    if kinds == {"cuda_max_allocated"}:
        return "CUDA max. allocated during decode"
    if kinds == {"process_peak_rss"}:
        return "process peak RSS (CPU run; includes the model and the Python process)"
    return "/".join(sorted(str(k) for k in kinds))


def memory_column(*aggs: Mapping | None) -> bool:
    """Whether peak memory says something here: only the CUDA allocator's peak resolves a cache's size (a CPU
    process's peak RSS is the model and the interpreter), and only where the rows differ."""
    rows = [r for a in aggs if a for r in a["policies"].values()]
    values = [r.get("peak_memory_mb") for r in rows if finite(r.get("peak_memory_mb"))]
    return (bool(rows) and {r.get("memory_kind") for r in rows} == {"cuda_max_allocated"}
            and len(values) > 1 and max(values) - min(values) >= 1.0)


# ------------------------------------------------------------------------------------------ presets
def row_band(r: Mapping) -> tuple[int, int, int] | None:
    """(r, C + r, C + R) of an aggregate row whose kind evicts: kvstream.schedule.Policy.band at the budget the
    cells recorded (the saw-tooth of docs/method.md, "The `sink` schedule"); None for recompute and dense."""
    if r.get("type") in ("recompute", "dense") or not finite(r.get("budget")):
        return None
    window = r.get("type") == "window"  # R = 1, no slack, no cap: its block may leave them out
    knobs = {k: r.get(k) for k in ("compress_every", "cache_slack", "max_drop")}
    if window:
        knobs = {"compress_every": 1, "cache_slack": 0, "max_drop": None}
    try:
        policy = Policy("sink", n_sink=0, window_size=int(r["budget"]), **knobs).resolved()
    except KVStreamError:  # a row without its knobs: no band to show
        return None
    return (policy.kept_overflow, *policy.band)


def band_cell(r: Mapping) -> str:
    """The table cell `r: [C + r, C + R]` of a row; for recompute its window, for dense its measured span."""
    band = row_band(r)
    if band is not None:
        return rf"{fmt(band[0], 0)}: [{fmt(band[1], 0)}, {fmt(band[2], 0)}]"
    if r.get("type") == "recompute":
        return rf"{fmt(r.get('max_forward_len'), 0)} (window)"
    return rf"[{fmt(r.get('trace_min'), 0)}, {fmt(r.get('trace_max'), 0)}] (grows)"


BAND_HEAD = r"$r$: band $[C{+}r, C{+}R]$"
BAND_WORDS = (r"$r$: the overflow an event leaves, $\min(\sigma,\max(R-\delta,0))$ ($\delta=\infty$: 0); "
              r"band: the cache saw-tooths between $C+r$ and $C+R$ tokens, so a decode forward attends over "
              r"$C+r+1$ to $C+R$ (for recomputation its window, for the dense cache the span it grows over).")


def presets_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    """The main experiment's policies with every knob as the cells record it (the config's values, resolved:
    budget C and, in budget mode cap, the derived window W)."""
    main = first_with_role(aggs, "main") or next(iter(aggs.values()), None)
    rows = [main["policies"][p] for p in main["policies_order"]] if main else []
    head = " & ".join(KNOB_TEX[k] for k in ("n_sink", "window_size"))
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{The policies of the main comparison, with the knobs their cells record (the configuration, "
        r"resolved): $S$ sinks, $W$ window, budget $C=S+W$, pruning interval $R$, slack $\sigma$, max-drop "
        r"$\delta$ ($\infty$: no cap), budget mode; " + BAND_WORDS + r" A knob a kind does not use is shown as --.}",
        r"\label{tab:presets}",
        RESIZE,
        r"\begin{tabular}{@{}llrrrrrrll@{}}",
        r"\toprule",
        rf"Method & Kind & {head} & $C$ & $R$ & $\sigma$ & $\delta$ & Mode & {BAND_HEAD} \\",
        r"\midrule",
    ]
    for r in rows:
        evicts = r.get("type") not in ("recompute", "dense")
        sink = r.get("type") not in ("recompute", "dense", "window")
        lines.append(" & ".join([
            tex_escape(r["label"]) + (" (reference)" if r.get("is_reference") else ""),
            tex_escape(KIND_NAMES.get(r.get("type"), r.get("type"))).split(" (")[0],
            fmt_knob(r.get("n_sink")) if sink else "--",
            fmt_knob(r.get("window_size")) if evicts else "--",
            fmt(r.get("budget"), 0) if evicts else "--",
            fmt_knob(r.get("compress_every")) if sink else "--",
            fmt_knob(r.get("cache_slack")) if sink else "--",
            fmt_knob(r.get("max_drop")) if sink else "--",
            tex_escape(r.get("budget_mode") or "--") if sink else "--",
            band_cell(r)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ reproduction
def _published_policy(row: Mapping, main: Mapping | None, paper: PaperPolicies) -> dict:
    """Our row for one of the original's main rows: the reference, or the policy with that paper stem."""
    if not main:
        return {}
    if row.get("reference"):
        return main["policies"].get(main.get("reference"), {})
    pol = next((p for p in main["policies_order"] if row.get("stem") and paper.stems.get(p) == row["stem"]), None)
    return main["policies"].get(pol, {}) if pol else {}


def _numbers(o: Mapping, r: Mapping, memory: bool) -> list[str]:
    cells = [fmt(o.get("speedup")), fmt(r.get("speedup")), fmt(o.get("tpot_ms"), 1), fmt(r.get("tpot_ms"), 1),
             fmt(o.get("ppl_increase_percent"), 2, signed=True), fmt(r.get("ppl_increase_percent"), 2, signed=True),
             fmt(r.get(QUALITY), 2, signed=True)]
    return cells + ([fmt(o.get("peak_memory_mb"), 0), fmt(r.get("peak_memory_mb"), 0)] if memory else [])


def reproduction_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    """Our numbers (the main and ablation experiments) beside the original study's published ones."""
    main, abl = first_with_role(aggs, "main"), first_with_role(aggs, "ablation")
    paper = PaperPolicies.from_config(config)
    memory = memory_column(main)
    width = 8 + (2 if memory else 0)
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Reproduction: the original study's \emph{published} numbers (``orig.'', " + published.setup_text()
        + r"; copied from its report) beside ours (``ours'', this run, Table~\ref{tab:setup}). The original "
        r"reported the PPL increase over all targets; ours is shown that way and over decode targets only. Model, "
        r"data, scale and hardware differ, so only directions and orders of magnitude are comparable."
        + ("" if memory else r" Peak memory is left out: ours is a CPU process's peak, which does not resolve "
           r"the cache.") + mixed_code_text([main, abl]) + "}",
        r"\label{tab:reproduction}",
        RESIZE,
        rf"\begin{{tabular}}{{@{{}}l{'r' * (width - 1)}@{{}}}}",
        r"\toprule",
        r" & \multicolumn{2}{c}{Speedup} & \multicolumn{2}{c}{TPOT (ms)} & \multicolumn{3}{c}{PPL inc.\ (\%)}"
        + (r" & \multicolumn{2}{c}{Peak mem.\ (MB)}" if memory else "") + r" \\",
        r"\cmidrule(lr){2-3}\cmidrule(lr){4-5}\cmidrule(lr){6-8}" + (r"\cmidrule(l){9-10}" if memory else ""),
        r"Method & orig. & ours & orig. & ours & orig.\ all & ours all & ours dec." + (" & orig. & ours" if memory else "")
        + r" \\",
        r"\midrule",
    ]
    for o in published.main_rows():
        r = _published_policy(o, main, paper)
        differs = bool(r) and any(r.get(k) != v for k, v in (o.get("params") or {}).items())
        shown = tex_escape(r["label"]) if r.get("label") else "``" + tex_escape(o["label"]) + "''"
        if differs:
            shown += r" {\scriptsize(knobs differ from the original's)}"
        lines.append(" & ".join([shown, *_numbers(o, r, memory)]) + r" \\")
    lines.append(r"\midrule")
    lines.append(rf"\multicolumn{{{width}}}{{@{{}}l}}{{\emph{{Ablation at $R={published.facts()['OrigAblR']}$}} "
                 r"($\sigma$, $\delta$)} \\")
    for o in published.ablation_rows():
        sigma, delta = o["cache_slack"], o["max_drop"]
        r = ablation_cell(abl, sigma, delta) or ablation_corner(abl, sigma > 0, delta is not None) or {}
        shown = rf"$\sigma={sigma}$, $\delta=" + (r"\infty" if delta is None else str(delta)) + "$"
        if r and (r.get("cache_slack") != sigma or r.get("max_drop") != delta):
            shown += (rf" {{\scriptsize(ours: $\sigma={fmt_knob(r.get('cache_slack'))}$, "
                      rf"$\delta={fmt_knob(r.get('max_drop')).strip('$')}$)}}")
        lines.append(" & ".join([shown, *_numbers(o, r, memory)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- setup
def merged_provenance(aggs: Mapping[str, Mapping]) -> dict:
    """Every distinct provenance value over all experiments, their models and bootstrap sizes."""
    out: dict[str, list] = {}
    n_boot = set()
    for agg in aggs.values():
        for k, vals in (agg.get("provenance") or {}).items():
            if isinstance(vals, list):
                for v in vals:
                    if v not in out.setdefault(k, []):
                        out[k].append(v)
        if agg.get("n_boot"):
            n_boot.add(agg["n_boot"])
        if agg.get("model") and agg["model"] not in out.setdefault("model_label", []):
            out["model_label"].append(agg["model"])
    res: dict[str, Any] = dict(out)
    res["n_boot"] = ", ".join(str(x) for x in sorted(n_boot)) if n_boot else "--"
    return res


def speed_runs(aggs: Mapping[str, Mapping]) -> list[dict]:
    """The speed runs the aggregates took their TPOT from, each once (by its result file)."""
    seen: dict[str, dict] = {}
    for agg in aggs.values():
        sp = agg.get("speed") or {}
        if sp:
            seen.setdefault(str(sp.get("path") or sp.get("started_at")), sp)
    return list(seen.values())


def setup_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    prov = merged_provenance(aggs)
    config = config or {}
    ev = config.get("eval", {})
    model = config.get("model", {})
    datasets = config.get("datasets", {})
    name, weights = model_name(model.get("source"), ", ".join(prov.get("model_label") or [model.get("name") or "--"]))

    def j(vals):
        return tex_escape(", ".join(str(v) for v in vals)) if vals else "--"

    speed = "; ".join(
        f"{tex_escape(sp.get('execution'))} on {tex_escape(sp.get('device_name'))}, {sp.get('rounds')} rounds, "
        f"{sp.get('threads')} threads, commit {tex_escape(str(sp.get('git_commit') or '--')[:12])}, started "
        f"{tex_escape(sp.get('started_at') or '--')}" for sp in speed_runs(aggs)) or "--"
    rows = [
        ("Model", name),
        ("Weights", weights),
        ("Texts", "; ".join(f"{dataset_name(v.get('source'), k)}: {v.get('n_samples')} samples of "
                            f"{v.get('tokens_per_sample')} tokens" for k, v in datasets.items()) or "--"),
        ("Tokens per sample (measured)", j(prov.get("n_tokens"))),
        ("Cap (recompute window)", j([ev.get("cap")]) if ev.get("cap") is not None else "--"),
        ("Positions", j([ev.get("positions")]) if ev.get("positions") else "--"),
        ("Warm-up decode steps", j([ev.get("warmup")]) if ev.get("warmup") is not None else "--"),
        ("dtype", j([str(d).replace("torch.", "") for d in prov.get("dtype") or []])),
        ("Device", j(prov.get("device_name") or prov.get("device"))),
        ("CPU cores visible", j(prov.get("cpu_count"))),
        ("Torch threads per eval job", j(prov.get("threads"))),
        ("torch / transformers / Python", j(["/".join([", ".join(map(str, prov.get("torch") or ["?"])),
                                                     ", ".join(map(str, prov.get("transformers") or ["?"])),
                                                     ", ".join(map(str, prov.get("python") or ["?"]))])])),
        ("Code commit of the cells", j([c[:12] for c in prov.get("git_commit") or []]) +
         (r" (uncommitted changes)" if True in (prov.get("git_dirty") or []) else "")),
        ("Code version of the cells", j(sorted({v for a in aggs.values() for v in a.get("code_versions") or []}))),
        ("Speed runs (TPOT)", speed),
        ("Bootstrap", f"{int(CI_LEVEL * 100)}\\,\\% percentile, {prov.get('n_boot', '--')} resamples over samples"),
    ]
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Setup, read from the provenance recorded in every result cell and speed run, and from the run's "
        r"configuration." + mixed_code_text(aggs.values()) + "}",
        r"\label{tab:setup}",
        r"\begin{tabular}{@{}lp{0.68\linewidth}@{}}",
        r"\toprule",
    ]
    lines += [rf"{a} & {b} \\" for a, b in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)

"""LaTeX tables (booktabs) of the study: one per experiment (its layout from its role; a zoo's rows from
`zoo`), the reproduction table (ours beside the original's published numbers) and the setup table (from
provenance and config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvstream.study import published
from kvstream.study.bootstrap import CI_LEVEL
from kvstream.study.latex import (KNOB_TEX, KNOB_WORDS, fmt, fmt_ci, fmt_knob, ordinal, table_label, tex_escape,
                                  write_text)
from kvstream.study.roles import (PaperPolicies, ablation_cell, ablation_corner, first_with_role, role, sweep_knob,
                                  varying_knobs)
from kvstream.study.zoo import zoo_caption, zoo_table_body

_RESIZE = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"


def _caption_common(agg: Mapping) -> str:
    n = agg["n_samples"]
    ref = agg.get("reference") or "none"
    every = agg.get("recompute_every") or 1
    paired = (rf"PPL increase pairs each target with \texttt{{{tex_escape(ref)}}}'s on the same samples"
              + (rf", on every {ordinal(every)} decode target (the ones the reference scores)" if every > 1 else "") + ".")
    ci = (rf"Brackets for PPL: {int(agg['ci_level'] * 100)}\,\% percentile-bootstrap interval over the {n} samples "
          rf"({agg['n_boot']} resamples" + (", paired targets resampled within each" if every > 1 else "") + ")."
          if agg.get("n_boot") else rf"{n} sample: no PPL interval can be estimated.")
    sp = agg.get("speed") or {}
    if sp:
        speed = (r"TPOT: mean ms per token over whole eviction periods in one interleaved speed run "
                 rf"({tex_escape(sp.get('execution'))}, batch 1, {sp.get('rounds')} rounds, {sp.get('threads')} "
                 + ("thread" if sp.get("threads") == 1 else "threads") + "); "
                 r"TPOT and speedup brackets: 95\,\% $t$-intervals across the rounds.")
    else:
        speed = "No speed run: no TPOT."
    samples = "1 sample" if n == 1 else f"{n} samples"
    where = ("over the paired targets (all prefill targets and the reference's decode targets)" if every > 1
             else "over all targets")
    return (rf"{tex_escape(agg.get('model'))} on {tex_escape(agg.get('dataset'))}, {samples}, pooled PPL {where}. "
            rf"{paired} {ci} {speed}" + mixed_code_text([agg]))


def mixed_code_text(aggs) -> str:
    """A sentence for a caption when some aggregate pooled cells of different code versions (allowed by
    eval.allow_mixed_code; kvstream.study.verify), else ''."""
    notes = [a["code_note"] for a in aggs if a and a.get("code_note")]
    return "".join(rf" \textbf{{Mixed code:}} {tex_escape(n)}." for n in dict.fromkeys(notes))


def _sorted_rows(agg: Mapping, key: str | None = None) -> list[dict]:
    rows = [agg["policies"][p] for p in agg["policies_order"]]
    if key is None:
        return rows
    ref = [r for r in rows if r.get("is_reference")]
    rest = [r for r in rows if not r.get("is_reference")]

    def k(r):
        v = r.get(key)
        return float("inf") if v is None else float(v)

    return ref + sorted(rest, key=k)


def table_main(agg: Mapping) -> str:
    """One row per policy: speedup, TPOT, PPL and its increase, max. forward length, peak memory."""
    lines = [
        r"\begin{tabular}{@{}lrrrrrrr@{}}",
        r"\toprule",
        r"Method & Speedup & TPOT (ms) & PPL & PPL inc.\ (\%) & Dec.\ PPL inc.\ (\%) & Max.\ $L$ & Peak mem.\ (MB) \\",
        r"\midrule",
    ]
    for r in _sorted_rows(agg):
        ref = r.get("is_reference")
        lines.append(" & ".join([
            tex_escape(r["label"]),
            fmt(1.0) + r" (ref.)" if ref else fmt_ci(r, "speedup"),
            fmt_ci(r, "tpot_ms", 1),
            fmt(r.get("ppl")),
            fmt(0.0) + r" (ref.)" if ref else fmt_ci(r, "ppl_increase_percent", 2, signed=True),
            fmt(0.0) + r" (ref.)" if ref else fmt_ci(r, "decode_ppl_increase_percent", 2, signed=True),
            fmt(r.get("trace_max"), 0),
            fmt(r.get("peak_memory_mb"), 0),
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def table_knobs(agg: Mapping, knobs: Sequence[str], sort_key: str | None = None) -> str:
    """One row per policy with the given knobs in the first columns (a sink policy's values; another
    kind of policy spans them with its label)."""
    head = " & ".join(KNOB_TEX[k] for k in knobs)
    cols = "l" * len(knobs)
    lines = [
        rf"\begin{{tabular}}{{@{{}}{cols}rrrrrrr@{{}}}}",
        r"\toprule",
        rf"{head} & $C$ & Max.\ $L$ & Speedup & TPOT (ms) & PPL & PPL inc.\ (\%) & Dec.\ inc.\ (\%) \\",
        r"\midrule",
    ]
    for r in _sorted_rows(agg, sort_key):
        if r.get("is_reference"):
            first = rf"\multicolumn{{{len(knobs) + 1}}}{{@{{}}l}}{{{tex_escape(r['label'])} (reference)}}"
            lines.append(" & ".join([first, fmt(r.get("trace_max"), 0), fmt(1.0), fmt_ci(r, "tpot_ms", 1),
                                     fmt(r.get("ppl")), fmt(0.0), fmt(0.0)]) + r" \\")
            lines.append(r"\midrule")
            continue
        if r.get("type") != "sink":
            knobcells = [rf"\multicolumn{{{len(knobs)}}}{{@{{}}l}}{{{tex_escape(r['label'])}}}"]
        else:
            knobcells = [fmt_knob(r.get(k)) for k in knobs]
        lines.append(" & ".join(knobcells + [
            fmt(r.get("budget"), 0),
            fmt(r.get("trace_max"), 0),
            fmt_ci(r, "speedup"),
            fmt_ci(r, "tpot_ms", 1),
            fmt(r.get("ppl")),
            fmt_ci(r, "ppl_increase_percent", 2, signed=True),
            fmt_ci(r, "decode_ppl_increase_percent", 2, signed=True),
        ]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def _fixed_knobs_text(agg: Mapping, vary: Sequence[str]) -> str:
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    parts = []
    for k in ("n_sink", "window_size", "compress_every", "cache_slack", "max_drop"):
        if k in vary:
            continue
        vals = {fmt_knob(r.get(k)) for r in rows}
        if len(vals) == 1:
            parts.append(f"{KNOB_TEX[k]}$\\,=\\,${vals.pop()}")
    return ", ".join(parts)


def memory_kind_words(agg: Mapping) -> str:
    kinds = {r.get("memory_kind") for r in agg["policies"].values()}
    if kinds == {"cuda_max_allocated"}:
        return "CUDA max. allocated during decode"
    if kinds == {"process_peak_rss"}:
        return "process peak RSS (CPU run; includes the model and the Python process)"
    return "/".join(sorted(str(k) for k in kinds))


def experiment_table(agg: Mapping, experiment: str) -> str:
    """The complete `table` float for one experiment: an ablation shows slack and max-drop first, a sweep
    its knob (sorted by it), a zoo one block per peak length and R, any other role one row per policy."""
    kind = role(agg)
    common = _caption_common(agg)
    label = table_label(experiment)
    if kind == "ablation":
        knobs = ["cache_slack", "max_drop"] + [k for k in varying_knobs(agg) if k not in ("cache_slack", "max_drop")]
        body = table_knobs(agg, knobs)
        fixed = _fixed_knobs_text(agg, knobs)
        title = rf"Slack/max-drop ablation (\texttt{{{tex_escape(experiment)}}}), {fixed}."
        extra = (r" $C$: budget $S+W$; Max.\ $L$: largest measured forward length; Dec.\ inc.: PPL increase over "
                 r"decode targets only; $\delta=\infty$: no cap.")
    elif kind == "sweep":
        knob = sweep_knob(agg) or "compress_every"
        knobs = [knob] + [k for k in varying_knobs(agg) if k != knob and not (knob == "n_sink" and k == "window_size")]
        body = table_knobs(agg, knobs, sort_key=knob)
        fixed = _fixed_knobs_text(agg, knobs + (["window_size"] if knob == "n_sink" else []))
        title = rf"Sweep of the {KNOB_WORDS.get(knob, knob)} (\texttt{{{tex_escape(experiment)}}}), {fixed}."
        extra = r" $C$: budget $S+W$; Max.\ $L$: largest measured forward length; Dec.\ inc.: PPL increase over decode targets only."
    elif kind == "zoo":
        body = zoo_table_body(agg)
        title, extra = zoo_caption(agg, experiment)
        extra += r" Peak memory: " + tex_escape(memory_kind_words(agg)) + "."
    else:
        body = table_main(agg)
        title = (rf"Main results (\texttt{{{tex_escape(experiment)}}})." if kind == "main" else
                 rf"Results of experiment \texttt{{{tex_escape(experiment)}}}.")
        extra = (r" Dec.\ PPL inc.: the same over decode targets only (after the prefill targets, which every policy "
                 r"scores alike). Max.\ $L$: the largest number of tokens a decode forward attended over (measured). "
                 r"Peak memory: " + tex_escape(memory_kind_words(agg)) + ".")
    return "\n".join([
        r"\begin{table}",
        r"\centering\small",
        rf"\caption{{{title} {common}{extra}}}",
        rf"\label{{{label}}}",
        _RESIZE,
        body + "}",
        r"\end{table}",
        "",
    ])


def _published_policy(row: Mapping, main: Mapping | None, paper: PaperPolicies) -> dict:
    """Our row for one of the original's main rows: the reference, or the policy with that paper stem."""
    if not main:
        return {}
    if row.get("reference"):
        return main["policies"].get(main.get("reference"), {})
    pol = next((p for p in main["policies_order"] if row.get("stem") and paper.stems.get(p) == row["stem"]), None)
    return main["policies"].get(pol, {}) if pol else {}


def reproduction_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    """Our numbers (the main and ablation experiments) beside the original study's published ones."""
    main, abl = first_with_role(aggs, "main"), first_with_role(aggs, "ablation")
    paper = PaperPolicies.from_config(config)
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Reproduction: the original study's \emph{published} numbers (``orig.'', " + published.setup_text()
        + r"; copied from its report) beside ours (``ours'', this run: "
        + (tex_escape((main or abl or {}).get("model")) if (main or abl) else "--")
        + r", see Table~\ref{tab:setup}). Model, data, scale and hardware differ, so only directions "
        r"and orders of magnitude are comparable; memory in particular measures different things."
        + mixed_code_text([main, abl]) + "}",
        r"\label{tab:reproduction}",
        _RESIZE,
        r"\begin{tabular}{@{}lrrrrrrrr@{}}",
        r"\toprule",
        r" & \multicolumn{2}{c}{Speedup} & \multicolumn{2}{c}{TPOT (ms)} & \multicolumn{2}{c}{PPL inc.\ (\%)}"
        r" & \multicolumn{2}{c}{Peak mem.\ (MB)} \\",
        r"\cmidrule(lr){2-3}\cmidrule(lr){4-5}\cmidrule(lr){6-7}\cmidrule(l){8-9}",
        r"Method & orig. & ours & orig. & ours & orig. & ours & orig. & ours \\",
        r"\midrule",
    ]
    for o in published.main_rows():
        r = _published_policy(o, main, paper)
        ours = r.get("label")
        differs = bool(r) and any(r.get(k) != v for k, v in (o.get("params") or {}).items())
        shown = tex_escape(o["label"]) + (rf" {{\scriptsize(ours: {tex_escape(ours)})}}" if differs and ours else "")
        lines.append(" & ".join([
            shown, fmt(o["speedup"]), fmt(r.get("speedup")), fmt(o["tpot_ms"], 1), fmt(r.get("tpot_ms"), 1),
            fmt(o["ppl_increase_percent"], 2, signed=True), fmt(r.get("ppl_increase_percent"), 2, signed=True),
            fmt(o["peak_memory_mb"], 0), fmt(r.get("peak_memory_mb"), 0)]) + r" \\")
    lines.append(r"\midrule")
    lines.append(r"\multicolumn{9}{@{}l}{\emph{Ablation at $R=32$, $S=32$} ($\sigma$, $\delta$)} \\")
    for o in published.ablation_rows():
        sigma, delta = o["cache_slack"], o["max_drop"]
        r = ablation_cell(abl, sigma, delta) or ablation_corner(abl, sigma > 0, delta is not None) or {}
        shown = rf"$\sigma={sigma}$, $\delta=" + (r"\infty" if delta is None else str(delta)) + "$"
        if r and (r.get("cache_slack") != sigma or r.get("max_drop") != delta):
            shown += (rf" {{\scriptsize(ours: $\sigma={fmt_knob(r.get('cache_slack'))}$, "
                      rf"$\delta={fmt_knob(r.get('max_drop')).strip('$')}$)}}")
        lines.append(" & ".join([
            shown,
            fmt(o["speedup"]), fmt(r.get("speedup")), fmt(o["tpot_ms"], 1), fmt(r.get("tpot_ms"), 1),
            fmt(o["ppl_increase_percent"], 2, signed=True), fmt(r.get("ppl_increase_percent"), 2, signed=True),
            "--", "--"]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)


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


def setup_table(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    prov = merged_provenance(aggs)
    config = config or {}
    ev = config.get("eval", {})
    model = config.get("model", {})
    datasets = config.get("datasets", {})

    def j(vals):
        return tex_escape(", ".join(str(v) for v in vals)) if vals else "--"

    rows = [
        ("Model", j(prov.get("model_label") or [model.get("name")])),
        ("Model source", j([model.get("source")]) if model.get("source") else "--"),
        ("Datasets", j([f"{k} ({v.get('source', k)}): {v.get('n_samples')} samples x "
                        f"{v.get('tokens_per_sample')} tokens" for k, v in datasets.items()])),
        ("Tokens per sample (measured)", j(prov.get("n_tokens"))),
        ("Cap (recompute window)", j([ev.get("cap")]) if ev.get("cap") is not None else "--"),
        ("Positions", j([ev.get("positions")]) if ev.get("positions") else "--"),
        ("Warm-up decode steps", j([ev.get("warmup")]) if ev.get("warmup") is not None else "--"),
        ("dtype", j([str(d).replace("torch.", "") for d in prov.get("dtype") or []])),
        ("Device", j(prov.get("device_name") or prov.get("device"))),
        ("CPU cores visible", j(prov.get("cpu_count"))),
        ("Torch threads per job", j(prov.get("threads"))),
        ("torch / transformers / Python", j(["/".join([", ".join(map(str, prov.get("torch") or ["?"])),
                                                     ", ".join(map(str, prov.get("transformers") or ["?"])),
                                                     ", ".join(map(str, prov.get("python") or ["?"]))])])),
        ("Code commit", j([c[:12] for c in prov.get("git_commit") or []]) +
         (r" (uncommitted changes)" if True in (prov.get("git_dirty") or []) else "")),
        ("Code version of the cells", j(sorted({v for a in aggs.values() for v in a.get("code_versions") or []}))),
        ("Bootstrap", f"{int(CI_LEVEL * 100)}\\,\\% percentile, {prov.get('n_boot', '--')} resamples over samples"),
    ]
    lines = [
        r"\begin{table}",
        r"\centering\small",
        r"\caption{Setup, read from the provenance recorded in every result cell and from the run's configuration."
        + mixed_code_text(aggs.values()) + "}",
        r"\label{tab:setup}",
        r"\begin{tabular}{@{}ll@{}}",
        r"\toprule",
    ]
    lines += [rf"{a} & {b} \\" for a, b in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_tables(aggs: Mapping[str, Mapping], out_dir: str | os.PathLike, config: Mapping | None = None) -> list[Path]:
    """{experiment}.tex for every experiment, reproduction.tex and setup.tex."""
    out_dir = Path(out_dir)
    written = []
    for exp, agg in aggs.items():
        p = out_dir / f"{exp}.tex"
        write_text(p, experiment_table(agg, exp))
        written.append(p)
    for name, text in (("reproduction", reproduction_table(aggs, config)), ("setup", setup_table(aggs, config))):
        p = out_dir / f"{name}.tex"
        write_text(p, text)
        written.append(p)
    return written

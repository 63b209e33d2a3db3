"""LaTeX tables (booktabs) of the study: one per experiment, its layout from its role (a zoo's rows from `zoo`),
and the tables that describe the run (`setup_tables`: presets, setup, reproduction).

Quality is the PPL increase over decode targets, the all-target increase beside it for comparison with the
original study (which reported that); the reference appears once per experiment (a row of the main table,
the caption of the others); peak memory only where it resolves the cache (`setup_tables.memory_column`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from kvstream.study.latex import KNOB_TEX, KNOB_WORDS, fmt, fmt_ci, fmt_knob, ordinal, table_label, tex_escape, write_text
from kvstream.study.roles import role, sweep_knob, varying_knobs
from kvstream.study.setup_tables import BAND_HEAD, BAND_WORDS, band_cell
from kvstream.study.setup_tables import (RESIZE, memory_column, memory_kind_words, mixed_code_text, presets_table,
                                         reproduction_table, setup_table)
from kvstream.study.wording import interval_words, plural
from kvstream.study.zoo import zoo_caption, zoo_table_body

QUALITY = "decode_ppl_increase_percent"
ALL_TARGETS = "ppl_increase_percent"
_TITLES = {"main": "Main results.", "peak_matched": r"The presets at equal peak length (budget mode \texttt{cap}).",
           "sanity": "The main presets on a second text.", "other": "Further policies."}


def _tokens(agg: Mapping) -> str:
    tokens = [t for t in (agg.get("provenance") or {}).get("n_tokens") or [] if t is not None]
    return ", ".join(str(t) for t in tokens) or "--"


def quality_caption(agg: Mapping) -> str:
    """What the quality columns mean, over how many samples, against which reference."""
    n, every = int(agg["n_samples"]), int(agg.get("recompute_every") or 1)
    ref = agg["policies"].get(agg.get("reference") or "", {})
    rows = [r for r in agg["policies"].values() if not r.get("is_reference")]
    paired = rows[0].get("paired_targets") if rows else None
    pairing = (rf" (the reference scores every {ordinal(every)} decode target: "
               rf"{fmt(paired / n, 0) if paired else '--'} per sample)" if every > 1 else "")
    return (rf"{plural(n, 'sample')} of {_tokens(agg)} tokens. Dec.\ inc.: the perplexity increase over decode "
            rf"targets, each paired with {tex_escape(ref.get('label') or 'the reference')}'s on the same target"
            rf"{pairing}; all inc.: the same over all targets, prefill targets included (which every policy scores "
            rf"alike; as the original study reported it). Brackets for quality: {interval_words(n, agg.get('n_boot'))}.")


def speed_caption(agg: Mapping) -> str:
    sp = agg.get("speed") or {}
    if not sp:
        return "No speed run: no TPOT."
    threads = sp.get("threads")
    return (r"Speedup: the reference's time per token (TPOT: mean ms over whole eviction periods, eviction steps "
            rf"included, in one interleaved speed run: {tex_escape(sp.get('execution'))}, batch 1, "
            rf"{plural(threads, 'thread') if isinstance(threads, int) else '--'}) over the policy's; brackets: "
            rf"95\,\% $t$-intervals across the {sp.get('rounds')} rounds.")


def reference_caption(agg: Mapping) -> str:
    ref = agg["policies"].get(agg.get("reference") or "", {})
    if not ref:
        return ""
    return (rf" Reference: {tex_escape(ref.get('label'))}, decode PPL {fmt(ref.get('decode_ppl'))}, "
            rf"TPOT {fmt(ref.get('tpot_ms'), 1)}\,ms.")


def _sorted_rows(agg: Mapping, key: str | None = None, reference: bool = True) -> list[dict]:
    rows = [agg["policies"][p] for p in agg["policies_order"]]
    ref = [r for r in rows if r.get("is_reference")] if reference else []
    rest = [r for r in rows if not r.get("is_reference")]
    if key is not None:
        rest.sort(key=lambda r: float("inf") if r.get(key) is None else float(r[key]))
    return ref + rest


def table_main(agg: Mapping) -> str:
    """One row per policy, the reference first: speedup, TPOT, decode PPL, its increase and the all-target
    increase, the longest measured forward (and peak memory where it says something)."""
    memory = memory_column(agg)
    lines = [
        r"\begin{tabular}{@{}lrrrrrr" + ("r" if memory else "") + "@{}}",
        r"\toprule",
        r"Method & Speedup & TPOT (ms) & Dec.\ PPL & Dec.\ inc.\ (\%) & All inc.\ (\%) & Max.\ $L$"
        + (r" & Peak mem.\ (MB)" if memory else "") + r" \\",
        r"\midrule",
    ]
    for r in _sorted_rows(agg):
        ref = r.get("is_reference")
        lines.append(" & ".join([
            tex_escape(r["label"]) + (" (reference)" if ref else ""),
            fmt(1.0) if ref else fmt_ci(r, "speedup"),
            fmt_ci(r, "tpot_ms", 1),
            fmt_ci(r, "decode_ppl"),
            fmt(0.0) if ref else fmt_ci(r, QUALITY, 2, signed=True),
            fmt(0.0) if ref else fmt_ci(r, ALL_TARGETS, 2, signed=True),
            fmt(r.get("trace_max"), 0),
        ] + ([fmt(r.get("peak_memory_mb"), 0)] if memory else [])) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def table_knobs(agg: Mapping, knobs: Sequence[str], sort_key: str | None = None) -> str:
    """One row per evaluated policy (the reference is in the caption) with the given knobs first (a sink
    policy's values; another kind spans them with its label); the budget C only where it varies."""
    rows = _sorted_rows(agg, sort_key, reference=False)
    budget = len({r.get("budget") for r in rows}) > 1
    head = " & ".join(KNOB_TEX[k] for k in knobs) + (r" & $C$" if budget else "")
    lines = [
        rf"\begin{{tabular}}{{@{{}}{'l' * len(knobs)}{'r' if budget else ''}lrrr@{{}}}}",
        r"\toprule",
        rf"{head} & {BAND_HEAD} & Speedup & Dec.\ inc.\ (\%) & All inc.\ (\%) \\",
        r"\midrule",
    ]
    for r in rows:
        if r.get("type") != "sink":
            knobcells = [rf"\multicolumn{{{len(knobs)}}}{{@{{}}l}}{{{tex_escape(r['label'])}}}"]
        else:
            knobcells = [fmt_knob(r.get(k)) for k in knobs]
        lines.append(" & ".join(knobcells + ([fmt(r.get("budget"), 0)] if budget else []) + [
            band_cell(r), fmt_ci(r, "speedup"), fmt_ci(r, QUALITY, 2, signed=True),
            fmt_ci(r, ALL_TARGETS, 2, signed=True)]) + r" \\")
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
    budgets = {r.get("budget") for r in rows}
    if len(budgets) == 1 and None not in budgets:
        parts.append(rf"$C={fmt(budgets.pop(), 0)}$")
    return ", ".join(parts)


def experiment_table(agg: Mapping, experiment: str) -> str:
    """The complete `table` float for one experiment: an ablation shows slack and max-drop first, a sweep
    its knob (sorted by it), a zoo one block per peak length and R, any other role one row per policy."""
    kind = role(agg)
    common = quality_caption(agg) + " " + speed_caption(agg)
    columns = r" Max.\ $L$: the largest number of tokens a decode forward attended over (measured)."
    if kind in ("ablation", "sweep"):
        if kind == "ablation":
            knobs = ["cache_slack", "max_drop"] + [k for k in varying_knobs(agg) if k not in ("cache_slack", "max_drop")]
            body = table_knobs(agg, knobs)
            title = r"Slack/max-drop ablation"
        else:
            knob = sweep_knob(agg) or "compress_every"
            knobs = [knob] + [k for k in varying_knobs(agg)
                              if k != knob and not (knob == "n_sink" and k == "window_size")]
            body = table_knobs(agg, knobs, sort_key=knob)
            title = rf"Sweep of the {KNOB_WORDS.get(knob, knob)}"
        fixed = _fixed_knobs_text(agg, knobs + (["window_size"] if "n_sink" in knobs[:1] else []))
        title += (f", {fixed}." if fixed else ".") + (r" $\delta=\infty$: no cap." if "max_drop" in knobs else "")
        extra = reference_caption(agg) + " " + BAND_WORDS
    elif kind == "zoo":
        body = zoo_table_body(agg, memory=memory_column(agg))
        title, extra = zoo_caption(agg)
        if memory_column(agg):
            extra += r" Peak memory: " + tex_escape(memory_kind_words(agg)) + "."
    else:
        body = table_main(agg)
        title = _TITLES.get(kind, _TITLES["other"])
        extra = columns + (r" Peak memory: " + tex_escape(memory_kind_words(agg)) + "." if memory_column(agg) else "")
    return "\n".join([
        r"\begin{table}",
        r"\centering\small",
        rf"\caption{{{title} {common}{extra}{mixed_code_text([agg])}}}",
        rf"\label{{{table_label(experiment)}}}",
        RESIZE,
        body + "}",
        r"\end{table}",
        "",
    ])


def write_tables(aggs: Mapping[str, Mapping], out_dir: str | os.PathLike, config: Mapping | None = None) -> list[Path]:
    """{experiment}.tex for every experiment, presets.tex, reproduction.tex and setup.tex."""
    out_dir = Path(out_dir)
    written = []
    for exp, agg in aggs.items():
        p = out_dir / f"{exp}.tex"
        write_text(p, experiment_table(agg, exp))
        written.append(p)
    for name, make in (("presets", presets_table), ("reproduction", reproduction_table), ("setup", setup_table)):
        p = out_dir / f"{name}.tex"
        write_text(p, make(aggs, config))
        written.append(p)
    return written

"""The (r, R) factorial (role `factorial`) and how much context each policy keeps (docs/method.md, "The band").

By the schedule a sink cache saw-tooths between C + r and C + R (`kvstream.schedule.Policy.band`), so slack and
max-drop act only through r. The factorial crosses sigma and delta at one R (its cells share every other knob:
kvstream.config checks it); its table gives each cell's decode PPL increase, r and mean attended length, and
marks the cells whose measured traces are one schedule (evaluated once, the others' cells reused).

`attended_rows` gathers every policy on the main text once with the mean length its decode forwards attended
over (the cells' measured trace): the figure (`factorial_figures`) and the sentences of `factorial_macros`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from kvstream.study.latex import MacroFile, finite, fmt, fmt_ci, fmt_knob, ordinal, tex_escape
from kvstream.study.roles import main_aggregate, role, with_role
from kvstream.study.setup_tables import RESIZE, row_band
from kvstream.study.wording import MIN_SAMPLES_FOR_EVIDENCE, and_list, interval_words, plural, support

METRIC = "decode_ppl_increase_percent"
LENGTH = "trace_mean"  # mean measured cache length over every decode forward of every sample
GRID_TABLE = "factorial_grid"  # paper/generated/tables/factorial_grid.tex
TABLE_LABEL = "tab:factorial-grid"
FIGURE = "attended_length"
SINK_KINDS = ("sink",)  # evict the oldest non-sink tokens: where R, sigma and delta change only the lengths


# ------------------------------------------------------------------------------------------ the grid
def factorial_aggregate(aggs: Mapping[str, Mapping]) -> tuple[str, Mapping] | None:
    """(experiment, aggregate) of the first experiment with role factorial, None without one."""
    names = with_role(aggs, "factorial")
    return (names[0], aggs[names[0]]) if names else None


def grid(agg: Mapping) -> tuple[list, list, dict]:
    """(sigmas, deltas (None, no cap, last), (sigma, delta) -> row) of a factorial's sink policies."""
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink" and not r.get("is_reference")]
    cells = {(r.get("cache_slack"), r.get("max_drop")): r for r in rows}
    sigmas = sorted({s for s, _ in cells})
    deltas = sorted({d for _, d in cells}, key=lambda d: (d is None, d or 0))
    return sigmas, deltas, cells


def schedule_groups(rows: Sequence[Mapping]) -> dict[str, str]:
    """policy -> a letter shared by the rows whose measured cache-length traces are equal on every sample (one
    schedule, evaluated once), letters in order of r; rows alone in their schedule get none."""
    by_trace: dict[tuple, list[Mapping]] = {}
    for r in rows:
        key = tuple((r.get("per_sample") or {}).get("trace_sha256") or [r["policy"]])
        by_trace.setdefault(key, []).append(r)
    shared = sorted((g for g in by_trace.values() if len(g) > 1), key=lambda g: (row_band(g[0]) or (0,))[0])
    return {r["policy"]: "abcdefghijklmnopqrstuvwxyz"[i] for i, g in enumerate(shared) for r in g}


def _fixed(agg: Mapping) -> dict:
    """The knobs every cell of the factorial shares (from its first sink row)."""
    _, _, cells = grid(agg)
    first = next(iter(cells.values()))
    return {k: first.get(k) for k in ("n_sink", "window_size", "budget", "compress_every", "budget_mode")}


def factorial_table(agg: Mapping, experiment: str) -> str:
    """The sigma x delta grid: per cell the decode PPL increase (95 % interval), r and the mean attended length,
    and a letter naming the schedule it shares with other cells."""
    sigmas, deltas, cells = grid(agg)
    letters = schedule_groups(list(cells.values()))
    f = _fixed(agg)
    head = " & ".join(rf"$\delta={fmt_knob(d).strip('$')}$" for d in deltas)
    lines = [r"\begin{tabular}{@{}l" + "c" * len(deltas) + "@{}}", r"\toprule", rf" & {head} \\", r"\midrule"]
    for s in sigmas:
        inc, band = [], []
        for d in deltas:
            r = cells.get((s, d))
            if r is None:
                inc.append("--")
                band.append("")
                continue
            mark = rf" ({letters[r['policy']]})" if r["policy"] in letters else ""
            inc.append(fmt_ci(r, METRIC, 2, signed=True))
            band.append(rf"{{\scriptsize $r={fmt((row_band(r) or ('--',))[0], 0)}$, mean $L={fmt(r.get(LENGTH), 1)}$"
                        rf"{mark}}}")
        lines.append(rf"$\sigma={fmt_knob(s)}$ & " + " & ".join(inc) + r" \\")
        lines.append(" & " + " & ".join(band) + r" \\[2pt]")
    lines += [r"\bottomrule", r"\end{tabular}"]
    groups = sorted(set(letters.values()))
    shared = (rf" Cells marked with the same letter have the same measured cache-length trace on every sample (the same "
              rf"$r$): one schedule, evaluated once and its cells reused, so their numbers are identical "
              rf"({plural(len(groups), 'such schedule')})." if groups else " No two cells share a schedule.")
    caption = (rf"The $(r, R)$ factorial: slack $\sigma$ (rows) crossed with max-drop $\delta$ (columns, $\infty$: no "
               rf"cap) at $R={fmt_knob(f['compress_every'])}$, $S={fmt_knob(f['n_sink'])}$, "
               rf"$W={fmt_knob(f['window_size'])}$ ($C={fmt(f['budget'], 0)}$, budget mode "
               rf"\texttt{{{tex_escape(f['budget_mode'])}}}). Each cell: the decode PPL increase against the reference, "
               rf"the overflow $r$ an event leaves (the cache saw-tooths between $C+r$ and $C+R$) and the mean number "
               rf"of tokens a decode forward attended over (measured).{shared} " + _quality_words(agg))
    return "\n".join([r"\begin{table}", r"\centering\small", rf"\caption{{{caption}}}", rf"\label{{{TABLE_LABEL}}}",
                      RESIZE, "\n".join(lines) + "}", r"\end{table}", ""])


def _quality_words(agg: Mapping) -> str:
    """Over how many samples and paired targets the increases are, and what their brackets are."""
    n, every = int(agg["n_samples"]), int(agg.get("recompute_every") or 1)
    ref = agg["policies"].get(agg.get("reference") or "", {})
    pairing = f" (the reference scores every {ordinal(every)} decode target)" if every > 1 else ""
    tokens = ", ".join(str(t) for t in (agg.get("provenance") or {}).get("n_tokens") or []) or "--"
    return (rf"{plural(n, 'sample')} of {tokens} tokens; the increase is over decode targets, each paired with "
            rf"{tex_escape(ref.get('label') or 'the reference')}'s on the same target{pairing}. Brackets: "
            rf"{interval_words(n, agg.get('n_boot'))}.")


def _by_r(agg: Mapping) -> list[tuple[int, list[Mapping]]]:
    """(r, the cells with that r), r ascending."""
    out: dict[int, list[Mapping]] = {}
    for r in grid(agg)[2].values():
        band = row_band(r)
        if band is not None:
            out.setdefault(band[0], []).append(r)
    return sorted(out.items())


def factorial_sentence(agg: Mapping) -> str:
    """What the grid shows, as measured: how many schedules its cells are, the increase at each r, and whether
    the ends of r differ beyond their intervals (read as evidence only with enough samples)."""
    by_r = _by_r(agg)
    n = int(agg["n_samples"])
    f = _fixed(agg)
    n_cells = sum(len(c) for _, c in by_r)
    values = and_list([rf"{fmt_ci(cs[0], METRIC, 2, signed=True)}\,\% at $r={r}$ (mean $L={fmt(cs[0].get(LENGTH), 1)}$)"
                       for r, cs in by_r])
    text = (rf"At $R={fmt_knob(f['compress_every'])}$ the {n_cells} $(\sigma,\delta)$ cells take "
            rf"{plural(len(by_r), 'value')} of $r$ ({and_list([str(r) for r, _ in by_r])}); cells with the same $r$ "
            rf"evict the same tokens at the same steps, so their results are identical (Table~\ref{{{TABLE_LABEL}}}). "
            rf"The decode PPL increase is {values}.")
    if len(by_r) < 2:
        return text
    low, high = by_r[0][1][0], by_r[-1][1][0]
    ends = [low.get(f"{METRIC}_{k}") for k in ("lo", "hi")] + [high.get(f"{METRIC}_{k}") for k in ("lo", "hi")]
    if not all(finite(v) for v in ends):
        return text + " There are no intervals to compare."
    apart = ends[1] < ends[2] or ends[3] < ends[0]
    if n < MIN_SAMPLES_FOR_EVIDENCE:
        return text + rf" With {plural(n, 'sample')} the intervals are descriptive ranges, not evidence."
    if not apart:
        return text + (rf" The intervals at $r={by_r[0][0]}$ and $r={by_r[-1][0]}$ overlap: over the {n} samples this "
                       r"run does not resolve an effect of $r$.")
    word = "lowers" if high[METRIC] < low[METRIC] else "raises"
    return text + (rf" The intervals at $r={by_r[0][0]}$ and $r={by_r[-1][0]}$ do not overlap: keeping "
                   rf"{by_r[-1][0] - by_r[0][0]} more tokens after each event {word} the decode PPL increase.")


# ------------------------------------------------------------------------- context kept, every cell
def attended_rows(aggs: Mapping[str, Mapping]) -> list[dict]:
    """Every policy on the main text against the main reference, once (the main experiment first), with a
    measured mean attended length and a decode PPL increase (the reference's is 0); experiments that switch the
    original's defects on are left out."""
    main = main_aggregate(aggs)
    if main is None:
        return []
    first = with_role(aggs, "main")
    seen: dict[str, dict] = {}
    for exp in first + [e for e in aggs if e not in first]:
        agg = aggs[exp]
        if agg.get("dataset") != main.get("dataset") or agg.get("reference") != main.get("reference") \
                or agg.get("role") == "defects":  # the original's defects switched on: not the method's cells
            continue
        for pol in agg["policies_order"]:
            r = agg["policies"][pol]
            if pol not in seen and finite(r.get(LENGTH)) and finite(r.get(METRIC)):
                seen[pol] = dict(r, _role=role(agg))
    return list(seen.values())


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def curve_stats(rows: Sequence[Mapping]) -> dict:
    """Over the sink caches: Spearman's rank correlation of mean attended length and decode PPL increase, and the
    pairs ordered against it beyond their intervals (the longer context has the higher increase and the two
    intervals do not overlap)."""
    sel = [r for r in rows if r.get("type") in SINK_KINDS]
    if len(sel) < 3:
        return {"n": len(sel), "rho": float("nan"), "pairs": 0, "against": 0}
    x = np.array([r[LENGTH] for r in sel], float)
    y = np.array([r[METRIC] for r in sel], float)
    rx, ry = _ranks(x), _ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1]) if rx.std() and ry.std() else float("nan")
    pairs = against = 0
    for i, a in enumerate(sel):
        for b in sel[i + 1:]:
            short, long_ = (a, b) if a[LENGTH] < b[LENGTH] else (b, a)
            if short[LENGTH] == long_[LENGTH]:
                continue
            pairs += 1
            lo, hi = long_.get(f"{METRIC}_lo"), short.get(f"{METRIC}_hi")
            against += bool(finite(lo) and finite(hi) and lo > hi)
    return {"n": len(sel), "rho": rho, "pairs": pairs, "against": against}


def attended_sentence(rows: Sequence[Mapping], n_samples: int) -> str:
    """What the figure of increase against mean attended length shows, from the numbers."""
    st = curve_stats(rows)
    lead = (rf"Figure~\ref{{fig:attended-length}} places all {len(rows)} policies of the main text by the mean number "
            rf"of tokens their decode forwards attended over (measured) and their decode PPL increase.")
    if st["n"] < 3 or not finite(st["rho"]):
        return lead
    trend = "falls" if st["rho"] < 0 else "rises"
    text = (rf" Over the {st['n']} sink caches (every $R$, $\sigma$, $\delta$, $S$ and budget mode run here) the "
            rf"increase {trend} with the mean attended length (Spearman's rank correlation {fmt(st['rho'], 2)}); "
            rf"{st['against']} of the {st['pairs']} pairs of them are ordered against that trend beyond both "
            rf"intervals.")
    if st["against"] == 0 and st["rho"] <= -0.5:
        text += (r" Within their intervals the sink caches lie on one curve: as measured here, $R$, $\sigma$ and "
                 r"$\delta$ change the decode PPL mainly through how much context the cache keeps.")
    elif st["against"]:
        text += " The sink caches do not lie on one curve of the mean attended length alone."
    return lead + text + ("" if n_samples >= MIN_SAMPLES_FOR_EVIDENCE else
                          rf" With {plural(n_samples, 'sample')} the intervals are descriptive ranges.")


def dense_sentence(rows: Sequence[Mapping], n_samples: int) -> str:
    """The dense cache against recomputation: how much each attends over, and the measured difference."""
    dense = next((r for r in rows if r.get("type") == "dense"), None)
    ref = next((r for r in rows if r.get("is_reference") and r.get("type") == "recompute"), None)
    if dense is None or ref is None:
        return ""
    c = {"lo": dense.get(f"{METRIC}_lo"), "hi": dense.get(f"{METRIC}_hi")}
    return (rf"{tex_escape(dense['label'])} attends over {fmt(dense.get(LENGTH), 1)} tokens on average (from "
            rf"{fmt(dense.get('trace_min'), 0)} to {fmt(dense.get('trace_max'), 0)}: it never evicts), "
            rf"{tex_escape(ref['label'])} over {fmt(ref.get(LENGTH), 0)} (its window). With a window at least as long "
            r"as the sample, recomputation computes exactly what the dense cache computes (the test suite checks that "
            r"their per-target NLL agree), so the two differ here only in how much context they see. The dense "
            rf"cache's decode PPL increase is {fmt_ci(dense, METRIC, 2, signed=True)}\,\% ({support(c, n_samples)}).")


def factorial_macros(aggs: Mapping[str, Mapping]) -> str:
    """paper/generated/factorial_macros.tex: \\ifhaveAttended and \\ifhaveFactorialGrid, and the sentences."""
    m = MacroFile()
    m.raw("% Generated by kvstream.study.factorial.factorial_macros from results/aggregate/*.json. Do not edit.")
    rows = attended_rows(aggs)
    main = main_aggregate(aggs)
    n = int(main["n_samples"]) if main else 0
    m.raw(r"\newif\ifhaveAttended\haveAttended" + ("true" if rows else "false"))
    m.add("AttendedSentence", attended_sentence(rows, n) if rows else "n/a")
    m.add("DenseRecomputeSentence", dense_sentence(rows, n) if rows else "")
    found = factorial_aggregate(aggs)
    m.raw(r"\newif\ifhaveFactorialGrid\haveFactorialGrid" + ("true" if found and grid(found[1])[2] else "false"))
    if found and grid(found[1])[2]:
        m.add("FactorialSentence", factorial_sentence(found[1]))
    m.add("FactorialSentence", "n/a")  # the section sits inside \ifhaveFactorialGrid
    m.raw("")
    return m.text()


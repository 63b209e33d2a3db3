"""The policy zoo (experiments with role `zoo`): which tokens an event removes, every kind at equal peak
length (docs/method.md, "Score-based kinds"). Its table, and the numbers and sentences the paper's zoo
section quotes, each direction read from the data.

A zoo row is an evicting policy of the experiment. Rows fall into blocks of equal peak length (the
policy's `max_forward_len`: S + W + max(R, sigma + 1) tokens, the largest forward its schedule allows) and
equal R. Quality is the PPL increase over decode targets (every policy scores the prefill targets as the
reference does); a kind is compared with the sink cache of its block by the paired bootstrap contrast
over samples (`bootstrap.contrast`), read as evidence only with enough samples (`wording.support`); speed
ratios come from the speed run's rounds (`claims.speed_ratio`), ordered only beyond its measured timing
noise (`claims.speed_order`).
"""

from __future__ import annotations

from typing import Mapping

from kvstream.stats import ratio_ci
from kvstream.study.bootstrap import contrast
from kvstream.study.claims import cmp_word, sentence_ci, speed_order, speed_ratio
from kvstream.study.latex import MacroFile, finite, fmt, fmt_ci, fmt_knob, ordinal, table_label, tex_escape
from kvstream.study.roles import KIND_NAMES, role
from kvstream.study.wording import (MIN_SAMPLES_FOR_EVIDENCE, and_list, dataset_name, noise_words, plural,
                                    resolved, support)

METRIC = "decode_ppl_increase_percent"  # the zoo's quality measure (table, figure, sentences)
KIND_ORDER = tuple(k for k in KIND_NAMES if k not in ("recompute", "dense"))
BASE_KIND = "sink"  # what every other kind is compared with: StreamingLLM's rule (the oldest go)
ZOO_MACROS = ("ZooTableRef", "KvZooTable", "ZooDataset", "ZooNSamples", "ZooTokens", "ZooPeaks",
              "ZooRValues", "ZooKinds", "ZooSinks", "ZooReference", "ZooPairing", "ZooNBoot", "ZooSpeedRounds",
              "ZooSetupSentence", "ZooQualitySentence", "ZooSpeedSentence", "ZooLazySentence")


def zoo_experiment(aggs: Mapping[str, Mapping]) -> tuple[str, Mapping] | None:
    """The first experiment with role zoo: (name, aggregate)."""
    return next(((e, a) for e, a in aggs.items() if role(a) == "zoo"), None)


def kind_name(row: Mapping) -> str:
    """The kind's display name, with H2O's protected recent window where the aggregate has it."""
    name = KIND_NAMES.get(row.get("type"), str(row.get("type")))
    recent = row.get("recent")
    return f"{name} (recent {int(recent)})" if finite(recent) and recent > 0 else name


def peak(row: Mapping):
    """The largest forward the policy's schedule allows (cap for the recompute reference)."""
    return row.get("max_forward_len")


def zoo_rows(agg: Mapping) -> list[dict]:
    """The evicting policies, by peak length, then R, then kind (sink, window, h2o, tova, knorm, random)."""
    rows = [r for r in agg["policies"].values() if not r.get("is_reference") and r.get("type") in KIND_ORDER]

    def key(r):
        return (peak(r) if finite(peak(r)) else float("inf"), r.get("compress_every") or 0,
                KIND_ORDER.index(r["type"]), r["policy"])

    return sorted(rows, key=key)


def blocks(agg: Mapping) -> dict[tuple, list[dict]]:
    """(peak length, R) -> the rows of that block, in table order."""
    out: dict[tuple, list[dict]] = {}
    for r in zoo_rows(agg):
        out.setdefault((peak(r), r.get("compress_every")), []).append(r)
    return out


def _values(rows, field) -> list:
    return sorted({r.get(field) for r in rows if finite(r.get(field))})


# ------------------------------------------------------------------------------------------ table
def zoo_table_body(agg: Mapping, memory: bool = False) -> str:
    """One row per policy: kind, R, peak length, decode PPL and its increase, TPOT, speedup (peak memory where it
    resolves the cache); the reference first, then one block per (peak length, R)."""
    lines = [
        r"\begin{tabular}{@{}lrrrrrr" + ("r" if memory else "") + "@{}}",
        r"\toprule",
        r"Kind & $R$ & Peak $L$ & Dec.\ PPL & Dec.\ PPL inc.\ (\%) & TPOT (ms) & Speedup"
        + (r" & Peak mem.\ (MB)" if memory else "") + r" \\",
    ]
    ref = agg["policies"].get(agg.get("reference") or "")
    if ref:
        lines += [r"\midrule", " & ".join([
            tex_escape(ref.get("label") or ref["policy"]) + " (reference)", "--", fmt(peak(ref), 0),
            fmt_ci(ref, "decode_ppl"), fmt(0.0), fmt_ci(ref, "tpot_ms", 1), fmt(1.0)]
            + ([fmt(ref.get("peak_memory_mb"), 0)] if memory else [])) + r" \\"]
    for rows in blocks(agg).values():
        lines.append(r"\midrule")
        for r in rows:
            lines.append(" & ".join([
                tex_escape(kind_name(r)), fmt_knob(r.get("compress_every")), fmt(peak(r), 0),
                fmt_ci(r, "decode_ppl"), fmt_ci(r, METRIC, 2, signed=True), fmt_ci(r, "tpot_ms", 1),
                fmt_ci(r, "speedup")] + ([fmt(r.get("peak_memory_mb"), 0)] if memory else [])) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def zoo_caption(agg: Mapping) -> tuple[str, str]:
    """(title, what the columns mean) of the zoo table's caption."""
    rows = zoo_rows(agg)
    peaks = [fmt(p, 0) for p in _values(rows, "max_forward_len")]
    title = rf"Which tokens to evict: every eviction rule at equal peak length ({and_list(peaks)} tokens)."
    extra = (r" Blocks: policies of equal peak length and $R$. Peak $L$: the largest forward the policy's schedule "
             r"allows, $S+W+\max(R,\sigma+1)$, the same for every row of a block.")
    return title, extra


# ------------------------------------------------------------------------------ claims and macros
def _quality_clause(agg: Mapping, row: Mapping, base: Mapping) -> str:
    """`<kind> has a lower/higher/similar PPL increase (difference, CI; support)`; with too few samples for the
    interval to be evidence, `a nominally lower ...`."""
    c = contrast(agg, {row["policy"]: 1, base["policy"]: -1}, metric=METRIC)
    n = int(agg["n_samples"])
    found = resolved(c, n)
    if found is None:  # no interval that can be evidence: said once, in the sentence's head
        word = "a nominally " + cmp_word(c["value"], "higher", "lower", "equal")
        return rf"{tex_escape(kind_name(row))} has {word} PPL increase ({sentence_ci(c)})"
    word = cmp_word(c["value"], "a higher", "a lower") if found else "a similar"
    return rf"{tex_escape(kind_name(row))} has {word} PPL increase ({sentence_ci(c)}; {support(c, n)})"


def _ratio_text(ratio: Mapping, noise: float | None, above: str, below: str, same: str) -> str:
    """`1.85$\\times$ (95 % CI [a, b]; word)`: `above` when the interval lies above 1 and the ratio beyond the
    timing noise, `below` in the mirror case."""
    if not finite(ratio["value"]):
        return "not timed"
    word = speed_order(ratio, noise, above, below, same)
    if finite(ratio["lo"]) and finite(ratio["hi"]):
        return rf"{fmt(ratio['value'])}$\times$ (95\,\% CI [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}]; {word})"
    return rf"{fmt(ratio['value'])}$\times$ ({word}, no interval)"


def _block_name(key: tuple) -> str:
    return rf"peak length {fmt(key[0], 0)} and $R={fmt_knob(key[1])}$"


def quality_sentence(agg: Mapping) -> str:
    """Per block: every kind against the sink cache, paired over samples."""
    parts = []
    for key, rows in blocks(agg).items():
        base = next((r for r in rows if r["type"] == BASE_KIND), None)
        others = [r for r in rows if r is not base]
        if base is None or not others:
            continue
        parts.append(rf"At {_block_name(key)}, against the sink cache ({fmt(base.get(METRIC), 2, True)}\,\%): "
                     + "; ".join(_quality_clause(agg, r, base) for r in others) + ".")
    if not parts:
        return r"No block has both a sink cache and another kind, so no kind is compared with StreamingLLM's rule."
    n = int(agg["n_samples"])
    if not agg.get("n_boot"):
        note = "one sample: no interval"
    elif n < MIN_SAMPLES_FOR_EVIDENCE:
        note = (rf"95\,\% percentile bootstrap; with only {plural(n, 'sample')} these intervals are descriptive "
                "ranges, not evidence for or against a difference")
    else:
        note = r"95\,\% percentile bootstrap"
    return (rf"Differences of the decode PPL increase to the sink cache of the same block, paired over the "
            rf"{plural(n, 'sample')} ({note}). " + " ".join(parts))


def speed_sentence(agg: Mapping, noise: float | None = None) -> str:
    """Per block: every kind's time per token relative to the sink cache's, from the speed run's rounds."""
    parts = []
    for key, rows in blocks(agg).items():
        base = next((r for r in rows if r["type"] == BASE_KIND), None)
        others = [r for r in rows if r is not base]
        if base is None or not others:
            continue
        items = [tex_escape(kind_name(r)) + " " + _ratio_text(speed_ratio(r, base), noise, "slower", "faster",
                                                              "not distinguishable") for r in others]
        parts.append(rf"At {_block_name(key)}: " + "; ".join(items) + ".")
    if not parts:
        return ""
    rounds = (agg.get("speed") or {}).get("rounds")
    return (r"Time per token relative to the sink cache of the same block (TPOT ratio; 95\,\% $t$-intervals across "
            rf"the {tex_escape(rounds)} rounds of the speed run; an ordering only beyond {noise_words(noise)}). "
            + " ".join(parts))


def _gain_vs_base(row_lo: Mapping, row_hi: Mapping, base_lo: Mapping, base_hi: Mapping, noise: float | None) -> str:
    """Whether lazy pruning speeds a kind up more than it speeds up the sink cache: the ratio of the two
    speed gains, formed per round of the speed run."""
    rounds = [r.get("speed_round_ms") for r in (row_lo, row_hi, base_lo, base_hi)]
    if not all(isinstance(x, list) and x and len(x) == len(rounds[0]) for x in rounds):
        return ""
    gain = [a / b for a, b in zip(rounds[0], rounds[1])]
    base_gain = [a / b for a, b in zip(rounds[2], rounds[3])]
    r = ratio_ci(gain, base_gain)
    ratio = {"value": r["estimate"], "lo": r["ci95"][0], "hi": r["ci95"][1]}
    return (", its gain relative to the sink cache's "
            + _ratio_text(ratio, noise, "larger", "smaller", "not distinguishable"))


def lazy_sentence(agg: Mapping, noise: float | None = None) -> str:
    """Per peak length and kind: the smallest against the largest R, in speed and in quality."""
    by_peak: dict = {}
    for (pk, r_value), rows in blocks(agg).items():
        for r in rows:
            by_peak.setdefault(pk, {}).setdefault(r["type"], {})[r_value] = r
    parts = []
    for pk, kinds in by_peak.items():
        items = []
        base = kinds.get(BASE_KIND, {})
        for kind, by_r in kinds.items():
            by_r = {k: v for k, v in by_r.items() if k is not None}
            if len(by_r) < 2:
                continue
            lo, hi = by_r[min(by_r)], by_r[max(by_r)]
            c = contrast(agg, {hi["policy"]: 1, lo["policy"]: -1}, metric=METRIC)
            text = (tex_escape(kind_name(lo)) + ": "
                    + _ratio_text(speed_ratio(lo, hi), noise, "faster", "slower", "no measurable change")
                    + rf" per token, decode PPL increase {sentence_ci(c)}")
            if kind != BASE_KIND and min(by_r) in base and max(by_r) in base:
                text += _gain_vs_base(lo, hi, base[min(by_r)], base[max(by_r)], noise)
            items.append(text)
        if items:
            r_all = [v for by_r in kinds.values() for v in by_r if v is not None]
            r_lo, r_hi = min(r_all), max(r_all)
            parts.append(rf"At peak length {fmt(pk, 0)}, from $R={fmt_knob(r_lo)}$ to $R={fmt_knob(r_hi)}$: "
                         + "; ".join(items) + ".")
    if not parts:
        return r"Every kind ran with one $R$ only, so the effect of lazy pruning is not measured here."
    n = int(agg["n_samples"])
    return (r"Lazy pruning, each kind against itself (speed: how many times faster per token at the larger $R$, "
            rf"from the speed run's rounds; quality: the change of the decode PPL increase, paired over the "
            rf"{plural(n, 'sample')}). " + " ".join(parts))


def setup_sentence(agg: Mapping) -> str:
    """Equal peak length, read from the policies, and whether the measured forwards kept to it."""
    rows = zoo_rows(agg)
    modes = sorted({str(r.get("budget_mode")) for r in rows})
    over = [r for r in rows if finite(r.get("trace_max")) and finite(peak(r)) and r["trace_max"] > peak(r)]
    measured = (r"no forward measured in any cell attended over more tokens than its policy's peak length."
                if not over else "the measured largest forward exceeded the peak length for "
                + and_list([rf"{tex_escape(kind_name(r))} ($R={fmt_knob(r.get('compress_every'))}$, peak length "
                            rf"{fmt(peak(r), 0)})" for r in over]) + ".")
    return (r"The policies of a block share their peak length $S+W+\max(R,\sigma+1)$ (budget mode "
            + and_list([rf"\texttt{{{tex_escape(m)}}}" for m in modes]) + r"), so they attend over the same amount "
            r"of context at most and differ in which tokens they keep; " + measured)


def zoo_macros(m: MacroFile, aggs: Mapping[str, Mapping], config: Mapping | None = None) -> None:
    """\\ifhaveZoo and the Zoo... macros of the first zoo experiment ("n/a" where no zoo ran). config: the run's
    configuration (the zoo's text is named by its dataset's source)."""
    found = zoo_experiment(aggs)
    m.raw(r"\newif\ifhaveZoo\haveZoo" + ("true" if found else "false"))
    if found:
        exp, agg = found
        rows = zoo_rows(agg)
        ref = agg["policies"].get(agg.get("reference") or "", {})
        n = agg["n_samples"]
        every = int(agg.get("recompute_every") or 1)
        noise = m.noise.get(agg.get("dataset"))
        source = ((config or {}).get("datasets") or {}).get(agg.get("dataset"), {}).get("source")
        m.add("ZooTableRef", rf"Table~\ref{{{table_label(exp)}}}")
        m.add("KvZooTable", rf"\input{{generated/tables/{exp}.tex}}")
        m.add("ZooDataset", dataset_name(source, "the main text"))
        m.add("ZooNSamples", str(n))
        tokens = [t for t in (agg.get("provenance") or {}).get("n_tokens") or [] if t is not None]
        m.add("ZooTokens", tex_escape(", ".join(str(t) for t in tokens)) if tokens else "--")
        m.add("ZooPeaks", and_list([fmt(p, 0) for p in _values(rows, "max_forward_len")]))
        m.add("ZooRValues", ", ".join(fmt_knob(v) for v in _values(rows, "compress_every")))
        m.add("ZooKinds", and_list(list(dict.fromkeys(tex_escape(KIND_NAMES.get(r["type"], r["type"])) for r in rows))))
        with_sinks = [r for r in rows if r["type"] != "window"]
        m.add("ZooSinks", and_list([fmt_knob(v) for v in _values(with_sinks, "n_sink")]))
        m.add("ZooReference", tex_escape(ref.get("label") or "the reference")
              + (rf" (a forward over the last {fmt(peak(ref), 0)} tokens per target)" if finite(peak(ref)) else ""))
        m.add("ZooPairing", "every decode target" if every == 1 else
              f"every {ordinal(every)} decode target (the ones the reference scores)")
        m.add("ZooNBoot", str(agg.get("n_boot") or 0))
        m.add("ZooSpeedRounds", tex_escape((agg.get("speed") or {}).get("rounds", "--")))
        m.add("ZooSetupSentence", setup_sentence(agg))
        m.add("ZooQualitySentence", quality_sentence(agg))
        m.add("ZooSpeedSentence", speed_sentence(agg, noise) or r"No speed run: no TPOT.")
        m.add("ZooLazySentence", lazy_sentence(agg, noise))
    for name in ZOO_MACROS:  # placeholders: the section sits inside \ifhaveZoo
        m.add(name, "n/a")

"""`paper/generated/macros.tex`: every number the prose quotes, the author block, and switches so the paper
only shows what was run.

Names: `\\have<Experiment>` switches for every configured or aggregated experiment, then the role
switches (`\\ifhaveZoo` among them); `\\<Field><Stem>` for every policy (its stem from config
`paper.stems`, else its CamelCase name), the first experiment that has it winning (the main experiment,
then the ablation, then the rest); `\\Orig...` for the original's published numbers (`published`); the
sentences of `claims`, of identical schedules and timing noise (`identical`) and of the zoo section (`zoo`);
`\\KvResult{experiment}{policy}{field}` for anything else. A paper that tests switches of experiments its
configuration does not name declares them itself (paper/kvpaper.sty); this file sets those it knows.

Quality is quoted over decode targets (`DecodePplInc<Stem>`); `PplInc<Stem>` is the all-target figure the
original study reported. No macro the prose quotes carries a config name: policies are named by their labels
or knobs, texts and models by `wording`.
"""

from __future__ import annotations

from typing import Mapping

from kvstream.study import published
from kvstream.study.claims import METRIC, claim_macro_names, claims, speed_order, speed_ratio
from kvstream.study.identical import identical_macros
from kvstream.study.latex import KNOB_TEX, MacroFile, finite, fmt, fmt_knob, macro_stem, ordinal, table_label, tex_escape
from kvstream.study.roles import PaperPolicies, experiment_roles, main_aggregate, paper_order, role, sweep_knob
from kvstream.study.setup_tables import memory_kind_words, merged_provenance
from kvstream.study.wording import (MIN_SAMPLES_FOR_EVIDENCE, and_list, dataset_name, model_name, noise_words, plural,
                                    policy_names)
from kvstream.study.zoo import zoo_macros

_POLICY_FIELDS = ("Speedup", "SpeedupLo", "SpeedupHi", "PplInc", "PplIncLo", "PplIncHi", "DecodePplInc",
                  "DecodePplIncLo", "DecodePplIncHi", "Ppl", "DecodePpl", "Tpot", "PeakMem", "KvMB", "MaxLen",
                  "Budget", "Label", "Mode")
_RESULT_FIELDS = (("speedup", 2, False), ("tpot_ms", 1, False), ("ppl", 2, False), ("decode_ppl", 2, False),
                  ("ppl_increase_percent", 2, True), ("decode_ppl_increase_percent", 2, True),
                  ("peak_memory_mb", 0, False), ("trace_max", 0, False), ("budget", 0, False))
_NOT_RUN = r"\emph{(not run in this configuration)}"
_SETUP_NAMES = ("DatasetName", "NSamples", "TokensPerSample", "MemoryKind", "DecodeTokens", "DecodeTargetsPerSample",
                "PairedTargetsPerSample", "RecomputeEvery", "RecomputeScored", "PrefillShare", "SamplesEvidence",
                "SpeedRounds", "SpeedThreads", "SpeedExecution", "SpeedDevice", "SpeedStarted")


def author_block(config: Mapping | None) -> str:
    authors = (config or {}).get("authors") or [{"name": "Anonymous Author(s)", "affiliation": "", "email": ""}]
    blocks = []
    for a in authors:
        parts = [tex_escape(a.get("name") or "Anonymous")]
        if a.get("affiliation"):
            parts.append(tex_escape(a["affiliation"]))
        if a.get("email"):
            parts.append(r"\texttt{" + tex_escape(a["email"]) + "}")
        blocks.append(r" \\ ".join(parts))
    return r" \And ".join(blocks)


def _one(vals, default="--") -> str:
    vals = [v for v in (vals or []) if v is not None]
    return tex_escape(", ".join(str(v) for v in vals)) if vals else default


def _switches(m: MacroFile, aggs: Mapping[str, Mapping], roles: Mapping[str, dict]) -> None:
    """\\have<Experiment> for every configured or aggregated experiment; role switches."""
    for exp in sorted(set(roles) | set(aggs)):
        stem = macro_stem(exp)
        m.raw(rf"\newif\ifhave{stem}\have{stem}{'true' if exp in aggs else 'false'}")
    m.raw(r"\newif\ifhaveWikitext\haveWikitext" + ("true" if any(role(a) == "sanity" for a in aggs.values()) else "false"))
    m.raw(r"\newif\ifhaveAblation\haveAblationfalse")  # the full 2x2 (sigma, delta) design ran (claims)
    m.raw(r"\newif\ifhaveSweeps\haveSweeps" + ("true" if any(role(a) == "sweep" for a in aggs.values()) else "false"))


def _setup(m: MacroFile, aggs: Mapping[str, Mapping], config: Mapping) -> None:
    """Model, software, device and the main experiment's text, samples, pairing and speed run."""
    prov = merged_provenance(aggs)
    model = config.get("model") or {}
    ev = config.get("eval") or {}
    name, weights = model_name(model.get("source"), _one(prov.get("model_label"), model.get("name", "--")))
    m.add("ModelName", name)
    m.add("ModelSource", weights)
    m.add("Dtype", _one([str(d).replace("torch.", "") for d in prov.get("dtype") or []],
                        tex_escape(model.get("dtype", "--"))))
    m.add("DeviceName", _one(prov.get("device_name")))
    m.add("DeviceKind", _one(prov.get("device")))
    threads = [t for t in prov.get("threads") or [] if isinstance(t, int)]
    m.add("Threads", _one(prov.get("threads")))
    m.add("ThreadsPerJob", plural(threads[0], "torch thread") if len(threads) == 1 else
          f"{_one(threads)} torch threads")
    m.add("CpuCount", _one(prov.get("cpu_count")))
    m.add("TorchVersion", _one(prov.get("torch")))
    m.add("TransformersVersion", _one(prov.get("transformers")))
    m.add("PythonVersion", _one(prov.get("python")))
    m.add("GitCommit", tex_escape(", ".join(c[:12] for c in prov.get("git_commit") or []) or "unrecorded"))
    dirty = prov.get("git_dirty") or []
    m.add("GitDirty", "with uncommitted changes" if True in dirty else "clean" if False in dirty else
          "working-tree state unrecorded")
    m.add("CapTokens", fmt(ev.get("cap"), 0))
    m.add("Warmup", fmt(ev.get("warmup"), 0))
    m.add("Positions", tex_escape(ev.get("positions", "--")))
    m.add("NBoot", tex_escape(prov.get("n_boot", "--")))
    m.add("MinSamplesEvidence", str(MIN_SAMPLES_FOR_EVIDENCE))
    main = main_aggregate(aggs)
    if not main:
        for name in _SETUP_NAMES:
            m.add(name, "--")
        return
    dcfg = (config.get("datasets") or {}).get(main.get("dataset"), {})
    m.add("DatasetName", dataset_name(dcfg.get("source"), "the text"))
    n = max(int(main["n_samples"]), 1)
    m.add("NSamples", str(main["n_samples"]))
    m.add("TokensPerSample", _one((main.get("provenance") or {}).get("n_tokens"), fmt(dcfg.get("tokens_per_sample"), 0)))
    m.add("MemoryKind", tex_escape(memory_kind_words(main)))
    ref = main["policies"].get(main.get("reference") or "", {})
    m.add("DecodeTokens", fmt(ref.get("decode_tokens"), 0))
    others = [r for r in main["policies"].values() if not r.get("is_reference")]
    m.add("DecodeTargetsPerSample", fmt(others[0]["n_decode_targets"] / n, 0) if others else "--")
    m.add("PairedTargetsPerSample", fmt(others[0].get("paired_targets", float("nan")) / n, 0) if others else "--")
    k = int(main.get("recompute_every") or 1)
    m.add("RecomputeEvery", str(k))
    m.add("RecomputeScored", "every decode target" if k == 1 else f"every {ordinal(k)} decode target")
    pairs = (others[0].get("paired") or {}) if others else {}
    all_n, dec_n = (sum((pairs.get(f) or {}).get("n") or [0]) for f in ("ppl_increase_percent", METRIC))
    m.add("PrefillShare", fmt(100 * (all_n - dec_n) / all_n, 0) if all_n else "--")
    m.add("SamplesEvidence",
          rf"With {plural(n, 'sample')} a percentile-bootstrap interval is a descriptive range: we read no interval "
          rf"over fewer than {MIN_SAMPLES_FOR_EVIDENCE} samples as evidence for or against a difference."
          if n < MIN_SAMPLES_FOR_EVIDENCE else
          rf"An interval over the {n} samples is read as evidence of a difference only when it excludes zero.")
    sp = main.get("speed") or {}
    m.add("SpeedRounds", tex_escape(sp.get("rounds", "--")))
    t = sp.get("threads")
    m.add("SpeedThreads", "--" if t is None else plural(t, "thread"))
    m.add("SpeedExecution", tex_escape(sp.get("execution", "--")))
    m.add("SpeedDevice", tex_escape(sp.get("device_name", "--")))
    m.add("SpeedStarted", tex_escape(sp.get("started_at") or "--"))


def _original(m: MacroFile) -> None:
    """The original's setup, facts and published numbers; its ablation as improvements over (0, inf)."""
    m.add("OrigSetup", published.setup_text())
    for k, v in published.facts().items():
        m.add(k, v)
    inc = {(r["cache_slack"], r["max_drop"]): r["ppl_increase_percent"] for r in published.ablation_rows()}
    both = next(k for k in inc if k[0] and k[1] is not None)  # (sigma, delta) of the combined cell
    base, slack, delta, combined = inc[(0, None)], inc[(both[0], None)], inc[(0, both[1])], inc[both]
    m.add("OrigIncBase", fmt(base, 2, True))
    m.add("OrigIncSlackOnly", fmt(slack, 2, True))
    m.add("OrigIncDeltaOnly", fmt(delta, 2, True))
    m.add("OrigIncBoth", fmt(combined, 2, True))
    m.add("OrigImprovementSlack", fmt(100 * (base - slack) / base, 0))
    m.add("OrigImprovementDelta", fmt(100 * (base - delta) / base, 0))
    m.add("OrigImprovementBoth", fmt(100 * (base - combined) / base, 0))
    for r in published.main_rows():
        if r.get("stem"):
            m.add(f"OrigSpeedup{r['stem']}", fmt(r["speedup"]))
            m.add(f"OrigPplInc{r['stem']}", fmt(r["ppl_increase_percent"], 2, True))


def _policy_macros(m: MacroFile, aggs: Mapping[str, Mapping], paper: PaperPolicies) -> None:
    for exp in paper_order(aggs):
        for pol, r in aggs[exp]["policies"].items():
            st = paper.stem(pol)
            for name, value in zip(_POLICY_FIELDS, (
                    fmt(r.get("speedup")), fmt(r.get("speedup_lo")), fmt(r.get("speedup_hi")),
                    fmt(r.get("ppl_increase_percent"), 2, True), fmt(r.get("ppl_increase_percent_lo"), 2, True),
                    fmt(r.get("ppl_increase_percent_hi"), 2, True), fmt(r.get(METRIC), 2, True),
                    fmt(r.get(f"{METRIC}_lo"), 2, True), fmt(r.get(f"{METRIC}_hi"), 2, True),
                    fmt(r.get("ppl")), fmt(r.get("decode_ppl")), fmt(r.get("tpot_ms"), 1),
                    fmt(r.get("peak_memory_mb"), 0), fmt(r.get("kv_cache_mb"), 1), fmt(r.get("trace_max"), 0),
                    fmt(r.get("budget"), 0), tex_escape(r.get("label")), tex_escape(r.get("budget_mode") or "--"))):
                m.add(name + st, value)


def _other_experiments(aggs: Mapping[str, Mapping]) -> list[str]:
    """Experiments the paper has no section for: all but the first main, ablation, sanity and zoo ones and the
    sweeps."""
    firsts = {next((e for e, a in aggs.items() if role(a) == r), None) for r in ("main", "ablation", "sanity", "zoo")}
    return [e for e, a in aggs.items() if e not in firsts and role(a) not in ("sweep", "defects", "factorial")]


def _sanity(m: MacroFile, aggs: Mapping[str, Mapping], config: Mapping) -> None:
    """The first experiment with role sanity (the main presets on a second text): its table and its text."""
    exp = next((e for e, a in aggs.items() if role(a) == "sanity"), None)
    if exp:
        source = ((config.get("datasets") or {}).get(aggs[exp].get("dataset")) or {}).get("source")
        m.add("SanityTableRef", rf"Table~\ref{{{table_label(exp)}}}")
        m.add("KvSanityTable", rf"\input{{generated/tables/{exp}.tex}}")
        m.add("SanityDataset", dataset_name(source, "a second text"))
    for name in ("SanityTableRef", "KvSanityTable", "SanityDataset"):  # the section sits inside \ifhaveWikitext
        m.add(name, "n/a")


def _peak_matched(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """Describe every experiment that has a sink policy in budget mode `cap` (peak-matched)."""
    parts = []
    for agg in aggs.values():
        rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
        if role(agg) == "zoo" or not any(r.get("budget_mode") == "cap" for r in rows):  # the zoo has its section
            continue
        items = [rf"{name} (mode \texttt{{{tex_escape(r.get('budget_mode'))}}}, $C={fmt(r.get('budget'), 0)}$, "
                 rf"max.\ $L={fmt(r.get('trace_max'), 0)}$): decode PPL increase {fmt(r.get(METRIC), 2, True)}\,\%, "
                 rf"speedup {fmt(r.get('speedup'))}$\times$" for name, r in zip(policy_names(rows), rows)]
        parts.append("; ".join(items) + ".")
    if parts:
        m.add("PeakMatchedSentence", "At equal peak length: " + " ".join(parts))
    elif any(role(a) == "zoo" and any(r.get("budget_mode") == "cap" for r in a["policies"].values())
             for a in aggs.values()):
        m.add("PeakMatchedSentence", r"Apart from the policy zoo, no experiment ran in budget mode \texttt{cap}.")


def sweep_summary(agg: Mapping, noise: float | None) -> str:
    """What a sweep shows over its knob: the decode PPL increase and the speedup, each as one value where the
    cells agree, the best setting only where the values differ (and, for speed, beyond the timing noise)."""
    knob = sweep_knob(agg) or "compress_every"
    rows = sorted((r for r in agg["policies"].values() if r.get("type") == "sink"),
                  key=lambda r: float("inf") if r.get(knob) is None else r[knob])
    kt = KNOB_TEX.get(knob, knob)
    knobs = ", ".join(fmt_knob(r.get(knob)) for r in rows)
    inc = [r for r in rows if finite(r.get(METRIC))]
    lo, hi = (min(inc, key=lambda r: r[METRIC]), max(inc, key=lambda r: r[METRIC])) if inc else (None, None)
    if not inc:
        quality = "no decode PPL increase was measured"
    elif fmt(lo[METRIC], 2, True) == fmt(hi[METRIC], 2, True):
        quality = rf"the decode PPL increase is {fmt(lo[METRIC], 2, True)}\,\% at every {kt}"
    else:
        quality = (rf"the decode PPL increase ranges from {fmt(lo[METRIC], 2, True)}\,\% ({kt}$\,=\,$"
                   rf"{fmt_knob(lo.get(knob))}) to {fmt(hi[METRIC], 2, True)}\,\% ({kt}$\,=\,${fmt_knob(hi.get(knob))})")
    timed = [r for r in rows if finite(r.get("speedup"))]
    if timed:
        slow, fast = min(timed, key=lambda r: r["speedup"]), max(timed, key=lambda r: r["speedup"])
        order = speed_order(speed_ratio(slow, fast), noise, "faster", "slower", "same")
        speed = (rf"the speedup is {fmt(fast['speedup'])}$\times$ at every {kt}"
                 if fmt(fast["speedup"]) == fmt(slow["speedup"]) else
                 rf"the speedup ranges from {fmt(slow['speedup'])}$\times$ to {fmt(fast['speedup'])}$\times$, "
                 + (rf"highest at {kt}$\,=\,${fmt_knob(fast.get(knob))}" if order == "faster" else
                    "a spread within " + noise_words(noise)))
    else:
        speed = "no speed was measured"
    lengths = sorted({fmt(r.get("trace_max"), 0) for r in rows}, key=lambda v: (len(v), v))
    span = (rf"{lengths[0]} tokens throughout" if len(lengths) == 1 else
            rf"from {lengths[0]} to {lengths[-1]} tokens")
    n = int(agg["n_samples"])
    return (rf"Over {kt} $\in\{{${knobs}$\}}$ {quality}; {speed}; the largest measured forward spans {span}. "
            + ("With one sample there are no intervals." if not agg.get("n_boot") else
               rf"With {plural(n, 'sample')} the intervals in the table are descriptive ranges, not evidence."
               if n < MIN_SAMPLES_FOR_EVIDENCE else
               "Differences smaller than the intervals in the table are not resolved."))


def _sweep_summaries(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """SweepSummary<Experiment> macros, read from the aggregate."""
    for exp, agg in aggs.items():
        if role(agg) == "sweep" and any(r.get("type") == "sink" for r in agg["policies"].values()):
            m.add("SweepSummary" + macro_stem(exp), sweep_summary(agg, m.noise.get(agg.get("dataset"))))


def _defaults(m: MacroFile, aggs: Mapping[str, Mapping], paper: PaperPolicies, roles: Mapping[str, dict]) -> None:
    """Defaults, so the paper compiles whichever experiments exist (the prose that needs a number sits
    inside \\have... switches; these only avoid undefined-macro errors). Measured values were added first."""
    named = [p for p in (paper.baseline, paper.eager, *paper.presets) if p]
    for st in dict.fromkeys([*paper.stems.values(), *(paper.stem(p) for p in named)]):
        for f in _POLICY_FIELDS:
            m.add(f + st, "--")
    m.add("PeakMatchedSentence", r"No experiment in budget mode \texttt{cap} was run.")
    m.add("TimingNoiseSentence", "This run timed no computation twice, so its timing noise is known only from the "
                                 "intervals across rounds.")
    for name in claim_macro_names(paper):
        m.add(name, _NOT_RUN if name.endswith("Sentence") else "n/a")
    kinds = {**{e: r["role"] for e, r in roles.items()}, **{e: role(a) for e, a in aggs.items()}}
    for exp in sorted(e for e in kinds if kinds[e] == "sweep"):
        m.add("SweepSummary" + macro_stem(exp), "n/a")
    m.add("TimingNoiseFactor", "n/a")
    for exp in sorted(kinds):
        m.add("IdenticalSentence" + macro_stem(exp), "n/a")


def macros_tex(aggs: Mapping[str, Mapping], config: Mapping | None = None) -> str:
    """`paper/generated/macros.tex` from the aggregates and the config (title, authors, model, eval,
    datasets, experiments, paper)."""
    config = config or {}
    paper = PaperPolicies.from_config(config)
    roles = experiment_roles(config)
    m = MacroFile()
    m.raw("% Generated by kvstream.study.macros.macros_tex from results/aggregate/*.json and config.yaml.")
    m.raw("% Do not edit: rerun the pipeline.")
    # Result lookup for any experiment/policy/field: \KvResult{<experiment>}{<policy>}{speedup}
    m.raw(r"\makeatletter")
    m.raw(r"\newcommand{\KvResult}[3]{\ifcsname kv@#1@#2@#3\endcsname\csname kv@#1@#2@#3\endcsname"
          r"\else\textbf{??}\fi}")
    _switches(m, aggs, roles)
    for exp, agg in aggs.items():
        for pol, r in agg["policies"].items():
            for field, nd, signed in _RESULT_FIELDS:
                m.raw(rf"\expandafter\def\csname kv@{exp}@{pol}@{field}\endcsname{{{fmt(r.get(field), nd, signed)}}}")
    m.raw(r"\makeatother")

    m.add("KvTitle", tex_escape(config.get("title") or "KV-cache eviction for streaming decoding"))
    m.add("KvAuthors", author_block(config))
    _setup(m, aggs, config)
    m.add("BatchSize", fmt((config.get("eval") or {}).get("batch_size", 1), 0))
    _original(m)
    _policy_macros(m, aggs, paper)

    modes = sorted({str(r.get("budget_mode")) for a in aggs.values() for r in a["policies"].values()
                    if r.get("type") == "sink" and r.get("budget_mode")})
    m.add("BudgetModes", tex_escape(", ".join(modes) or "--"))
    m.add("BudgetModesPhrase", ("budget mode " if len(modes) == 1 else "budget modes ")
          + and_list([rf"\texttt{{{tex_escape(x)}}}" for x in modes]) if modes else "no sink policy")
    m.add("NExperiments", str(len(aggs)))
    m.add("NPolicies", str(len({p for a in aggs.values() for p in a["policies"]})))
    others = _other_experiments(aggs)
    m.raw(r"\newif\ifhaveOthers\haveOthers" + ("true" if others else "false"))
    m.add("KvOtherTables", "".join(rf"\input{{generated/tables/{e}.tex}}" for e in others))
    m.add("KvOtherRefs", ("Tables~" if len(others) > 1 else "Table~")
          + and_list([rf"\ref{{{table_label(e)}}}" for e in others]) if others else "none")
    identical_macros(m, aggs)
    claims(m, aggs, paper)
    zoo_macros(m, aggs, config)
    _sanity(m, aggs, config)
    _peak_matched(m, aggs)
    _sweep_summaries(m, aggs)
    _defaults(m, aggs, paper, roles)
    m.raw("")
    return m.text()

"""`paper/generated/macros.tex`: every number the prose quotes, the author block, and switches so the paper
only shows what was run.

Names: `\\have<Experiment>` switches for every configured or aggregated experiment, then the role
switches (`\\ifhaveZoo` among them); `\\<Field><Stem>` for every policy (its stem from config
`paper.stems`, else its CamelCase name), the first experiment that has it winning (the main experiment,
then the ablation, then the rest); `\\Orig...` for the original's published numbers (`published`); the
sentences of `claims` and of the zoo section (`zoo`); `\\KvResult{experiment}{policy}{field}` for
anything else. A paper that tests switches of experiments its configuration does not name declares them
itself (paper/kvpaper.sty); this file sets those it knows.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from kvstream.study import published
from kvstream.study.claims import claim_macro_names, claims
from kvstream.study.latex import KNOB_TEX, MacroFile, finite, fmt, fmt_knob, macro_stem, ordinal, tex_escape
from kvstream.study.roles import PaperPolicies, experiment_roles, main_aggregate, paper_order, role, sweep_knob
from kvstream.study.tables import memory_kind_words, merged_provenance
from kvstream.study.zoo import zoo_macros

_POLICY_FIELDS = ("Speedup", "SpeedupLo", "SpeedupHi", "PplInc", "PplIncLo", "PplIncHi", "DecodePplInc", "Ppl",
                  "DecodePpl", "Tpot", "PeakMem", "KvMB", "MaxLen", "Budget", "Label", "Mode")
_RESULT_FIELDS = (("speedup", 2, False), ("tpot_ms", 1, False), ("ppl", 2, False), ("decode_ppl", 2, False),
                  ("ppl_increase_percent", 2, True), ("decode_ppl_increase_percent", 2, True),
                  ("peak_memory_mb", 0, False), ("trace_max", 0, False), ("budget", 0, False))
_NOT_RUN = r"\emph{(not run in this configuration)}"
_SETUP_NAMES = ("DatasetName", "DatasetSource", "NSamples", "TokensPerSample", "MemoryKind", "DecodeTokens",
                "DecodeTargetsPerSample", "PairedTargetsPerSample", "RecomputeEvery", "RecomputeScored",
                "SpeedRounds", "SpeedThreads", "SpeedExecution", "SpeedDevice")


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
    """Model, software, device and the main experiment's dataset, samples, pairing and speed run."""
    prov = merged_provenance(aggs)
    model = config.get("model") or {}
    ev = config.get("eval") or {}
    m.add("ModelName", _one(prov.get("model_label")) if prov.get("model_label") else tex_escape(model.get("name", "--")))
    m.add("ModelSource", tex_escape(model.get("source", "--")))
    m.add("Dtype", _one([str(d).replace("torch.", "") for d in prov.get("dtype") or []],
                        tex_escape(model.get("dtype", "--"))))
    m.add("DeviceName", _one(prov.get("device_name")))
    m.add("DeviceKind", _one(prov.get("device")))
    m.add("Threads", _one(prov.get("threads")))
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
    main = main_aggregate(aggs)
    if not main:
        for name in _SETUP_NAMES:
            m.add(name, "--")
        return
    ds = main.get("dataset")
    dcfg = (config.get("datasets") or {}).get(ds, {})
    m.add("DatasetName", tex_escape(ds))
    m.add("DatasetSource", tex_escape(dcfg.get("source", ds)))
    m.add("NSamples", str(main["n_samples"]))
    m.add("TokensPerSample", _one((main.get("provenance") or {}).get("n_tokens"), fmt(dcfg.get("tokens_per_sample"), 0)))
    m.add("MemoryKind", tex_escape(memory_kind_words(main)))
    ref = main["policies"].get(main.get("reference") or "", {})
    m.add("DecodeTokens", fmt(ref.get("decode_tokens"), 0))
    others = [r for r in main["policies"].values() if not r.get("is_reference")]
    n = max(int(main["n_samples"]), 1)
    m.add("DecodeTargetsPerSample", fmt(others[0]["n_decode_targets"] / n, 0) if others else "--")
    m.add("PairedTargetsPerSample", fmt(others[0].get("paired_targets", float("nan")) / n, 0) if others else "--")
    k = int(main.get("recompute_every") or 1)
    m.add("RecomputeEvery", str(k))
    m.add("RecomputeScored", "every decode target" if k == 1 else f"every {ordinal(k)} decode target")
    sp = main.get("speed") or {}
    m.add("SpeedRounds", tex_escape(sp.get("rounds", "--")))
    t = sp.get("threads")
    m.add("SpeedThreads", "--" if t is None else f"{t} thread" + ("" if t == 1 else "s"))
    m.add("SpeedExecution", tex_escape(sp.get("execution", "--")))
    m.add("SpeedDevice", tex_escape(sp.get("device_name", "--")))


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
                    fmt(r.get("ppl_increase_percent_hi"), 2, True), fmt(r.get("decode_ppl_increase_percent"), 2, True),
                    fmt(r.get("ppl")), fmt(r.get("decode_ppl")), fmt(r.get("tpot_ms"), 1),
                    fmt(r.get("peak_memory_mb"), 0), fmt(r.get("kv_cache_mb"), 1), fmt(r.get("trace_max"), 0),
                    fmt(r.get("budget"), 0), tex_escape(r.get("label")), tex_escape(r.get("budget_mode") or "--"))):
                m.add(name + st, value)


def _other_experiments(aggs: Mapping[str, Mapping]) -> list[str]:
    """Experiments the paper has no section for: all but the first main, ablation, sanity and zoo ones and the
    sweeps."""
    firsts = {next((e for e, a in aggs.items() if role(a) == r), None) for r in ("main", "ablation", "sanity", "zoo")}
    return [e for e, a in aggs.items() if e not in firsts and role(a) != "sweep"]


def identical_groups(rows: Iterable[Mapping]) -> list[list[dict]]:
    """Policies whose cells computed the same thing: identical measured traces and bit-identical per-token
    NLL files on every sample (needs the hashes stored by `aggregate`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        ps = r.get("per_sample") or {}
        nll, tr = ps.get("nll_sha256"), ps.get("trace_sha256")
        if not nll or None in nll or r.get("is_reference"):
            continue
        groups.setdefault((tuple(nll), tuple(tr or [])), []).append(dict(r))
    return [g for g in groups.values() if len(g) > 1]


def _group_text(g: Sequence[Mapping]) -> str:
    names = ", ".join(rf"\texttt{{{tex_escape(r['policy'])}}}" for r in g)
    t = [r.get("tpot_ms") for r in g if finite(r.get("tpot_ms")) and not r.get("speed_from")]
    txt = rf"{{{names}}}"
    shared = len(g) - len(t)
    if t and shared:  # evaluated once: the others took the timing of the policy whose cells they reuse
        txt += (rf" (TPOT of the {len(t)} timed separately: {fmt(min(t), 1)}--{fmt(max(t), 1)}\,ms; "
                rf"the other {shared} reuse their cells and timing)")
    elif t:
        txt += rf" (TPOT {fmt(min(t), 1)}--{fmt(max(t), 1)}\,ms)"
    return txt


def _identical(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """Which cells computed identical results, per experiment and over all; the TPOT spread inside such a
    group is a direct measurement of timing noise."""
    for exp, agg in aggs.items():
        groups = identical_groups(agg["policies"].values())
        if groups:
            shared = any(r.get("reused_from") for g in groups for r in g)
            m.add("IdenticalSentence" + macro_stem(exp),
                  (r"Policies with the same eviction schedule, evaluated once (shared cells): " if shared else
                   r"Cells that evicted identically and produced bit-identical per-token NLL on every sample: ")
                  + "; ".join(_group_text(g) for g in groups) + ".")
        else:
            m.add("IdenticalSentence" + macro_stem(exp), "")
    seen: dict[str, dict] = {}
    for agg in aggs.values():
        for pol, r in agg["policies"].items():
            seen.setdefault(pol, r)
    groups = identical_groups(seen.values())
    if not groups:
        m.add("IdenticalAllSentence", r"No two policies produced identical results.")
        return
    reused = any(r.get("reused_from") for g in groups for r in g)
    m.add("IdenticalAllSentence",
          (r"Across all experiments, these groups of policies have the same eviction schedule (the same "
           r"cache-length trace) although their knobs differ, so they evict the same tokens at the same steps; "
           r"each group was evaluated once and its cells are shared: "
           if reused else
           r"Across all experiments, these groups of policies evicted identically (same measured cache-length "
           r"trace) and produced bit-identical per-token NLL on every sample, although their knobs differ: ")
          + "; ".join(_group_text(g) for g in groups) + ".")
    ratios = []
    for g in groups:  # only policies timed themselves (not those that took an identical one's timing)
        t = [r.get("tpot_ms") for r in g if finite(r.get("tpot_ms")) and not r.get("speed_from")]
        if len(t) > 1 and min(t) > 0:
            ratios.append((max(t) / min(t), min(t), max(t)))
    if ratios:
        worst = max(ratios)
        m.noise_factor = worst[0]
        m.add("TimingNoiseFactor", fmt(worst[0], 2))
        m.add("TimingNoiseSentence",
              rf"Since each such group runs exactly the same computation, the spread of the TPOTs of its members "
              rf"timed separately in the speed run (interleaved with every other policy) is timing noise of this machine: up to a "
              rf"factor of {fmt(worst[0], 3)} ({fmt(worst[1], 2)} to {fmt(worst[2], 2)}\,ms). "
              r"Latency differences between policies smaller than that are not resolved by this run.")


def _peak_matched(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """Describe every experiment that has a sink policy in budget mode `cap` (peak-matched)."""
    parts = []
    for exp, agg in aggs.items():
        rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
        if role(agg) == "zoo" or not any(r.get("budget_mode") == "cap" for r in rows):  # the zoo has its section
            continue
        items = [rf"{tex_escape(r['label'])} (mode \texttt{{{tex_escape(r.get('budget_mode'))}}}, $C={fmt(r.get('budget'), 0)}$, "
                 rf"max.\ $L={fmt(r.get('trace_max'), 0)}$): PPL increase {fmt(r.get('ppl_increase_percent'), 2, True)}\,\%, "
                 rf"speedup {fmt(r.get('speedup'))}$\times$" for r in rows]
        parts.append(rf"In \texttt{{{tex_escape(exp)}}}: " + "; ".join(items) + ".")
    if parts:
        m.add("PeakMatchedSentence", " ".join(parts))


def _sweep_summaries(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """SweepSummary<Experiment> macros: ranges over the swept knob, read from the aggregate."""
    for exp, agg in aggs.items():
        if role(agg) != "sweep":
            continue
        knob = sweep_knob(agg) or "compress_every"
        rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
        if not rows:
            continue

        def rng(field, nd, signed=False):
            vals = [r.get(field) for r in rows if finite(r.get(field))]
            if not vals:
                return "--", "--"
            return fmt(min(vals), nd, signed), fmt(max(vals), nd, signed)

        knobs = sorted({fmt_knob(r.get(knob)) for r in rows}, key=lambda v: (len(v), v))
        inc_lo, inc_hi = rng("ppl_increase_percent", 2, True)
        sp_lo, sp_hi = rng("speedup", 2)
        l_lo, l_hi = rng("trace_max", 0)
        best = min(rows, key=lambda r: r.get("ppl_increase_percent") if finite(r.get("ppl_increase_percent")) else 1e9)
        fast = max(rows, key=lambda r: r.get("speedup") if finite(r.get("speedup")) else -1e9)
        kt = KNOB_TEX.get(knob, knob)
        text = (rf"Over {kt} $\in\{{${', '.join(knobs)}$\}}$ the PPL increase ranges from "
                rf"{inc_lo}\,\% to {inc_hi}\,\% (lowest at {kt}$\,=\,${fmt_knob(best.get(knob))}) "
                rf"and the speedup from {sp_lo}$\times$ to {sp_hi}$\times$ (highest at "
                rf"{kt}$\,=\,${fmt_knob(fast.get(knob))}); the largest measured forward spans "
                + (rf"{l_lo} tokens throughout." if l_lo == l_hi else rf"{l_lo} to {l_hi} tokens.")
                + (" Differences smaller than the intervals in the table are not resolved by these samples."
                   if agg.get("n_boot") else " With one sample there are no intervals."))
        m.add("SweepSummary" + macro_stem(exp), text)


def _defaults(m: MacroFile, aggs: Mapping[str, Mapping], paper: PaperPolicies, roles: Mapping[str, dict]) -> None:
    """Defaults, so the paper compiles whichever experiments exist (the prose that needs a number sits
    inside \\have... switches; these only avoid undefined-macro errors). Measured values were added first."""
    named = [p for p in (paper.baseline, paper.eager, *paper.presets) if p]
    for st in dict.fromkeys([*paper.stems.values(), *(paper.stem(p) for p in named)]):
        for f in _POLICY_FIELDS:
            m.add(f + st, "--")
    m.add("PeakMatchedSentence", r"No experiment in budget mode \texttt{cap} was run.")
    m.add("TimingNoiseSentence", "")
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
    m.add("NExperiments", str(len(aggs)))
    m.add("NPolicies", str(len({p for a in aggs.values() for p in a["policies"]})))
    others = _other_experiments(aggs)
    m.raw(r"\newif\ifhaveOthers\haveOthers" + ("true" if others else "false"))
    m.add("KvOtherTables", "".join(rf"\input{{generated/tables/{e}.tex}}" for e in others))
    m.add("KvOtherNames", ", ".join(rf"\texttt{{{tex_escape(e)}}}" for e in others) or "none")
    _identical(m, aggs)
    claims(m, aggs, paper)
    zoo_macros(m, aggs)
    _peak_matched(m, aggs)
    _sweep_summaries(m, aggs)
    _defaults(m, aggs, paper, roles)
    m.raw("")
    return m.text()

"""Sentences whose direction comes from the data, each with its number and interval
(the schedule they test: docs/method.md, "The `sink` schedule").

Quality is the PPL increase over decode targets (`METRIC`): the prefill targets are scored by the same forward
under every cache policy, so counting them only dilutes a difference. An interval is read as evidence only
with enough samples (`wording.support`), and a speed ordering only when the speed run's interval excludes 1
and the ratio exceeds the timing noise that run measured by timing one computation twice (`identical`).

Which policies are compared comes from the config's `paper:` block (`roles.PaperPolicies`): the lazy
presets and the sink-less window against the StreamingLLM baseline, the eager preset's use of its slack;
which experiments, from their roles: the main experiment, the slack/max-drop ablation and the sweep of
the pruning interval R (a sweep whose knob is compress_every). A claim whose policies or experiment did
not run is left to the defaults of `claim_macro_names`.
"""

from __future__ import annotations

from typing import Mapping

from kvstream.stats import ratio_ci
from kvstream.study.bootstrap import contrast, nan
from kvstream.study.latex import MacroFile, finite, fmt, fmt_knob, tex_escape
from kvstream.study.roles import PaperPolicies, ablation_cell, first_with_role, role, sweep_knob
from kvstream.study.wording import noise_words, support

METRIC = "decode_ppl_increase_percent"  # the primary quality figure of every claim
# Comparison macros <Preset>Vs<Baseline><suffix>: the first preset gets all, the others the PPL pair.
FULL_COMPARISON = ("PplWord", "PplDiff", "PplSupport", "SpeedRatio", "SpeedWord")
PPL_COMPARISON = ("PplWord", "PplDiff")
EAGER_MACROS = ("EagerSlack", "EagerSlackSentence", "EagerResultClause")
ABLATION_MACROS = ("DeltaAtSigmaZeroSentence", "InteractionValue", "InteractionCI", "InteractionSentence",
                   "SlackEffect", "DeltaEffectAtSigmaZero", "AblCombinedInc", "AblBaseInc", "AblCombinedSentence")
INTERVAL_SWEEP_MACROS = ("SweepRLow", "SweepRHigh", "SweepRSpeedLow", "SweepRSpeedHigh", "SweepRIncLow",
                         "SweepRIncHigh", "SweepRMaxLenHigh", "SweepRSpeedWord")
# The window cache's comparison is named by its kind (no sinks), not by a policy.
WINDOW_STEM = "Window"


def sentence_ci(c: Mapping, nd: int = 2, unit: str = r"\,pp") -> str:
    if finite(c.get("lo")) and finite(c.get("hi")):
        return rf"{fmt(c['value'], nd, True)}{unit}, 95\,\% CI [{fmt(c['lo'], nd, True)}, {fmt(c['hi'], nd, True)}]"
    return rf"{fmt(c['value'], nd, True)}{unit} (one sample, no interval)"


def ci_excludes_zero(c: Mapping) -> bool | None:
    if not (finite(c.get("lo")) and finite(c.get("hi"))):
        return None
    return c["lo"] > 0 or c["hi"] < 0


def cmp_word(x: float, higher: str, lower: str, same: str = "the same as") -> str:
    if not finite(x):
        return "not comparable with"
    return higher if x > 0 else lower if x < 0 else same


def speed_ratio(slow: Mapping, fast: Mapping) -> dict:
    """How many times faster `fast` is than `slow` in the speed run: {value, lo, hi} (intervals across rounds)."""
    a, b = slow.get("speed_round_ms"), fast.get("speed_round_ms")
    if not isinstance(a, list) or not isinstance(b, list) or not a or len(a) != len(b):
        return {"value": nan(), "lo": nan(), "hi": nan()}
    r = ratio_ci(a, b)
    return {"value": r["estimate"], "lo": r["ci95"][0], "hi": r["ci95"][1]}


def speed_order(ratio: Mapping, noise: float | None, above: str = "faster than", below: str = "slower than",
                same: str = "not distinguishable in speed from") -> str:
    """`above` when the ratio's interval lies above 1 and the ratio exceeds the measured timing noise, `below`
    in the mirror case, else `same`; without an interval, `nominally ...` beyond the noise."""
    v, lo, hi = ratio.get("value"), ratio.get("lo"), ratio.get("hi")
    if not finite(v):
        return "not compared in speed with"
    beyond = not finite(noise) or v > noise or v < 1 / noise
    if finite(lo) and finite(hi):
        return above if lo > 1 and beyond else below if hi < 1 and beyond else same
    return ("nominally " + (above if v > 1 else below)) if beyond and v != 1 else same


def modes_words(*rows) -> str:
    modes = list(dict.fromkeys(str(r.get("budget_mode")) for r in rows))
    if len(modes) == 1:
        return rf"budget mode \texttt{{{tex_escape(modes[0])}}}"
    return "budget modes " + " and ".join(rf"\texttt{{{tex_escape(x)}}}" for x in modes)


def interval_sweep(aggs: Mapping[str, Mapping]) -> Mapping | None:
    """The first sweep of the pruning interval R."""
    return next((a for a in aggs.values() if role(a) == "sweep" and sweep_knob(a) == "compress_every"), None)


def _ppl_comparison(m: MacroFile, main: Mapping, pol: str, base: str, name: str) -> dict:
    c = contrast(main, {pol: 1, base: -1}, metric=METRIC)
    m.add(f"{name}PplWord", cmp_word(c["value"], "higher", "lower"))
    m.add(f"{name}PplDiff", sentence_ci(c))
    return c


def _full_comparison(m: MacroFile, main: Mapping, pol: str, base: str, name: str) -> None:
    """PPL difference with its support, speed ratio, and whether both attend over the same context."""
    c = _ppl_comparison(m, main, pol, base, name)
    rp, rb = main["policies"][pol], main["policies"][base]
    ratio = speed_ratio(rb, rp)
    m.add(f"{name}PplSupport", support(c, int(main["n_samples"])))
    m.add(f"{name}SpeedRatio", fmt(ratio["value"]) + r"$\times$" + (
        rf", 95\,\% CI [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}]" if finite(ratio["lo"]) else ""))
    lp, lb = rp.get("trace_max"), rb.get("trace_max")
    if finite(lp) and finite(lb) and lp != lb:
        m.add(f"{name}ContextSentence",
              rf"{tex_escape(rp['label'])} attends over up to {fmt(lp, 0)} tokens per forward and "
              rf"{tex_escape(rb['label'])} over {fmt(lb, 0)} (measured, column Max.~$L$; " + modes_words(rp, rb)
              + "): they do not see the same amount of context, "
              r"which confounds any quality or speed difference between them.")
    elif finite(lp) and finite(lb):
        m.add(f"{name}ContextSentence",
              rf"Both attend over at most {fmt(lp, 0)} tokens per forward (measured), so a difference between "
              r"them is not one of context length.")
    m.add(f"{name}SpeedWord", speed_order(ratio, m.noise.get(main.get("dataset"))))


def _eager(m: MacroFile, main: Mapping, paper: PaperPolicies) -> None:
    """Whether the R = 1 preset ever used its slack (the schedule says it cannot)."""
    if paper.eager not in main["policies"]:
        m.add("EagerResultClause", "")
        m.add("EagerSlackSentence",
              r"By the schedule alone: with $R=1$ an event happens at an overflow of one token and removes "
              r"$\max(\min(1,\delta),1-\sigma)=1$ token for any $\delta\ge1$, so the cache never exceeds $C+1$ "
              r"and the slack is never used. (The eager preset is not in this run's configuration.)")
        return
    r = main["policies"][paper.eager]
    label = tex_escape(r["label"])
    m.add("EagerResultClause", rf", and {label} {fmt(r.get('speedup'))}$\times$ at "
                               rf"{fmt(r.get(METRIC), 2, True)}\,\%")
    budget, tmax = r.get("budget"), r.get("trace_max")
    m.add("EagerSlack", fmt_knob(r.get("cache_slack")))
    if finite(budget) and finite(tmax):
        m.add("EagerSlackSentence",
              rf"With $R=1$ the measured forward length of {label} never exceeded {fmt(tmax, 0)} tokens "
              rf"($C+{fmt(tmax - budget, 0)}$ with $C={fmt(budget, 0)}$), so its slack "
              rf"$\sigma={fmt_knob(r.get('cache_slack'))}$ " +
              ("was never used: each event drops $\\min(\\text{overflow},\\delta)=1$ token, as the schedule "
               f"predicts. ``{label}'' is therefore a StreamingLLM cache with more sinks, not a soft-eviction "
               "policy." if tmax <= budget + 1 else
               "was used, which Eq.~\\eqref{eq:schedule} does not allow: the implementation departs from the "
               "schedule."))


def main_claims(m: MacroFile, main: Mapping, paper: PaperPolicies) -> None:
    """The main experiment: presets and the window cache against the baseline, the eager preset, the
    range of the sink policies' PPL increase."""
    pols = main["policies"]
    base = paper.baseline
    if base in pols:
        bstem = paper.stem(base)
        for i, pol in enumerate(p for p in paper.presets if p in pols):
            if i == 0 and pol == paper.presets[0]:
                _full_comparison(m, main, pol, base, f"{paper.stem(pol)}Vs{bstem}")
            else:
                _ppl_comparison(m, main, pol, base, f"{paper.stem(pol)}Vs{bstem}")
        window = next((p for p in main["policies_order"] if pols[p].get("type") == "window"), None)
        if window is not None:
            _ppl_comparison(m, main, window, base, f"{WINDOW_STEM}Vs{bstem}")
    _eager(m, main, paper)
    incs = [r.get(METRIC) for r in pols.values() if r.get("type") == "sink"]
    incs = [x for x in incs if finite(x)]
    if incs:
        lo, hi = fmt(min(incs), 2, True), fmt(max(incs), 2, True)
        m.add("SinkIncMin", lo)
        m.add("SinkIncMax", hi)
        m.add("SinkIncRange", rf"is {lo}\,\% for every one of them" if lo == hi else
              rf"ranges from {lo}\,\% to {hi}\,\%")


def _delta_at_sigma_zero(m: MacroFile, without: Mapping, capped: Mapping) -> None:
    """At sigma = 0 the schedule cannot depend on delta: say whether the two cells agree bit for bit."""
    same_nll = (without["per_sample"].get("nll_sha256") == capped["per_sample"].get("nll_sha256")
                and None not in (without["per_sample"].get("nll_sha256") or [None]))
    same_trace = (without["per_sample"].get("trace_sha256") == capped["per_sample"].get("trace_sha256"))
    if same_nll:
        text = (r"At $\sigma=0$ the runs with and without a max-drop cap produced bit-identical per-token "
                r"NLL files, as the schedule predicts (with $\sigma=0$ an event always removes the whole "
                r"overflow, so $\delta$ cannot act).")
    else:
        text = (rf"At $\sigma=0$ the runs with and without a max-drop cap differ "
                rf"({fmt(without[METRIC], 4, True)}\,\% vs {fmt(capped[METRIC], 4, True)}\,\%) although with "
                r"$\sigma=0$ the schedule cannot depend on $\delta$; " +
                (r"their measured cache-length traces are identical, so the difference is numerical "
                 r"run-to-run variation, not an effect of $\delta$." if same_trace else
                 r"their measured cache-length traces differ too, which points to an implementation "
                 r"that does not follow the schedule."))
    m.add("DeltaAtSigmaZeroSentence", text)


def ablation_claims(m: MacroFile, abl: Mapping) -> None:
    """The 2x2 (sigma, delta) design: delta at sigma = 0, main effects and their interaction."""
    sinks = [r for r in abl["policies"].values() if r.get("type") == "sink"]
    r_s0_dn = ablation_cell(abl, 0, None)
    r_s16_dn = next((r for r in sinks if (r.get("cache_slack") or 0) > 0 and r.get("max_drop") is None), None)
    r_s0_d = next((r for r in sinks if r.get("cache_slack") == 0 and r.get("max_drop") is not None), None)
    r_s16_d = next((r for r in sinks if (r.get("cache_slack") or 0) > 0 and r.get("max_drop") is not None), None)
    if r_s0_dn and r_s0_d:
        _delta_at_sigma_zero(m, r_s0_dn, r_s0_d)
    full = bool(r_s0_dn and r_s16_dn and r_s0_d and r_s16_d)
    m.raw(r"\haveAblation" + ("true" if full else "false"))
    if not full:
        return
    c = contrast(abl, {r_s16_d["policy"]: 1, r_s16_dn["policy"]: -1, r_s0_d["policy"]: -1, r_s0_dn["policy"]: 1},
                 metric=METRIC)
    hashes = {tuple(r["per_sample"].get("nll_sha256") or [None]) for r in (r_s0_dn, r_s16_dn, r_s0_d, r_s16_d)}
    if len(hashes) == 1 and None not in next(iter(hashes)):
        m.add("InteractionSentence",
              r"All four cells produced bit-identical per-token NLL on every sample, so the effects of slack "
              r"and max-drop and their interaction are exactly zero in this run.")
    m.add("InteractionValue", fmt(c["value"], 2, True))
    m.add("InteractionCI", sentence_ci(c))
    m.add("InteractionSentence",
          r"The interaction contrast $(\Delta_{\sigma,\delta}-\Delta_{\sigma,\infty})-(\Delta_{0,\delta}-\Delta_{0,\infty})$ "
          rf"of the decode PPL increase is {sentence_ci(c)}; {support(c, int(abl['n_samples']))}.")
    # main effects (each at the other's baseline)
    cs = contrast(abl, {r_s16_dn["policy"]: 1, r_s0_dn["policy"]: -1}, metric=METRIC)
    cd = contrast(abl, {r_s0_d["policy"]: 1, r_s0_dn["policy"]: -1}, metric=METRIC)
    m.add("SlackEffect", sentence_ci(cs))
    m.add("DeltaEffectAtSigmaZero", sentence_ci(cd))
    both, neither = fmt(r_s16_d[METRIC], 2, True), fmt(r_s0_dn[METRIC], 2, True)
    m.add("AblCombinedInc", both)
    m.add("AblBaseInc", neither)
    m.add("AblCombinedSentence",
          rf"The combination ($\sigma>0$, finite $\delta$) and neither knob have the same decode PPL increase, "
          rf"{both}\,\%." if both == neither else
          rf"The combination ($\sigma>0$, finite $\delta$) has a decode PPL increase of {both}\,\%, against "
          rf"{neither}\,\% for neither.")


def interval_sweep_claims(m: MacroFile, sw: Mapping) -> None:
    """The R sweep's ends: speedup, PPL increase and forward length at the smallest and largest R."""
    rows = sorted([r for r in sw["policies"].values() if r.get("type") == "sink"],
                  key=lambda r: r.get("compress_every") or 0)
    if len(rows) < 2:
        return
    lo, hi = rows[0], rows[-1]
    m.add("SweepRLow", fmt_knob(lo["compress_every"]))
    m.add("SweepRHigh", fmt_knob(hi["compress_every"]))
    m.add("SweepRSpeedLow", fmt(lo.get("speedup")))
    m.add("SweepRSpeedHigh", fmt(hi.get("speedup")))
    m.add("SweepRIncLow", fmt(lo.get(METRIC), 2, True))
    m.add("SweepRIncHigh", fmt(hi.get(METRIC), 2, True))
    m.add("SweepRMaxLenHigh", fmt(hi.get("trace_max"), 0))
    noise = m.noise.get(sw.get("dataset"))
    word = speed_order(speed_ratio(lo, hi), noise, "higher", "lower", "a change within " + noise_words(noise))
    m.add("SweepRSpeedWord", word)


def claims(m: MacroFile, aggs: Mapping[str, Mapping], paper: PaperPolicies) -> None:
    main = first_with_role(aggs, "main")
    if main:
        main_claims(m, main, paper)
    abl = first_with_role(aggs, "ablation")
    if abl:
        ablation_claims(m, abl)
    sw = interval_sweep(aggs)
    if sw:
        interval_sweep_claims(m, sw)


def claim_macro_names(paper: PaperPolicies) -> list[str]:
    """Every claim macro the paper may quote, for the defaults of a run that lacks its inputs."""
    names = []
    if paper.baseline:
        bstem = paper.stem(paper.baseline)
        for i, pol in enumerate(paper.presets):
            names += [f"{paper.stem(pol)}Vs{bstem}{s}" for s in (FULL_COMPARISON if i == 0 else PPL_COMPARISON)]
        names += [f"{WINDOW_STEM}Vs{bstem}{s}" for s in PPL_COMPARISON]
    names += [*EAGER_MACROS, *ABLATION_MACROS, *INTERVAL_SWEEP_MACROS, "SinkIncMin", "SinkIncMax", "SinkIncRange"]
    if paper.baseline and paper.presets:
        names.append(f"{paper.stem(paper.presets[0])}Vs{paper.stem(paper.baseline)}ContextSentence")
    return names

"""Policies that computed the same thing, and the timing noise they measure (docs/method.md, "Identical
schedules" and "Speed").

Two policies whose cells are bit-identical (same per-token NLL and cache-length trace on every sample) ran the
same computation. Where the speed run timed both (the noise probe, `speed.noise_probe`: the first policy that
reuses another's cells is timed anyway), their TPOT ratio is pure timing noise: a speed difference between
other policies inside that factor is not read as an ordering.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from kvstream.stats import ratio_ci
from kvstream.study.latex import MacroFile, finite, fmt, macro_stem
from kvstream.study.wording import and_list, plural, policy_names


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


def timed_pairs(group: Sequence[Mapping]) -> list[tuple[dict, dict, dict]]:
    """(a, b, ratio of b's TPOT to a's across rounds) for members of one group that were both timed themselves
    in the same speed run (not a timing taken over from the policy whose cells they reuse)."""
    timed = [r for r in group if isinstance(r.get("speed_round_ms"), list) and r["speed_round_ms"]
             and not r.get("speed_from")]
    out = []
    for i, a in enumerate(timed):
        for b in timed[i + 1:]:
            if len(a["speed_round_ms"]) == len(b["speed_round_ms"]):
                r = ratio_ci(b["speed_round_ms"], a["speed_round_ms"])
                out.append((a, b, {"value": r["estimate"], "lo": r["ci95"][0], "hi": r["ci95"][1]}))
    return out


def noise_factor(ratio: Mapping) -> float:
    """The factor a ratio of two timings of one computation reaches at most: its point or interval ends, up or
    down."""
    ends = [ratio[k] for k in ("value", "lo", "hi") if finite(ratio.get(k)) and ratio[k] > 0]
    return max(max(v, 1 / v) for v in ends)


def _by_policy(aggs: Mapping[str, Mapping], dataset: str | None = None) -> list[dict]:
    seen: dict[str, dict] = {}
    for agg in aggs.values():
        if dataset is None or agg.get("dataset") == dataset:
            for pol, r in agg["policies"].items():
                seen.setdefault(pol, r)
    return list(seen.values())


def noise_by_dataset(aggs: Mapping[str, Mapping]) -> dict[str, tuple[float, tuple]]:
    """dataset -> (noise factor, the pair that measured it) for each speed run that timed one computation twice."""
    out = {}
    for ds in dict.fromkeys(a.get("dataset") for a in aggs.values()):
        pairs = [p for g in identical_groups(_by_policy(aggs, ds)) for p in timed_pairs(g)]
        if pairs:
            worst = max(pairs, key=lambda p: noise_factor(p[2]))
            out[ds] = (noise_factor(worst[2]), worst)
    return out


def _group_text(g: Sequence[Mapping]) -> str:
    names = and_list(policy_names(g))
    timed = [r for r in g if finite(r.get("tpot_ms")) and not r.get("speed_from")]
    if len(timed) > 1:
        ms = and_list([fmt(r["tpot_ms"], 1) for r in timed])
        return rf"{names} (evaluated once; timed separately {_times(len(timed))}: {ms}\,ms)"
    return rf"{names} (evaluated and timed once)"


def _times(k: int) -> str:
    return {2: "twice", 3: "three times"}.get(k, plural(k, "time"))


def identical_macros(m: MacroFile, aggs: Mapping[str, Mapping]) -> None:
    """IdenticalSentence<Experiment>, IdenticalAllSentence, the timing noise of each speed run (m.noise) and
    the main dataset's TimingNoiseFactor and TimingNoiseSentence."""
    for exp, agg in aggs.items():
        groups = identical_groups(agg["policies"].values())
        m.add("IdenticalSentence" + macro_stem(exp),
              ("These policies share one eviction schedule (the same cache-length trace) and produced bit-identical "
               "per-token NLL on every sample: " + "; ".join(_group_text(g) for g in groups) + ".") if groups else "")
    groups = identical_groups(_by_policy(aggs))
    m.add("IdenticalAllSentence",
          ("Across all experiments, these groups of policies have the same eviction schedule although their knobs "
           "differ, so they evict the same tokens at the same steps and their per-token NLL is bit-identical: "
           + "; ".join(_group_text(g) for g in groups) + ".") if groups else
          "No two policies produced identical results.")
    m.noise = {ds: factor for ds, (factor, _) in noise_by_dataset(aggs).items()}
    main = next((a for a in aggs.values() if a.get("role") == "main"), next(iter(aggs.values()), None))
    found = noise_by_dataset(aggs).get(main.get("dataset")) if main else None
    if not found:
        return
    factor, (a, b, ratio) = found
    rounds = (main.get("speed") or {}).get("rounds")
    first, second = policy_names([a, b])
    m.add("TimingNoiseFactor", fmt(factor, 2))
    m.add("TimingNoiseSentence",
          rf"The speed run timed one computation twice: {first} and {second} share their eviction schedule, so "
          rf"they run exactly the same steps, yet their TPOT ratio is {fmt(ratio['value'], 2)} (95\,\% CI "
          rf"[{fmt(ratio['lo'], 2)}, {fmt(ratio['hi'], 2)}] across the {rounds} rounds). This is the timing noise "
          rf"of this machine; a speed ratio within a factor of {fmt(factor, 2)} is not read as an ordering here.")

"""Figures of the study (matplotlib, Agg backend, vector PDF + PNG), from aggregates and measured cells.

- `tradeoff`: speedup vs decode PPL increase for every policy of the main text, 95 % intervals as error bars;
- `sweep_{experiment}`: decode PPL increase and speedup against the swept knob;
- `cache_trace`: the MEASURED cache length (`trace.cache_len` of cells) over the first decode steps for
  sink policies with R = 1, 32, 64 (or whichever R values exist);
- `nll_along`: per-token NLL (moving average) along the sequence for the reference, the window cache and
  the paper's baseline (or the first sink policy);
- `zoo_ppl`, `zoo_speed`: the policy zoo's figures (`zoo_figures`).
Shared style, colours and writing: `plotting`. Every series differs from the others in colour, marker and line
style; a reference is drawn as a grey band under them; no figure shows a config name (labels, knobs).

Which experiment is which comes from its role, point labels from the config's `paper:` block (`roles`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from kvstream.study.inputs import group_cells, load_nll, sample_order
from kvstream.study.latex import fmt_knob
from kvstream.study.plotting import FIGSIZE, REFERENCE, errorbars, pyplot, save, series
from kvstream.study.roles import PaperPolicies, main_aggregate, policy_label, role, sweep_knob, with_role
from kvstream.study.zoo import zoo_experiment
from kvstream.study.zoo_figures import zoo_figures

METRIC = "decode_ppl_increase_percent"  # the quality axis of every figure
# The other points of the trade-off figure, by role: (roles, legend, marker, grey).
_GROUPS = ((("ablation",), r"$\sigma$/$\delta$ ablation", "s", "0.45"),
           (("sweep", "peak_matched", "sanity", "other"), "sweeps and other experiments", "^", "0.7"))


def _main_text_rows(aggs: Mapping[str, Mapping]) -> tuple[list[dict], Mapping | None]:
    """Each policy once (the main experiment first, then the ablation, then the rest by name) of the
    experiments on the main text against its reference; the zoo has its own figures."""
    main = main_aggregate(aggs)
    if main is None:
        return [], None
    first = with_role(aggs, "main") + with_role(aggs, "ablation")
    seen: dict[str, dict] = {}
    for exp in first + sorted(e for e in aggs if e not in first):
        agg = aggs[exp]
        if role(agg) == "zoo" or agg.get("dataset") != main.get("dataset") or agg.get("reference") != main.get("reference"):
            continue
        for pol in agg["policies_order"]:
            r = agg["policies"][pol]
            if pol not in seen and not r.get("is_reference") and np.isfinite(r.get("speedup", np.nan)) \
                    and np.isfinite(r.get(METRIC, np.nan)):
                seen[pol] = dict(r, _role=role(agg), _main=agg is main)
    return list(seen.values()), main


def _off_scale(rows: Sequence[Mapping]) -> set[str]:
    """Policies far outside the others' range (the sink-less window): drawn at the edge, their value in the legend."""
    xs = np.array([r[METRIC] for r in rows])
    if xs.size < 4:
        return set()
    med = np.median(xs)
    spread = np.percentile(np.abs(xs - med), 75) + 1e-9
    return {r["policy"] for r in rows if abs(r[METRIC] - med) > 8 * spread + 1.0}


def tradeoff(aggs: Mapping[str, Mapping], out_dir, extra_dirs=(), name: str = "tradeoff",
             paper: Mapping | None = None) -> list[Path]:
    """Speedup vs decode PPL increase for the policies of the main text: the main experiment's each with its own
    colour and marker, named in the legend (no label on the plot to overlap); the others grey by role. A policy
    far outside the others' range is drawn at the edge, its values in the legend. paper: the config's `paper:`
    block."""
    plt = pyplot()
    rows, main = _main_text_rows(aggs)
    off = _off_scale(rows)
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], FIGSIZE[1] + 0.6))
    named = [r for r in rows if r["_main"]]
    for i, r in enumerate(named):
        color, marker, _ = series(i + 1)
        x, xerr = errorbars([r], METRIC)
        y, yerr = errorbars([r], "speedup")
        if r["policy"] in off:
            side = 1 if r[METRIC] > 0 else 0
            ax.plot([side], [r["speedup"]], marker=">" if side else "<", color=color, ms=6, ls="none",
                    transform=ax.get_yaxis_transform(), clip_on=False, zorder=4,
                    label=f"{r['label']}: {r[METRIC]:+.1f}%, {r['speedup']:.2f}x (off scale: at the edge)")
            continue
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=5, color=color, ecolor=color, elinewidth=0.7,
                    capsize=2, label=r["label"], zorder=4)
    for roles, lab, marker, grey in _GROUPS:
        sel = [r for r in rows if not r["_main"] and r["_role"] in roles and r["policy"] not in off]
        if sel:
            x, xerr = errorbars(sel, METRIC)
            y, yerr = errorbars(sel, "speedup")
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=3, color=grey, ecolor=grey, elinewidth=0.5,
                        capsize=1.2, label=lab, zorder=2)
    ax.axvline(0, color="0.75", lw=0.6, ls=":", zorder=0)
    ax.set_xlabel("decode PPL increase vs. full recomputation (%)")
    ax.set_ylabel("speedup vs. full recomputation (x)")
    if rows:  # under the axes: the plot keeps the figure's width
        ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    n = main["n_samples"] if main else 0
    ax.set_title(f"Quality and speed on the main text ({n} samples; bars: 95% intervals)")
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out


def sweep(agg: Mapping, experiment: str, out_dir, extra_dirs=(), name: str | None = None) -> list[Path]:
    """Decode PPL increase and speedup against the swept knob (configured, else the one that varies)."""
    plt = pyplot()
    knob = sweep_knob(agg) or "compress_every"
    rows = [r for r in agg["policies"].values() if r.get("type") == "sink"]
    finite = [r for r in rows if r.get(knob) is not None]
    inf_rows = [r for r in rows if r.get(knob) is None]
    finite.sort(key=lambda r: r[knob])
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0], 2.3))
    xs = [r[knob] for r in finite]
    knob_label = {"compress_every": r"pruning interval $R$", "cache_slack": r"slack $\sigma$",
                  "max_drop": r"max-drop $\delta$", "n_sink": r"sinks $S$", "window_size": r"window $W$"}.get(knob, knob)
    color, marker, _ = series(2)
    for ax, metric, ylab in ((axes[0], METRIC, "decode PPL increase (%)"), (axes[1], "speedup", "speedup (x)")):
        y, yerr = errorbars(finite, metric)
        ax.errorbar(xs, y, yerr=yerr, fmt=marker + "-", ms=3.5, lw=1, color=color, capsize=2, elinewidth=0.7)
        for r in inf_rows:  # delta = infinity
            ax.axhline(r.get(metric, np.nan), color=series(1)[0], ls="--", lw=0.8, label=knob_label + r" $=\infty$")
        if xs and min(xs) > 0 and max(xs) / max(min(xs), 1e-9) >= 16:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([fmt_knob(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(knob_label)
        ax.set_ylabel(ylab)
        if inf_rows:
            ax.legend(frameon=False)
    fig.suptitle(f"Pooled over {agg['n_samples']} samples; bars: 95% bootstrap intervals (quality), "
                 f"t-intervals across rounds (speed)", fontsize=7)
    fig.tight_layout()
    out = save(fig, out_dir, name or experiment, extra_dirs)
    plt.close(fig)
    return out


def cache_trace(cell_paths: Iterable[str | os.PathLike], out_dir, extra_dirs=(), name: str = "cache_trace",
                r_values: Sequence[int] = (1, 32, 64), steps: int = 400) -> list[Path]:
    """The measured `trace.cache_len` of the first sample for one sink policy per R value (those that
    differ only in R are preferred: the family with most R values)."""
    plt = pyplot()
    by = group_cells(cell_paths)
    sinks = {}
    for pol, cells in by.items():
        c = cells[sample_order(cells)[0]]
        if c["policy"].get("type") == "sink" and (c.get("trace") or {}).get("cache_len"):
            sinks[pol] = c
    # family: same (S, W, sigma, delta); pick the one covering most requested R values
    fams: dict[tuple, dict[int, tuple[str, dict]]] = {}
    for pol, c in sinks.items():
        p = c["policy"]
        key = (p.get("n_sink"), p.get("window_size"), p.get("cache_slack"), p.get("max_drop"), p.get("budget_mode"))
        r = p.get("compress_every")
        prev = fams.setdefault(key, {}).get(r)
        if prev is None or pol < prev[0]:
            fams[key][r] = (pol, c)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if fams:
        key = max(fams, key=lambda k: (sum(r in fams[k] for r in r_values), len(fams[k])))
        fam = fams[key]
        chosen = [r for r in r_values if r in fam]
        rest = [r for r in sorted(fam) if r not in chosen]
        chosen = sorted(chosen + rest[: max(0, len(r_values) - len(chosen))])
        budget = None
        for i, r in enumerate(chosen):
            _, c = fam[r]
            tr = np.asarray(c["trace"]["cache_len"])[:steps]
            color, _, ls = series(i)
            # the smallest R on top: the eager trace (C + 1) runs along the budget line drawn under it
            ax.step(np.arange(tr.size), tr, where="post", lw=1.3 if i == 0 else 1.0, color=color, ls=ls,
                    zorder=5 - i, label=f"R = {r} (largest {int(tr.max())})")
            budget = c["policy"].get("budget")
        if budget:
            ax.axhline(budget, color="0.55", ls=":", lw=0.9, zorder=0, label=f"budget C = {budget}")
            top = ax.get_ylim()[1]
            ax.set_ylim(budget - 0.06 * (top - budget) - 1, top)
        s, w, sig, dl, _ = key
        dtxt = r"$\infty$" if dl is None else str(dl)
        ax.set_title(f"Measured cache length per decode step ($S$={s}, $W$={w}, $\\sigma$={sig}, "
                     f"$\\delta$={dtxt}; first sample)")
    else:
        ax.text(0.5, 0.5, "no sink cells with a trace", ha="center", transform=ax.transAxes)
    ax.set_xlabel("decode step")
    ax.set_ylabel("tokens attended by the forward")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out


def moving_average(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over each window of k targets, of the finite values only (a reference scored on every
    k-th target has NaN elsewhere); NaN where a window holds none."""
    x = np.asarray(x, dtype=float)
    k = max(1, min(int(k), x.size))
    ok = np.isfinite(x)
    c = np.cumsum(np.insert(np.where(ok, x, 0.0), 0, 0.0))
    m = np.cumsum(np.insert(ok.astype(float), 0, 0.0))
    count = m[k:] - m[:-k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (c[k:] - c[:-k]) / np.maximum(count, 1), np.nan)


def default_nll_policies(by: Mapping[str, Mapping[str, dict]], baseline: str | None = None) -> list[str]:
    """The reference (a recompute policy), the first window cache, and the baseline (else the first sink)."""
    def of_type(kind):
        return [p for p, cells in by.items() if next(iter(cells.values()))["policy"].get("type") == kind]

    out = of_type("recompute")[:1] + of_type("window")[:1]
    out += [baseline] if baseline in by else of_type("sink")[:1]
    return out


def nll_along(cell_paths: Iterable[str | os.PathLike], out_dir, extra_dirs=(), name: str = "nll_along",
              policies: Sequence[str] | None = None, smooth: int = 64, paper: Mapping | None = None) -> list[Path]:
    """Per-token NLL along the sequence (mean over samples, then a moving average); lower panel: the
    difference to the first policy (the reference) on the same targets. policies: default
    `default_nll_policies`; paper: the config's `paper:` block (legend labels)."""
    plt = pyplot()
    by = group_cells(cell_paths)
    pp = PaperPolicies.from_config({"paper": paper})
    if policies is None:
        policies = default_nll_policies(by, pp.baseline)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(FIGSIZE[0], 4.0), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    prefill = None
    n_s = 0
    base = None
    k_used = smooth
    drawn = 0
    for pol in policies:
        if pol not in by:
            continue
        cells = by[pol]
        keys = sample_order(cells)
        arrs = [load_nll(cells[s]["_path"]) for s in keys]
        n = min(a.size for a in arrs)
        mean = np.mean([a[:n] for a in arrs], axis=0)
        k_used = k = min(smooth, max(1, n // 8))
        ma = moving_average(mean, k)
        x = np.arange(ma.size) + k
        c0 = cells[keys[0]]
        lab = policy_label(pol, c0["policy"], pp.labels.get(pol))
        if base is None:  # the reference: a grey band under the others, so neither hides the other
            ax.plot(x, ma, label=lab, **REFERENCE)
            base = (lab, mean)
        else:
            color, _, ls = series(drawn + 1)
            drawn += 1
            ax.plot(x, ma, lw=0.9, color=color, ls=ls, label=lab, zorder=3)
            m = min(base[1].size, mean.size)
            d = moving_average(mean[:m] - base[1][:m], k)
            ax2.plot(np.arange(d.size) + k, d, lw=0.9, color=color, ls=ls, zorder=3)
        if c0["policy"].get("type") != "recompute" and prefill is None:  # the reference has no prefill mark
            prefill = c0["policy"].get("prefill_len")
        n_s = max(n_s, len(arrs))
    for a in (ax, ax2):
        if prefill:
            a.axvline(prefill, color="0.5", ls=":", lw=0.8)
    if prefill:
        ax.text(prefill, ax.get_ylim()[1], " end of prefill", fontsize=6, va="top", color="0.4")
    ax2.axhline(0, color="0.6", lw=0.6)
    ax2.set_xlabel("target position in the sample")
    ax.set_ylabel("NLL (nats)")
    ax2.set_ylabel("minus reference (nats)")  # the reference: the upper panel's grey band
    ax.set_title(f"Per-token NLL along the sequence (mean over {n_s} samples, moving average of {k_used})")
    ax.legend(frameon=False, fontsize=6)  # the lower panel's lines keep their upper-panel styles
    fig.tight_layout()
    out = save(fig, out_dir, name, extra_dirs)
    plt.close(fig)
    return out


def all_figures(aggs: Mapping[str, Mapping], cell_paths: Sequence[str | os.PathLike], out_dir,
                extra_dirs=(), paper: Mapping | None = None) -> list[Path]:
    """The trade-off, one figure per sweep, the zoo's two (its first experiment), and from the cells the
    cache trace and the NLL along the text."""
    out = tradeoff(aggs, out_dir, extra_dirs, paper=paper)
    for exp in with_role(aggs, "sweep"):
        out += sweep(aggs[exp], exp, out_dir, extra_dirs)
    zoo = zoo_experiment(aggs)
    if zoo:
        out += zoo_figures(zoo[1], out_dir, extra_dirs)
    if cell_paths:
        out += cache_trace(cell_paths, out_dir, extra_dirs)
        out += nll_along(cell_paths, out_dir, extra_dirs, paper=paper)
    return out

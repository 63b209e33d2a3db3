"""The long stream past the model's trained context (an experiment with role longstream; docs/method.md,
"Long stream"): per policy, the decode targets' PPL before and after the trained context, the increase against
the recompute reference on the targets both scored, where the moving-average NLL rises past its whole range
before the trained context, and the moving-average curves the figure draws (kvstream.study.longstream_figure).

Positions: target i (0-based, `.nll.npy` order) predicts token i + 1 from the forward whose query is token i, at
position i of the stream. It is "after" the trained context M when i >= M: a dense cache then places its query
past every position the model was trained on. Torch-free: it reads cells written by `kvstream eval`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kvstream.errors import KVStreamError
from kvstream.io import atomic_write_text, write_json
from kvstream.study.inputs import cell_nll, group_cells, sample_order
from kvstream.study.latex import fmt, tex_escape
from kvstream.study.roles import policy_label
from kvstream.study.verify import check_experiment, code_versions
from kvstream.study.wording import and_list, dataset_name, plural

SMOOTH_TOKENS = 256  # the moving average's window, and the blocks of the rise criterion
REFERENCE_MIN_TARGETS = 16  # a subsampled reference's window holds at least this many of its targets per sample
RISE_SD, MIN_RISE_BLOCKS = 3.0, 2  # a rise: >= 2 blocks up to the end, each 3 SD above the blocks before
CURVE_STRIDE = 16  # the summary keeps every 16th point of a curve (the figure needs no more)
TABLE_LABEL = "tab:longstream"
FIGURE_LABEL = "fig:longstream"


def trained_context(model_config: str | os.PathLike) -> int:
    """The model's trained context: max_position_embeddings of its config.json."""
    try:
        value = json.loads(Path(model_config).read_text()).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError) as exc:
        raise KVStreamError(f"{model_config}: cannot read the model's config ({exc})") from None
    if not isinstance(value, int) or value < 1:
        raise KVStreamError(f"{model_config}: max_position_embeddings is {value!r}: the long stream needs the "
                            "model's trained context")
    return value


# ------------------------------------------------------------------------------------------------
# from cells to the summary


def moving_average(nll: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(centres, means): the mean NLL over every `window` consecutive positions, pooled over the rows
    (samples) and their scored (finite) targets; NaN where a window holds none."""
    finite = np.isfinite(nll)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, nll, 0.0).sum(axis=0))])
    counts = np.concatenate([[0], np.cumsum(finite.sum(axis=0))])
    n = nll.shape[1] - window + 1
    if n < 1:
        return np.zeros(0), np.zeros(0)
    total, count = sums[window:] - sums[:n], counts[window:] - counts[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return np.arange(n) + (window - 1) / 2.0, means


def rise_from(nll: np.ndarray, start: int, trained: int, block: int = SMOOTH_TOKENS) -> int | None:
    """Where the NLL rises clearly: the first position of the first block of `block` decode targets from which
    on every block's mean NLL lies more than RISE_SD standard deviations of the block means before the trained
    context above their mean, for at least MIN_RISE_BLOCKS blocks up to the end; None when there is no such run
    (or fewer than two blocks lie wholly before the trained context). Blocks start at the first decode target."""
    edges = range(start, nll.shape[1] - block + 1, block)
    means = [float(np.nanmean(nll[:, a:a + block])) if np.isfinite(nll[:, a:a + block]).any() else np.nan for a in edges]
    starts = list(edges)
    before = [m for a, m in zip(starts, means) if a + block <= trained and np.isfinite(m)]
    if len(before) < 2:
        return None
    ceiling = float(np.mean(before) + RISE_SD * np.std(before, ddof=1))
    found, run = None, 0
    for a, m in reversed(list(zip(starts, means))):  # the longest run of blocks above the ceiling up to the end
        if not (np.isfinite(m) and m > ceiling):
            break
        found, run = a, run + 1
    return found if run >= MIN_RISE_BLOCKS else None


def _ppl(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.exp(values.mean())) if values.size else None


def _increase(x: np.ndarray, ref: np.ndarray) -> tuple[float | None, int]:
    """100 (exp(mean(NLL - NLL_ref)) - 1) over the targets both scored, and how many there are."""
    both = np.isfinite(x) & np.isfinite(ref)
    if not both.any():
        return None, 0
    return float(100.0 * (np.exp((x[both] - ref[both]).mean()) - 1.0)), int(both.sum())


def summarize_cells(cell_paths: Sequence[str | os.PathLike], *, experiment: str, policies: Sequence[str],
                    reference: str, trained: int, labels: Mapping[str, str] | None = None,
                    policy_blocks: Mapping[str, Mapping] | None = None, run_facts: Mapping | None = None,
                    allow_mixed_code: bool = False) -> dict:
    """The long stream's summary (module docstring), from the experiment's cells, checked as the aggregate
    checks them (kvstream.study.verify): each against its .nll.npy, its policy block and the run's facts."""
    by_policy = group_cells(cell_paths)
    missing = [p for p in policies if p not in by_policy]
    if missing:
        raise KVStreamError(f"experiment {experiment}: no cells for policies {missing}")
    if reference not in policies:
        raise KVStreamError(f"experiment {experiment}: the reference {reference} is not one of its policies")
    check_experiment(by_policy, list(policies), policy_blocks=policy_blocks, run_facts=run_facts)
    versions, code_note = code_versions(by_policy, list(policies), experiment=experiment, allow_mixed=allow_mixed_code)
    samples = sample_order(set.intersection(*(set(by_policy[p]) for p in policies)))
    first = by_policy[reference][samples[0]]
    n_tokens = int(first["provenance"]["n_tokens"])
    if n_tokens - 1 <= trained:
        raise KVStreamError(f"experiment {experiment}: its samples of {n_tokens} tokens end within the model's trained "
                            f"context of {trained} tokens: set the dataset's tokens_per_sample above {trained + 1}")
    nll = {p: np.stack([cell_nll(by_policy[p][s]) for s in samples]) for p in policies}
    ref = nll[reference]
    every = int(first["policy"].get("recompute_every") or 1)
    position = np.arange(n_tokens - 1)
    rows = {}
    for p in policies:
        cell = by_policy[p][samples[0]]
        x, prefill = nll[p], int(cell["policy"]["prefill_len"])
        decode = position >= prefill
        regions = {"before": decode & (position < trained), "after": decode & (position >= trained)}
        row = {"policy": p, "label": policy_label(p, cell["policy"], (labels or {}).get(p)), "type": cell["policy"]["type"],
               "prefill_len": prefill, "is_reference": p == reference}
        for name, mask in regions.items():
            row[f"ppl_{name}"] = _ppl(x[:, mask])
            row[f"n_{name}"] = int(np.isfinite(x[:, mask]).sum())
            row[f"increase_{name}"], row[f"n_paired_{name}"] = _increase(x[:, mask], ref[:, mask])
        scored_every = every if p == reference else 1
        window = max(SMOOTH_TOKENS, REFERENCE_MIN_TARGETS * scored_every)
        centres, means = moving_average(x[:, prefill:], window)
        row["window"] = window
        row["x"] = [round(float(c + prefill), 1) for c in centres[::CURVE_STRIDE]]
        row["y"] = [None if not np.isfinite(v) else round(float(v), 5) for v in means[::CURVE_STRIDE]]
        row["rise_from"] = rise_from(x, prefill, trained) if scored_every == 1 else None
        rows[p] = row
    facts = run_facts or {}
    return {"kind": "kvstream-longstream", "experiment": experiment, "model": facts.get("model"),
            "dataset": facts.get("dataset") or (first.get("cell") or {}).get("dataset"), "n_tokens": n_tokens,
            "samples": samples, "n_samples": len(samples), "trained_context": trained, "reference": reference,
            "recompute_every": every, "smooth_tokens": SMOOTH_TOKENS, "code_versions": versions,
            "code_note": code_note, "policies": rows}


def load_summary(path: str | os.PathLike) -> dict:
    summary = json.loads(Path(path).read_text())
    if summary.get("kind") != "kvstream-longstream":
        raise KVStreamError(f"{path}: not a long-stream summary (kind {summary.get('kind')!r})")
    return summary


def summary_markdown(s: Mapping) -> str:
    head = (f"# Long stream: {s['experiment']} ({s['n_samples']} samples x {s['n_tokens']} tokens, trained context "
            f"{s['trained_context']}, reference {s['reference']} scored every {s['recompute_every']}th decode target)\n\n"
            "| policy | PPL before | PPL after | increase before (%) | increase after (%) | paired before/after | "
            "NLL rises from |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['label']} | {_num(r['ppl_before'])} | {_num(r['ppl_after'])} | {_num(r['increase_before'])} | "
             f"{_num(r['increase_after'])} | {r['n_paired_before']}/{r['n_paired_after']} | "
             f"{'-' if r['rise_from'] is None else r['rise_from']} |" for r in s["policies"].values()]
    return head + "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_summary(summary: Mapping, json_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    write_json(json_path, summary)
    atomic_write_text(md_path, summary_markdown(summary))


# ------------------------------------------------------------------------------------------------
# the paper's table and macros


def _rows(s: Mapping) -> list[Mapping]:
    return list(s["policies"].values())


def _rise_text(r: Mapping) -> str:
    if r["rise_from"] is None:
        return "--" if r["is_reference"] else "none"
    return fmt(r["rise_from"], 0)


def longstream_table(s: Mapping) -> str:
    """paper/generated/tables/longstream.tex: per policy, decode-target PPL before and after the trained context,
    the increase against the reference on the paired targets, where the NLL rises."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{The long stream: decode-target perplexity before and after the trained context "
             rf"({fmt(s['trained_context'], 0)} tokens), {_pooled(s)} of {fmt(s['n_tokens'], 0)} tokens, and the increase against full recomputation on the targets it "
             rf"scored (every {fmt(s['recompute_every'], 0)}th decode target). Last column: the first position from "
             rf"which every block of {fmt(s['smooth_tokens'], 0)} targets, at least two, has a mean NLL more than three "
             r"standard deviations of the policy's block means before the trained context above their mean (none: "
             r"no such rise). With so few samples these are descriptive "
             r"numbers, without intervals.}", rf"\label{{{TABLE_LABEL}}}",
             r"\begin{tabular}{lrrrrr}", r"\toprule",
             r" & \multicolumn{2}{c}{decode PPL} & \multicolumn{2}{c}{increase (\%)} & NLL rises \\",
             r"\cmidrule(lr){2-3}\cmidrule(lr){4-5}",
             r"Policy & before & after & before & after & from \\", r"\midrule"]
    for r in _rows(s):
        inc = [("--" if r["is_reference"] else fmt(r[f"increase_{k}"], 2, signed=True)) for k in ("before", "after")]
        lines.append(rf"{tex_escape(r['label'])} & {fmt(r['ppl_before'], 2)} & {fmt(r['ppl_after'], 2)} & "
                     rf"{inc[0]} & {inc[1]} & {_rise_text(r)} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _pooled(s: Mapping) -> str:
    return f"pooled over {plural(s['n_samples'], 'sample')}" if s["n_samples"] > 1 else "on one sample"


def _first(s: Mapping, kind: str) -> Mapping | None:
    return next((r for r in _rows(s) if r["type"] == kind), None)


def _change(r: Mapping) -> str:
    return rf"{tex_escape(r['label'])} {fmt(r['ppl_before'], 2)} to {fmt(r['ppl_after'], 2)}"


def dense_sentence(s: Mapping) -> str:
    """Where the dense cache's NLL rises past the trained context, from the data."""
    dense = _first(s, "dense")
    if dense is None:
        return ""
    inc = rf"{fmt(dense['increase_before'], 2, signed=True)}\,\% and {fmt(dense['increase_after'], 2, signed=True)}\,\%"
    if dense["rise_from"] is None:
        return (rf"The dense cache's NLL does not rise above its range before the trained context within these samples "
                rf"(decode-target PPL {fmt(dense['ppl_before'], 2)} before it, {fmt(dense['ppl_after'], 2)} after; "
                rf"{inc} against recomputation).")
    return (rf"The dense cache degrades past the trained context: from position {fmt(dense['rise_from'], 0)} on, every "
            rf"block of {fmt(s['smooth_tokens'], 0)} targets has a mean NLL more than three standard deviations above that "
            rf"of its blocks before the trained context, and its "
            rf"decode-target PPL goes from {fmt(dense['ppl_before'], 2)} before the trained context to "
            rf"{fmt(dense['ppl_after'], 2)} after ({inc} against recomputation on the paired targets).")


def caches_sentence(s: Mapping) -> str:
    """The caches that evict: their PPL before and after, and which of them rise by the same criterion."""
    caches = [r for r in _rows(s) if r["type"] not in ("dense", "recompute")]
    if not caches:
        return ""
    rising = [r for r in caches if r["rise_from"] is not None]
    text = "The caches that evict go from " + and_list([_change(r) for r in caches]) + " (decode-target PPL, before to after)"
    if not rising:
        return text + "; none of them rises above its range before the trained context."
    return text + "; by the same criterion " + and_list(
        [rf"{tex_escape(r['label'])} rises from position {fmt(r['rise_from'], 0)}" for r in rising]) + "."


def longstream_macros(s: Mapping, source: str | None = None) -> str:
    """paper/generated/longstream_macros.tex: `\\ifhaveLongstream` on and every number the section quotes."""
    lines = [r"\newif\ifhaveLongstream\haveLongstreamtrue"]

    def add(name: str, value: str) -> None:
        lines.append(rf"\newcommand{{\{name}}}{{{value}}}")

    ref = s["policies"][s["reference"]]
    add("LongstreamTableRef", rf"Table~\ref{{{TABLE_LABEL}}}")
    add("LongstreamFigureRef", rf"Figure~\ref{{{FIGURE_LABEL}}}")
    add("LongstreamSamples", plural(s["n_samples"], "sample"))
    add("LongstreamPooled", ", pooled over the samples" if s["n_samples"] > 1 else "")
    add("LongstreamTokens", fmt(s["n_tokens"], 0))
    add("LongstreamTrained", fmt(s["trained_context"], 0))
    add("LongstreamPast", fmt(s["n_tokens"] - 1 - s["trained_context"], 0))
    add("LongstreamSource", dataset_name(source, s.get("dataset")))
    add("LongstreamSmooth", fmt(s["smooth_tokens"], 0))
    add("LongstreamEvery", fmt(s["recompute_every"], 0))
    add("LongstreamReferenceWindow", fmt(ref["window"], 0))
    add("LongstreamPairedAfter", fmt(ref["n_after"], 0))
    add("LongstreamPolicies", and_list([tex_escape(r["label"]) for r in _rows(s)]))
    add("LongstreamDenseSentence", dense_sentence(s))
    add("LongstreamCachesSentence", caches_sentence(s))
    return "\n".join(lines) + "\n"


def absent_macros() -> str:
    """The macros file of a run without a long stream: the section's switch off."""
    return "% no experiment with role longstream in this run's config\n\\newif\\ifhaveLongstream\\haveLongstreamfalse\n"

"""The defect attribution (config role `defects`; docs/method.md, "Defect switches"): each preset of the original
run clean, with each defect switch alone and with all of them, beside the original's published number, so the
table says which defect moves which number. Torch-free: it reads the experiment's aggregate only.

A group is one clean policy and its variants (the same fields plus switches, matched through the policy blocks
the config resolves; kvstream.config checks every variant has its clean twin). Each row carries the decode- and
all-target PPL increase against the reference with its interval, and its shift from the clean row in
percentage points (a difference of two point estimates, not a paired interval).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from kvstream.defects import DEFECTS, NAMES
from kvstream.errors import KVStreamError
from kvstream.io import atomic_write_text
from kvstream.study.latex import finite, fmt, fmt_ci, tex_escape
from kvstream.study.published import ablation_rows, facts, main_rows
from kvstream.study.wording import and_list, interval_words, plural

TABLE_LABEL = "tab:defects"
METRICS = (("decode_ppl_increase_percent", "decode-target"), ("ppl_increase_percent", "all-target"))
_DERIVED = ("budget", "max_forward_len", "defects")


def _clean_key(block: Mapping) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in block.items() if k not in _DERIVED))


def _published(clean: str, block: Mapping, stems: Mapping[str, str]) -> float | None:
    """The original's all-target PPL increase for the preset a clean policy stands for: a main row by its paper
    stem, else an ablation row by (sigma, delta) at the original's ablation R."""
    stem = stems.get(clean)
    for row in main_rows():
        if stem and row.get("stem") == stem:
            return float(row["ppl_increase_percent"])
    if str(block.get("compress_every")) == facts().get("OrigAblR"):
        for row in ablation_rows():
            if row["cache_slack"] == block.get("cache_slack") and row["max_drop"] == block.get("max_drop"):
                return float(row["ppl_increase_percent"])
    return None


def groups(agg: Mapping, blocks: Mapping[str, Mapping], labels: Mapping[str, str] | None = None,
           stems: Mapping[str, str] | None = None) -> list[dict]:
    """One group per clean policy (experiment order) with a defect variant: its label, the published number and
    its rows (clean first, then single switches in registry order, then combinations)."""
    labels, stems = dict(labels or {}), dict(stems or {})
    rows = agg["policies"]
    missing = [p for p in blocks if p not in rows]
    if missing:
        raise KVStreamError(f"defect attribution: the aggregate of {agg.get('experiment')} has no row for "
                            f"{', '.join(missing)}: rerun its aggregate")
    clean = {_clean_key(b): p for p, b in blocks.items() if not b.get("defects") and rows[p].get("type") == "sink"}
    out: dict[str, dict] = {}
    for pol, block in blocks.items():
        switches = tuple(block.get("defects") or ())
        if not switches:
            continue
        twin = clean.get(_clean_key(block))
        if twin is None:
            raise KVStreamError(f"defect attribution: policy {pol} has no clean twin in the experiment")
        group = out.setdefault(twin, {"clean": twin, "label": labels.get(twin, twin),
                                      "published": _published(twin, blocks[twin], stems),
                                      "rows": [_row(rows[twin], (), None)]})
        group["rows"].append(_row(rows[pol], switches, group["rows"][0]))
    order = {p: i for i, p in enumerate(blocks)}
    for group in out.values():
        group["rows"].sort(key=lambda r: (len(r["switches"]) > 1, [NAMES.index(s) for s in r["switches"]]))
        singles = {s for r in group["rows"] if len(r["switches"]) == 1 for s in r["switches"]}
        for r in group["rows"]:
            r["all"] = len(r["switches"]) > 1 and set(r["switches"]) >= singles
    return sorted(out.values(), key=lambda g: order[g["clean"]])


def _row(r: Mapping, switches: tuple, clean: Mapping | None) -> dict:
    row = {"policy": r["policy"], "switches": switches, "n_samples": r.get("n_samples")}
    for name, _ in METRICS:
        for suffix in ("", "_lo", "_hi"):
            row[name + suffix] = r.get(name + suffix)
        base = None if clean is None else clean[name]
        row[name + "_shift"] = row[name] - base if finite(base) and finite(row[name]) else None
    return row


def row_label(row: Mapping) -> str:
    if not row["switches"]:
        return "clean"
    if row.get("all"):
        return "all switches"
    return " + ".join(DEFECTS[s].label for s in row["switches"])


# ------------------------------------------------------------------------------------------- table
def table(gs: Sequence[Mapping], n: int, n_boot: int | None) -> str:
    """The paper's table: per preset its clean row, each switch, all switches; the published number in the
    preset's heading row."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\caption{Which defect of the original moves which number: each preset clean, with one defect switch "
             r"at a time and with all of them. PPL increase (\%) against recomputation over decode targets and over "
             r"all targets, with its shift from the clean row (percentage points); " + interval_words(n, n_boot)
             + r". The original's published number (all targets) is in each preset's heading.}",
             rf"\label{{{TABLE_LABEL}}}", r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Setting & Decode PPL inc.\ (\%) & shift & All-target PPL inc.\ (\%) & shift \\", r"\midrule"]
    for i, g in enumerate(gs):
        if i:
            lines.append(r"\midrule")
        pub = (rf" (published: {fmt(g['published'], 2, True)}\,\%)" if finite(g["published"]) else "")
        lines.append(rf"\multicolumn{{5}}{{l}}{{\textit{{{tex_escape(g['label'])}}}{pub}}} \\")
        for r in g["rows"]:
            cells = [r"\quad " + tex_escape(row_label(r))]
            for name, _ in METRICS:
                cells += [fmt_ci(r, name, 2, True), fmt(r[name + "_shift"], 2, True) if r["switches"] else "--"]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def summary_md(gs: Sequence[Mapping]) -> str:
    """The run's Markdown summary (results/aggregate/{model}/defect_attribution.md)."""
    out = ["| preset | setting | decode PPL inc. % [95% CI] | shift | all-target PPL inc. % [95% CI] | shift | published % |",
           "|---|---|---|---|---|---|---|"]
    for g in gs:
        for r in g["rows"]:
            cells = [g["label"], row_label(r)]
            for name, _ in METRICS:
                cells += [f"{_num(r[name])} [{_num(r[name + '_lo'])}, {_num(r[name + '_hi'])}]", _num(r[name + "_shift"])]
            cells.append(_num(g["published"]) if not r["switches"] else "")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _num(x) -> str:
    return f"{x:+.2f}" if finite(x) else "--"


# ------------------------------------------------------------------------------------------- macros
def macros(gs: Sequence[Mapping], n: int) -> str:
    """\\ifhaveDefects on, the table's reference and input, the sample count, and one sentence per preset: which
    single switch shifts each of its numbers most (direction from the data, no claim of significance)."""
    lines = ["% written from the defect attribution's aggregate (kvstream.study.defects)",
             r"\newif\ifhaveDefects\haveDefectstrue",
             rf"\newcommand{{\DefectsTableRef}}{{Table~\ref{{{TABLE_LABEL}}}}}",
             r"\newcommand{\KvDefectsTable}{\input{generated/tables/defects_attribution.tex}}",
             rf"\newcommand{{\DefectsNSamples}}{{{plural(n, 'sample')}}}",
             rf"\newcommand{{\DefectsSwitches}}{{{and_list([DEFECTS[s].label for s in NAMES])}}}",
             rf"\newcommand{{\DefectsSentence}}{{{' '.join(_sentence(g) for g in gs)}}}"]
    return "\n".join(lines) + "\n"


def _sentence(g: Mapping) -> str:
    singles = [r for r in g["rows"] if len(r["switches"]) == 1]
    parts = []
    for name, words in METRICS:
        moved = [r for r in singles if finite(r[name + "_shift"])]
        if moved:
            top = max(moved, key=lambda r: abs(r[name + "_shift"]))
            parts.append(rf"the {words} increase by {fmt(top[name + '_shift'], 2, True)} points "
                         rf"({tex_escape(row_label(top))})")
    if not parts:
        return ""
    text = rf"For {tex_escape(g['label'])}, the switch that moves it most shifts " + " and ".join(parts)
    every = next((r for r in g["rows"] if r.get("all")), None)
    if every is not None and finite(every["ppl_increase_percent"]):
        text += rf"; with all switches its all-target increase is {fmt(every['ppl_increase_percent'], 2, True)}\,\%"
        if finite(g["published"]):
            text += rf" against the published {fmt(g['published'], 2, True)}\,\%"
    return text + "."


def absent_macros() -> str:
    """The macros file of a run without a defect attribution: the section's switch off."""
    return "% no experiment with role defects in this run's config\n\\newif\\ifhaveDefects\\haveDefectsfalse\n"


def write(path, text: str) -> None:
    atomic_write_text(path, text)

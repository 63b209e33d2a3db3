"""Results of `kvstream bench` as tables: the printed Markdown table, the paper's LaTeX table and macros.

Torch-free (the report environment reads committed GPU results too). Results written before the mean
rule (benchmarks/h100/*.json) have medians only: `tpot_ms` reads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def tpot_ms(row: dict) -> float:
    """A row's primary figure: the mean; the median in results written before the mean rule."""
    return row["tpot_ms_mean"] if "tpot_ms_mean" in row else row["tpot_ms_median"]


def statistic(result: dict) -> str:
    """"mean", or "median" for a result written before the mean rule."""
    return "mean" if all("tpot_ms_mean" in r for r in result["rows"]) else "median"


def format_table(result: dict) -> str:
    head = (f"{result['shape']}  C={result['budget']}  {result['device_name']} ({result['device']}, {result['dtype']}, "
            f"{result['threads']} threads, attn={result['attn']})  >= {result['steps']} steps "
            f"(recompute: {result.get('recompute_steps') or result['steps']})")
    stat = statistic(result)
    head += (f" in whole eviction periods x repeats={result['repeats']}, after {result['warmup']} warm-up"
             if stat == "mean" else f" x repeats={result['repeats']} (run before the mean rule: medians)")
    lines = [head, "", f"| row | TPOT {stat} ms | median ms | p10-p90 ms | ratio to dense floor ({stat}s, same mode) | "
                       "mean forward len | timed steps | events |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {tpot_ms(r):.3f} | {r['tpot_ms_median']:.3f} | {r['tpot_ms_p10']:.3f}-"
                     f"{r['tpot_ms_p90']:.3f} | {r['ratio_to_floor']:.3f} | {r['mean_forward_len']:.1f} | "
                     f"{r['timed_steps']} | {r.get('events', '')} |")
    if result["bandwidth_floor_ms"] is not None:
        lines += ["", f"memory bandwidth {result['bandwidth_gb_s']:.0f} GB/s (measured copy), "
                      f"{result['bytes_per_token'] / 1e9:.3f} GB moved per token -> bandwidth floor "
                      f"{result['bandwidth_floor_ms']:.3f} ms"]
        for r in result["rows"]:
            if r["row"].startswith("sink R=1"):
                lines.append(f"{r['row']}: {tpot_ms(r) / result['bandwidth_floor_ms']:.2f}x the bandwidth floor")
    return "\n".join(lines)


def latex_table(results: list[dict], caption: str, label: str = "tab:bench") -> str:
    """A booktabs table of one or more bench results (one block per shape/budget/device), defined as the macro
    \\KvBenchTable: the file that holds it also holds the macros the paper's text quotes, so it is read before
    that text, and the table is placed after the paragraph that cites it."""

    def esc(text: str) -> str:
        return str(text).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [r"\newcommand{\KvBenchTable}{%", r"\begin{table}", r"\centering", r"\small", rf"\caption{{{caption}}}",
             rf"\label{{{label}}}",
             r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Row & mean ms & p10--p90 ms & $\times$ floor & mean length \\"]
    for result in results:
        stat = "" if statistic(result) == "mean" else ", median of steps (run before the mean rule)"
        lines += [r"\midrule",
                  rf"\multicolumn{{5}}{{l}}{{\emph{{{esc(result['shape'])}, $C={result['budget']}$, "
                  rf"{esc(result['device_name'])}, {esc(result['dtype'])}{stat}}}}} \\"]
        for r in result["rows"]:
            name = re.sub(r"R=(\d+)", r"$R=\1$", esc(r["row"])).replace("dense@C", "dense@$C$")
            lines.append(f"{name} & {tpot_ms(r):.2f} & {r['tpot_ms_p10']:.2f}--{r['tpot_ms_p90']:.2f} & "
                         f"{r['ratio_to_floor']:.3f} & {r['mean_forward_len']:.1f} \\\\")
        if result.get("bandwidth_floor_ms"):
            lines.append(rf"\multicolumn{{5}}{{l}}{{\footnotesize memory-bandwidth floor "
                         rf"{result['bandwidth_floor_ms']:.2f} ms ({result['bytes_per_token'] / 1e9:.2f} GB per token at "
                         rf"{result['bandwidth_gb_s']:.0f} GB/s measured)}} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}}"]
    return "\n".join(lines) + "\n"


def latex_macros(results: list[dict]) -> str:
    """\\newcommand macros for the prose: ratios of the first CPU and the first CUDA result."""
    lines = []
    seen = set()
    for result in results:
        tag = "Gpu" if result["device"] == "cuda" else "Cpu"
        if tag in seen:
            continue
        seen.add(tag)
        rows = {r["row"]: r for r in result["rows"]}
        names = {"sink R=1": "SinkROne", "sink R=64": "SinkRSixtyFour", "naive R=1": "NaiveROne",
                 "recompute": "Recompute", "sink R=1 graph": "SinkROneGraph", "sink R=64 graph": "SinkRSixtyFourGraph"}
        for row, name in names.items():
            if row in rows:
                lines.append(rf"\newcommand{{\Bench{tag}{name}}}{{{rows[row]['ratio_to_floor']:.2f}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Device}}{{{result['device_name']}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Shape}}{{{result['shape']}}}")
        lines.append(rf"\newcommand{{\Bench{tag}Budget}}{{{result['budget']}}}")
        if result.get("bandwidth_floor_ms") and "sink R=1 graph" in rows:
            ratio = tpot_ms(rows["sink R=1 graph"]) / result["bandwidth_floor_ms"]
            lines.append(rf"\newcommand{{\Bench{tag}BandwidthX}}{{{ratio:.2f}}}")
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> list[dict]:
    """Bench results from a `kvstream bench --out` file (a list) or a gpu_check.py report (key 'bench')."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = [data["bench"]] if "bench" in data else [data]
    return data

"""Snakemake `script:` entry point of rule bench_table: the paper's table and macros of the decode-step
benchmark, from this machine's `kvstream bench` run and the GPU runs committed under benchmarks/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study.bench_table import latex_macros, latex_table, load_results
    from kvstream.io import atomic_path

    sm = snakemake  # noqa: F821
    results = [r for path in paths(sm.input.results) for r in load_results(path)]
    caption = (
        "Time per decode step (forward plus cache maintenance; each block says its statistic: the mean over "
        "whole eviction periods of the row, every step timed, or for runs made before that rule the median; "
        r"p10--p90 over all timed steps; ratio to a dense cache held at exactly $C$ tokens, timed in the same "
        "run). Rows marked graph run "
        "fixed shapes replayed from a CUDA graph. Made by \\texttt{kvstream bench} in this run and, "
        "for the GPU, \\texttt{benchmarks/gpu\\_check.py}; random weights, model shapes as named."
    )
    with atomic_path(sm.output[0]) as tmp:
        tmp.write_text(latex_macros(results) + latex_table(results, caption))
    print(f"wrote {sm.output[0]} from {len(results)} benchmark result(s)")

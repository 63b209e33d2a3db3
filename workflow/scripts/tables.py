"""Snakemake `script:` entry point of the table rules (kvstream.report): one experiment's table, the
reproduction table (ours beside the original's published numbers), or the setup table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream import report

    sm = snakemake  # noqa: F821
    aggs = report.load_aggregates(paths(sm.input.aggregate))
    kind = sm.params.kind
    if kind == "experiment":
        text = report.experiment_table(aggs[sm.wildcards.experiment], sm.wildcards.experiment)
    elif kind == "reproduction":
        text = report.reproduction_table(aggs)
    elif kind == "setup":
        text = report.setup_table(aggs, dict(sm.params.config))
    else:
        raise ValueError(f"unknown table kind {kind}")
    report._atomic_write(sm.output[0], text)
    print(f"wrote {sm.output[0]}")

"""Snakemake `script:` entry point of rule macros: paper/generated/macros.tex (kvstream.report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream import report

    sm = snakemake  # noqa: F821
    aggs = report.load_aggregates(paths(sm.input.aggregate))
    report._atomic_write(sm.output[0], report.macros_tex(aggs, dict(sm.params.config)))
    print(f"wrote {sm.output[0]}")

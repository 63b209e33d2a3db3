"""Snakemake `script:` entry point of rule macros: paper/generated/macros.tex (kvstream.study.macros)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study.aggregate import load_aggregates
    from kvstream.study.latex import write_text
    from kvstream.study.macros import macros_tex

    sm = snakemake  # noqa: F821
    aggs = load_aggregates(paths(sm.input.aggregate))
    write_text(sm.output[0], macros_tex(aggs, dict(sm.params.config)))
    print(f"wrote {sm.output[0]}")

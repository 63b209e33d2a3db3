"""Snakemake `script:` entry point of the table rules (kvstream.study.tables): one experiment's table, the
reproduction table (ours beside the original's published numbers), or the setup table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import tables
    from kvstream.study.aggregate import load_aggregates
    from kvstream.study.latex import write_text

    sm = snakemake  # noqa: F821
    aggs = load_aggregates(paths(sm.input.aggregate))
    config = dict(sm.params.config)
    kind = sm.params.kind
    if kind == "experiment":
        text = tables.experiment_table(aggs[sm.wildcards.experiment], sm.wildcards.experiment)
    elif kind == "reproduction":
        text = tables.reproduction_table(aggs, config)
    elif kind == "presets":
        text = tables.presets_table(aggs, config)
    elif kind == "setup":
        text = tables.setup_table(aggs, config)
    else:
        raise ValueError(f"unknown table kind {kind}")
    write_text(sm.output[0], text)
    print(f"wrote {sm.output[0]}")

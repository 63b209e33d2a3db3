"""Snakemake `script:` entry point of rules reuse_<dataset>_b<k> (kvstream.cells.reuse_cells)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821  (snakemake is injected)
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.cells import reuse_cells

    sm = snakemake  # noqa: F821
    reuse_cells(paths(sm.input.cells), paths(sm.output.cells), dict(sm.params.policy), sm.wildcards.policy,
                sm.params.source)
    print(f"{sm.wildcards.policy}: {len(paths(sm.output.cells))} cell(s) reused from {sm.params.source}")

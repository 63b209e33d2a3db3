"""Snakemake `script:` entry point of the defect attribution rules (kvstream.study.defects): the run's Markdown
summary, or the paper's table and macros, or the macros of a run without the experiment (the switch off)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import defects

    sm = snakemake  # noqa: F821
    if sm.params.kind == "absent":
        defects.write(sm.output.macros, defects.absent_macros())
    else:
        agg = json.loads(Path(sm.input.aggregate).read_text())
        groups = defects.groups(agg, dict(sm.params.blocks), dict(sm.params.labels), dict(sm.params.stems))
        if sm.params.kind == "summary":
            defects.write(sm.output.md, defects.summary_md(groups))
        else:
            defects.write(sm.output.table, defects.table(groups, int(agg["n_samples"]), agg.get("n_boot")))
            defects.write(sm.output.macros, defects.macros(groups, int(agg["n_samples"])))
    print(f"wrote {', '.join(map(str, sm.output))}")

"""Snakemake `script:` entry point of the long-stream rules (kvstream.study.longstream): the summary (JSON +
Markdown) from the experiment's cells, the figure, the paper's table and macros, or the macros of a run without
a long stream (the section's switch off)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import longstream
    from kvstream.study.latex import write_text

    sm = snakemake  # noqa: F821
    kind = sm.params.kind
    if kind == "absent":
        write_text(sm.output.macros, longstream.absent_macros())
    elif kind == "summary":
        summary = longstream.summarize_cells(
            paths(sm.input.cells), experiment=sm.params.experiment, policies=list(sm.params.policies),
            reference=sm.params.reference, trained=longstream.trained_context(Path(sm.input.model) / "config.json"),
            labels=dict(sm.params.labels), policy_blocks=dict(sm.params.policy_blocks),
            run_facts=dict(sm.params.run_facts), allow_mixed_code=bool(sm.params.allow_mixed_code))
        longstream.write_summary(summary, sm.output.json, sm.output.md)
    else:
        summary = longstream.load_summary(sm.input.summary)
        if kind == "figure":
            from kvstream.study.longstream_figure import longstream_figure

            longstream_figure(summary, Path(sm.output.pdf).parent, name=Path(sm.output.pdf).stem)
        elif kind == "paper":
            write_text(sm.output.table, longstream.longstream_table(summary))
            write_text(sm.output.macros, longstream.longstream_macros(summary, source=sm.params.source))
        else:
            raise ValueError(f"unknown long-stream report kind {kind}")
    print(f"wrote {', '.join(map(str, sm.output))}")

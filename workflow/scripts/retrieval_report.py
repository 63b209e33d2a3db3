"""Snakemake `script:` entry point of the retrieval report rules (kvstream.study.retrieval): the run's summary
(CSV + Markdown), the heatmap (PDF + PNG), the paper's table and macros, or the macros of a run without
retrieval (the section's switch off)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import retrieval
    from kvstream.study.latex import write_text

    sm = snakemake  # noqa: F821
    kind = sm.params.kind
    if kind == "absent":
        write_text(sm.output.macros, retrieval.absent_macros())
    else:
        results = retrieval.load_results(paths(sm.input.results), dict(sm.params.policy_blocks))
        rows = retrieval.cell_rows(results, dict(sm.params.labels))
        if kind == "summary":
            retrieval.write_summary(rows, sm.output.csv, sm.output.md)
        elif kind == "figure":
            from kvstream.study.retrieval_figures import retrieval_heatmap

            retrieval_heatmap(rows, Path(sm.output.pdf).parent, name=Path(sm.output.pdf).stem)
        elif kind == "paper":
            write_text(sm.output.table, retrieval.retrieval_table(rows))
            write_text(sm.output.macros, retrieval.retrieval_macros(rows, dict(sm.params.facts)))
        else:
            raise ValueError(f"unknown retrieval report kind {kind}")
    print(f"wrote {', '.join(map(str, sm.output))}")

"""Snakemake `script:` entry point of the factorial rules (kvstream.study.factorial): the attended-length figure
(PDF + PNG), or the paper's grid table and macros (the table a comment when the run has no factorial)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import factorial
    from kvstream.study.aggregate import load_aggregates
    from kvstream.study.latex import write_text
    from kvstream.study.roles import main_aggregate

    sm = snakemake  # noqa: F821
    aggs = load_aggregates(paths(sm.input.aggregate))
    if sm.params.kind == "figure":
        from kvstream.study.factorial_figures import attended_length

        main = main_aggregate(aggs)
        attended_length(factorial.attended_rows(aggs), int(main["n_samples"]) if main else 0,
                        Path(sm.output.pdf).parent, name=Path(sm.output.pdf).stem)
    elif sm.params.kind == "paper":
        found = factorial.factorial_aggregate(aggs)
        write_text(sm.output.table, factorial.factorial_table(found[1], found[0]) if found else
                   "% this run's config has no experiment with role factorial\n")
        write_text(sm.output.macros, factorial.factorial_macros(aggs))
    else:
        raise ValueError(f"unknown factorial report kind {sm.params.kind}")
    print(f"wrote {', '.join(map(str, sm.output))}")

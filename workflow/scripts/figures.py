"""Snakemake `script:` entry point of the figure rules (kvstream.study.figures): PDF + PNG in
results/figures/{model} (rule paper_figure copies the PDF for the paper). Point and legend labels come from the
config's `paper:` block (params.paper)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study import figures
    from kvstream.study.aggregate import load_aggregates
    from kvstream.study.zoo_figures import zoo_figure

    sm = snakemake  # noqa: F821
    out_pdf = Path(sm.output.pdf)
    name = out_pdf.stem
    kind = sm.params.kind
    paper = dict(sm.params.paper)  # a param: a label change reruns the figures
    if kind == "tradeoff":
        figures.tradeoff(load_aggregates(paths(sm.input.aggregate)), out_pdf.parent, name=name, paper=paper)
    elif kind == "sweep":
        aggs = load_aggregates(paths(sm.input.aggregate))
        figures.sweep(aggs[sm.wildcards.sweep], sm.wildcards.sweep, out_pdf.parent, name=name)
    elif kind == "cache_trace":
        figures.cache_trace(paths(sm.input.cells), out_pdf.parent, name=name)
    elif kind == "zoo":  # the first zoo experiment's aggregate; the figure by its name (zoo_ppl, zoo_speed)
        zoo_figure(next(iter(load_aggregates(paths(sm.input.aggregate)).values())), name, out_pdf.parent)
    elif kind == "nll_along":
        figures.nll_along(paths(sm.input.cells), out_pdf.parent, name=name, policies=list(sm.params.policies),
                          paper=paper)
    else:
        raise ValueError(f"unknown figure kind {kind}")
    print(f"wrote {out_pdf}, {sm.output.png}")

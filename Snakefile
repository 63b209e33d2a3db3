# kvstream: KV-cache eviction for long-context decoding, data to paper.
#   snakemake --cores 2                         the default run (config.yaml)
#   snakemake --cores 1 --resources gpu=1       same, at most one GPU job at a time
#   snakemake --configfile config/paper.yaml --cores 1 --resources gpu=1     the paper's scale
#   snakemake --configfile config/tiny.yaml --cores 2 results    a config's results only, not paper/
# A --configfile replaces config.yaml (it is not merged into it). Results are keyed by the model
# (results/*/{model}/); paper/ holds one model's run at a time (kvstream.paper_owner). See README.md.

from pathlib import Path

if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/speed.smk"

HAVE_REPORT = (Path(workflow.basedir) / "workflow/rules/report.smk").exists()
HAVE_PAPER = (Path(workflow.basedir) / "workflow/rules/paper.smk").exists()
HAVE_BENCH = (Path(workflow.basedir) / "workflow/rules/bench.smk").exists()

if HAVE_REPORT:

    include: "workflow/rules/report.smk"


if HAVE_BENCH:

    include: "workflow/rules/bench.smk"


if HAVE_REPORT:  # retrieval's report and paper files extend report.smk's lists

    include: "workflow/rules/retrieval.smk"
    include: "workflow/rules/defects.smk"
    include: "workflow/rules/longstream.smk"
    include: "workflow/rules/factorial.smk"
    include: "workflow/rules/kvpress.smk"


if HAVE_PAPER:

    include: "workflow/rules/paper.smk"


PAPER_PDFS = ["paper/neurips_2025_compressed.pdf", "paper/neurips_2025.pdf"] if HAVE_PAPER else []


# Every cell, what the rule files add to ALL_TARGETS (each experiment's aggregates, tables, figures,
# speed runs, the benchmark), the PDFs. The owner check sits here too: Snakemake treats an existing file whose
# producing job fails to build as a source file, so when another model's paper/ is complete the check on
# the stamp's rule alone would never be reached and jobs without that stamp could still write there.
rule all:
    default_target: True
    input:
        ALL_TARGETS,
        PAPER_PDFS,
        paper_owner_checked,


# This config's own outputs, all under results/ and keyed by its model: cells, speed runs, aggregates, figures,
# the benchmark; never paper/ (so it never meets another model's paper).
rule results:
    input:
        [t for t in ALL_TARGETS if t.startswith("results/")],

# kvstream: KV-cache eviction for long-context decoding, data to paper.
#   snakemake --cores 2                         the default run (config.yaml)
#   snakemake --cores 1 --resources gpu=1       same, at most one GPU job at a time
#   snakemake --configfile config/paper.yaml --cores 1 --resources gpu=1     the paper's scale
# A --configfile replaces config.yaml (it is not merged into it). See README.md.

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


if HAVE_PAPER:

    include: "workflow/rules/paper.smk"


PAPER_PDFS = ["paper/neurips_2025_compressed.pdf", "paper/neurips_2025.pdf"] if HAVE_PAPER else []


# Every cell, what the rule files add to ALL_TARGETS (each experiment's aggregates, tables, figures,
# speed runs, the benchmark), the PDFs.
rule all:
    default_target: True
    input:
        ALL_TARGETS,
        PAPER_PDFS,

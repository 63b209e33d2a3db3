# Defect attribution (an experiment with role defects; docs/method.md, "Defect switches"; kvstream.study.defects):
#   results/aggregate/{model}/defects_attribution.md    the table as Markdown: each preset clean, each switch, all
#   paper/generated/tables/defects_attribution.tex      the paper's table, beside the original's published numbers
#   paper/generated/defects_macros.tex                  \ifhaveDefects and the sentences the section quotes
# The cells are ordinary eval cells (eval.smk) and the aggregate the experiment's (report.smk); without such an
# experiment the macros file still gets written, with the switch off, so that no earlier run's section shows.

DEFECTS_MACROS = "paper/generated/defects_macros.tex"
DEFECT_EXPERIMENT = PLAN.defect_experiment

if DEFECT_EXPERIMENT:
    DEFECTS_TABLE = "paper/generated/tables/defects_attribution.tex"
    DEFECTS_SUMMARY = f"results/aggregate/{MODEL}/defects_attribution.md"
    DEFECTS_PARAMS = dict(
        blocks=PLAN.policy_blocks(DEFECT_EXPERIMENT),
        labels=dict(config["paper"]["labels"]),
        stems=dict(config["paper"]["stems"]),
    )

    localrules:
        defects_summary,
        defects_paper,

    rule defects_summary:
        input:
            aggregate=PLAN.aggregate_path(DEFECT_EXPERIMENT, "json"),
        output:
            md=DEFECTS_SUMMARY,
        params:
            kind="summary",
            **DEFECTS_PARAMS,
        log:
            "results/logs/defects/summary.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/defects_report.py"

    rule defects_paper:
        input:
            aggregate=PLAN.aggregate_path(DEFECT_EXPERIMENT, "json"),
            owner=PAPER_OWNER,
        output:
            table=DEFECTS_TABLE,
            macros=DEFECTS_MACROS,
        params:
            kind="paper",
            **DEFECTS_PARAMS,
        log:
            "results/logs/defects/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/defects_report.py"

    ALL_TARGETS.extend([DEFECTS_SUMMARY, DEFECTS_TABLE, DEFECTS_MACROS])
    PAPER_TABLES.extend([DEFECTS_TABLE, DEFECTS_MACROS])

else:

    localrules:
        defects_absent,

    rule defects_absent:
        input:
            owner=PAPER_OWNER,
        output:
            macros=DEFECTS_MACROS,
        params:
            kind="absent",
        log:
            "results/logs/defects/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/defects_report.py"

    ALL_TARGETS.append(DEFECTS_MACROS)
    PAPER_TABLES.append(DEFECTS_MACROS)

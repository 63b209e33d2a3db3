# The (r, R) factorial and the context every policy keeps (kvstream.study.factorial; docs/method.md, "The band"):
#   results/figures/{model}/attended_length.pdf|png   decode PPL increase against the mean attended length, every
#                                                     policy of the experiments on the main dataset
#   paper/generated/figures/attended_length.pdf       the figure, copied for the paper
#   paper/generated/tables/factorial_grid.tex         the sigma x delta grid of the first experiment with role
#                                                     factorial (a comment when there is none)
#   paper/generated/factorial_macros.tex              \ifhaveAttended, \ifhaveFactorialGrid and their sentences
# The factorial's cells and aggregate come from the generic rules (eval, reuse, aggregate); cells whose schedule
# is identical (the same r) are evaluated once (PLAN.reused_from).

FACTORIAL_AGGREGATES = PLAN.main_dataset_aggregates()
FACTORIAL_TABLE = "paper/generated/tables/factorial_grid.tex"
FACTORIAL_MACROS = "paper/generated/factorial_macros.tex"
ATTENDED_PAPER_FIGURE = "paper/generated/figures/attended_length.pdf"


localrules:
    factorial_paper,
    paper_figure_attended,


rule figure_attended_length:
    input:
        aggregate=FACTORIAL_AGGREGATES,
    output:
        pdf="results/figures/{model}/attended_length.pdf",
        png=report(
            "results/figures/{model}/attended_length.png",
            caption="../report/attended_length.rst",
            category="Figures",
            labels={"figure": "PPL increase vs. mean attended length"},
        ),
    params:
        kind="figure",
    log:
        "results/logs/figures/{model}/attended_length.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/factorial_report.py"


rule factorial_paper:
    input:
        aggregate=FACTORIAL_AGGREGATES,
        owner=PAPER_OWNER,
    output:
        table=FACTORIAL_TABLE,
        macros=FACTORIAL_MACROS,
    params:
        kind="paper",
    log:
        "results/logs/factorial/paper.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/factorial_report.py"


rule paper_figure_attended:
    input:
        figure=PLAN.figure_path("attended_length"),
        owner=PAPER_OWNER,
    output:
        ATTENDED_PAPER_FIGURE,
    log:
        "results/logs/figures/paper_attended_length.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    shell:
        logged("cp {input.figure} {output}")


ALL_TARGETS.extend(PLAN.figure_path("attended_length", ext) for ext in ("pdf", "png"))
ALL_TARGETS.extend([FACTORIAL_TABLE, FACTORIAL_MACROS, ATTENDED_PAPER_FIGURE])
PAPER_TABLES.extend([FACTORIAL_TABLE, FACTORIAL_MACROS])
PAPER_FIGURES.append(ATTENDED_PAPER_FIGURE)

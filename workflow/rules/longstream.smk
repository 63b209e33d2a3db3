# The long stream past the model's trained context (an experiment with role longstream; docs/method.md,
# "Long stream"): its cells are ordinary eval cells (eval.smk; the recompute reference scores every k-th
# decode target, datasets.<name>.recompute_every), read here by kvstream.study.longstream:
#   results/longstream/{model}/summary.json|md     per policy: decode PPL before and after the trained context,
#                                                  the paired increase against recompute, where NLL rises; the curves
#   results/figures/{model}/longstream.pdf|png     per-token NLL against position (moving average), one line a policy
#   paper/generated/tables/longstream.tex          the paper's table
#   paper/generated/longstream_macros.tex          \ifhaveLongstream and every number the section quotes
#   paper/generated/figures/longstream.pdf         the figure, copied for the paper
# The trained context is the model's own (max_position_embeddings of its config.json). The experiment has no
# speed run (PLAN.speed_datasets) and is not pooled by report.smk (PLAN.pooled_experiments). Without one the
# macros file still gets written, with the switch off, so that no earlier run's section shows.

LONGSTREAM = PLAN.longstream_experiment
LONGSTREAM_MACROS = "paper/generated/longstream_macros.tex"

if LONGSTREAM:
    LONGSTREAM_SUMMARY = f"results/longstream/{MODEL}/summary.json"
    LONGSTREAM_TABLE = "paper/generated/tables/longstream.tex"
    LONGSTREAM_PAPER_FIGURE = "paper/generated/figures/longstream.pdf"

    localrules:
        longstream_summary,
        figure_longstream,
        longstream_paper,
        paper_figure_longstream,

    rule longstream_summary:
        input:
            cells=PLAN.experiment_cells(LONGSTREAM),
            nll=PLAN.nll_paths(PLAN.experiment_cells(LONGSTREAM)),
            model=PLAN.model_dir(),  # its config.json: the trained context
        output:
            json="results/longstream/{model}/summary.json",
            md="results/longstream/{model}/summary.md",
        params:
            kind="summary",
            experiment=LONGSTREAM,
            policies=PLAN.experiment_policies(LONGSTREAM),
            reference=PLAN.experiment_reference(LONGSTREAM),
            policy_blocks=PLAN.policy_blocks(LONGSTREAM),  # a cell of an edited policy is refused
            run_facts=PLAN.run_facts(LONGSTREAM),
            labels=PLAN.experiment_labels(LONGSTREAM),
            allow_mixed_code=config["eval"]["allow_mixed_code"],
        log:
            "results/logs/longstream/{model}/summary.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/longstream_report.py"

    rule figure_longstream:
        input:
            summary=LONGSTREAM_SUMMARY,
        output:
            pdf="results/figures/{model}/longstream.pdf",
            png=report(
                "results/figures/{model}/longstream.png",
                caption="../report/longstream.rst",
                category="Figures",
                labels={"figure": "longstream"},
            ),
        params:
            kind="figure",
        log:
            "results/logs/figures/{model}/longstream.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/longstream_report.py"

    rule longstream_paper:
        input:
            summary=LONGSTREAM_SUMMARY,
            owner=PAPER_OWNER,
        output:
            table=LONGSTREAM_TABLE,
            macros=LONGSTREAM_MACROS,
        params:
            kind="paper",
            source=config["datasets"][PLAN.experiment_dataset(LONGSTREAM)]["source"],
        log:
            "results/logs/longstream/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/longstream_report.py"

    rule paper_figure_longstream:
        input:
            figure=PLAN.figure_path("longstream"),
            owner=PAPER_OWNER,
        output:
            LONGSTREAM_PAPER_FIGURE,
        log:
            "results/logs/figures/paper_longstream.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        shell:
            logged("cp {input.figure} {output}")

    ALL_TARGETS.extend([LONGSTREAM_SUMMARY, f"results/longstream/{MODEL}/summary.md"])
    ALL_TARGETS.extend(PLAN.figure_path("longstream", ext) for ext in ("pdf", "png"))
    ALL_TARGETS.extend([LONGSTREAM_TABLE, LONGSTREAM_MACROS, LONGSTREAM_PAPER_FIGURE])
    PAPER_TABLES.extend([LONGSTREAM_TABLE, LONGSTREAM_MACROS])
    PAPER_FIGURES.append(LONGSTREAM_PAPER_FIGURE)

else:

    localrules:
        longstream_absent,

    rule longstream_absent:
        input:
            owner=PAPER_OWNER,
        output:
            macros=LONGSTREAM_MACROS,
        params:
            kind="absent",
        log:
            "results/logs/longstream/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/longstream_report.py"

    ALL_TARGETS.append(LONGSTREAM_MACROS)
    PAPER_TABLES.append(LONGSTREAM_MACROS)

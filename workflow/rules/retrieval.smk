# Retrieval through each policy (config `retrieval`; docs/method.md, "Retrieval"):
#   results/retrieval/{model}/{task}/{policy}.json     one `kvstream retrieval` job per (task, policy): every
#                                                      (length, depth, seed) prompt, those of one length batched
#   results/retrieval/{model}/summary.csv|md           one row per (task, policy, length, depth); the accuracy table
#   results/figures/{model}/retrieval.pdf|png          the heatmap: accuracy over depth x length, a panel per policy
#   paper/generated/tables/retrieval.tex               the paper's table
#   paper/generated/retrieval_macros.tex               \ifhaveRetrieval and every number the section quotes
#   paper/generated/figures/retrieval.pdf              the heatmap, copied for the paper
# A job's params are its policy's JSON (PLAN.policy_json), the grid and the code version of `kvstream
# retrieval` (PLAN.retrieval_code_version): editing a policy reruns its jobs, the grid or that code all of
# them; each result records the version it ran with and the report refuses a mix. Without `retrieval.enabled`
# the macros file still gets written, with the switch off, so that no earlier run's section shows.

RETRIEVAL_MACROS = "paper/generated/retrieval_macros.tex"

if PLAN.retrieval_enabled:
    RETRIEVAL_TABLE = "paper/generated/tables/retrieval.tex"
    RETRIEVAL_PAPER_FIGURE = "paper/generated/figures/retrieval.pdf"
    RETRIEVAL_REPORT_PARAMS = dict(
        policy_blocks=PLAN.retrieval_policy_blocks(),  # a result of an edited policy is refused
        labels=PLAN.retrieval_labels(),  # a label change reruns the figure and the table
    )

    localrules:
        retrieval_summary,
        figure_retrieval,
        retrieval_paper,
        paper_figure_retrieval,

    rule retrieval:
        input:
            model=PLAN.model_dir(),
            documents=lambda w: PLAN.retrieval_documents(w.task),
        output:
            json="results/retrieval/{model}/{task}/{policy}.json",
        wildcard_constraints:
            task=alternation(PLAN.retrieval_tasks),
            policy=alternation(PLAN.retrieval_policies),
        params:
            policy_json=lambda w: PLAN.policy_json(w.policy),
            documents=lambda w: shell_args(*(("--documents", d) for d in PLAN.retrieval_documents(w.task))),
            grid=PLAN.retrieval_grid_args(),
            settings=shell_args(
                ("--device", config["model"]["device"]), ("--dtype", config["model"]["dtype"]),
                ("--threads", config["eval"]["threads"]),
            ),
            code_version=PLAN.retrieval_code_version,
        log:
            "results/logs/retrieval/{model}/{task}/{policy}.log",
        threads: int(config["eval"]["threads"])
        resources:
            **PLAN.rule_resources("eval", gpu=True),  # the eval jobs' model in memory, the same device
        conda:
            "../../envs/kvstream.yaml"
        shell:
            logged(
                "python -m kvstream retrieval --model {input.model} --policy-json {params.policy_json}"
                " --task {wildcards.task} {params.documents} {params.grid} {params.settings}"
                " --label model={wildcards.model} --label task={wildcards.task} --label policy={wildcards.policy}"
                " --label code_version={params.code_version} --out {output.json}"
            )

    rule retrieval_summary:
        input:
            results=PLAN.retrieval_results(),
        output:
            csv="results/retrieval/{model}/summary.csv",
            md="results/retrieval/{model}/summary.md",
        params:
            kind="summary",
            **RETRIEVAL_REPORT_PARAMS,
        log:
            "results/logs/retrieval/{model}/summary.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/retrieval_report.py"

    rule figure_retrieval:
        input:
            results=PLAN.retrieval_results(),
        output:
            pdf="results/figures/{model}/retrieval.pdf",
            png=report(
                "results/figures/{model}/retrieval.png",
                caption="../report/retrieval.rst",
                category="Figures",
                labels={"figure": "retrieval"},
            ),
        params:
            kind="figure",
            **RETRIEVAL_REPORT_PARAMS,
        log:
            "results/logs/figures/{model}/retrieval.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/retrieval_report.py"

    rule retrieval_paper:
        input:
            results=PLAN.retrieval_results(),
            owner=PAPER_OWNER,
        output:
            table=RETRIEVAL_TABLE,
            macros=RETRIEVAL_MACROS,
        params:
            kind="paper",
            facts={"needle_dataset": config["retrieval"].get("needle_dataset"),
                   "needle_source": config["datasets"].get(config["retrieval"].get("needle_dataset"), {}).get("source")},
            **RETRIEVAL_REPORT_PARAMS,
        log:
            "results/logs/retrieval/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/retrieval_report.py"

    rule paper_figure_retrieval:
        input:
            figure=PLAN.figure_path("retrieval"),
            owner=PAPER_OWNER,
        output:
            RETRIEVAL_PAPER_FIGURE,
        log:
            "results/logs/figures/paper_retrieval.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        shell:
            logged("cp {input.figure} {output}")

    ALL_TARGETS.extend(PLAN.retrieval_results())
    ALL_TARGETS.extend([f"results/retrieval/{MODEL}/summary.{ext}" for ext in ("csv", "md")])
    ALL_TARGETS.extend(PLAN.figure_path("retrieval", ext) for ext in ("pdf", "png"))
    ALL_TARGETS.extend([RETRIEVAL_TABLE, RETRIEVAL_MACROS, RETRIEVAL_PAPER_FIGURE])
    PAPER_TABLES.extend([RETRIEVAL_TABLE, RETRIEVAL_MACROS])
    PAPER_FIGURES.append(RETRIEVAL_PAPER_FIGURE)

else:

    localrules:
        retrieval_absent,

    rule retrieval_absent:
        input:
            owner=PAPER_OWNER,
        output:
            macros=RETRIEVAL_MACROS,
        params:
            kind="absent",
        log:
            "results/logs/retrieval/paper.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/retrieval_report.py"

    ALL_TARGETS.append(RETRIEVAL_MACROS)
    PAPER_TABLES.append(RETRIEVAL_MACROS)

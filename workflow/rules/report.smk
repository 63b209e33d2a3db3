# Aggregates, LaTeX tables, figures and the macros the paper quotes (workflow/scripts/*.py).
#   results/aggregate/{model}/{experiment}.csv|json  pooled results with 95 % bootstrap intervals
#   results/figures/{model}/{name}.pdf|png
#   paper/generated/tables/{experiment}.tex      booktabs table per experiment, + presets.tex, reproduction.tex,
#                                                setup.tex
#   paper/generated/figures/{name}.pdf           the figures, copied for the paper
#   paper/generated/macros.tex                   every number the prose quotes, the author block, switches
# A run's results are keyed by its model (as its cells): another config's run leaves them alone. paper/ holds
# one run's files: every rule writing there takes the stamp paper/generated/owner.json, whose rule stops a run
# that would replace another model's paper (kvstream.paper_owner; --config overwrite_paper=True goes on).
# The aggregate checks every cell against its .nll.npy, the config's policy and the other cells, and refuses
# cells of different code versions unless eval.allow_mixed_code (kvstream.study.verify).
# Each output depends only on what it reads, so a change to one policy reruns its cells and then only the
# aggregates, tables and figures of the experiments that contain it. What each experiment is for comes
# from the config (experiments.<name>.role, knob; the `paper` block), never from its name: the main
# experiment (role main, else the first) gives the cache-trace and per-token NLL figures, the sweeps
# (role sweep) a figure each, the reproduction table takes the main experiment and the ablations, the
# first policy zoo (role zoo) gives zoo_ppl and zoo_speed (kvstream.study.zoo_figures).

REPORT_SEED = int(config["eval"]["seed"])
REPORT_N_BOOT = 2000

SWEEPS = PLAN.sweeps
ZOOS = [e for e in EXPERIMENTS if PLAN.experiment_role(e) == "zoo"]
ZOO_FIGURES = ["zoo_ppl", "zoo_speed"] if ZOOS else []
FIGURES = ["tradeoff", "cache_trace", "nll_along", *SWEEPS, *ZOO_FIGURES]
PAPER_TABLES = [f"paper/generated/tables/{e}.tex" for e in EXPERIMENTS]
PAPER_TABLES.extend(["paper/generated/tables/presets.tex", "paper/generated/tables/reproduction.tex",
                     "paper/generated/tables/setup.tex"])
PAPER_FIGURES = [f"paper/generated/figures/{f}.pdf" for f in FIGURES]
PAPER_MACROS = "paper/generated/macros.tex"
PAPER_OWNER = "paper/generated/owner.json"
ALL_AGGREGATES = [PLAN.aggregate_path(e, "json") for e in EXPERIMENTS]

ALL_TARGETS.extend(PLAN.aggregate_path(e, ext) for e in EXPERIMENTS for ext in ("csv", "json"))
ALL_TARGETS.extend(PLAN.figure_path(f, ext) for f in FIGURES for ext in ("pdf", "png"))
ALL_TARGETS.extend([*PAPER_TABLES, *PAPER_FIGURES, PAPER_MACROS])


wildcard_constraints:
    experiment=alternation(EXPERIMENTS),
    sweep=alternation(SWEEPS),
    zoo_figure=alternation(ZOO_FIGURES),
    figure=alternation(FIGURES),


# a stamp and copies: on a cluster they run where Snakemake runs, not as jobs of their own
localrules:
    paper_owner,
    paper_figure,


rule paper_owner:
    input:
        paper_owner_checked,
    output:
        PAPER_OWNER,
    params:
        owner=paper_owner_json(),
    log:
        "results/logs/paper_owner.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    shell:
        "echo {params.owner} > {output} 2> {log}"


rule aggregate:
    input:
        cells=lambda w: PLAN.experiment_cells(w.experiment),
        nll=lambda w: PLAN.nll_paths(PLAN.experiment_cells(w.experiment)),
        speed=lambda w: PLAN.speed_path(PLAN.experiment_dataset(w.experiment)),
    output:
        csv="results/aggregate/{model}/{experiment}.csv",
        json="results/aggregate/{model}/{experiment}.json",
    params:
        policies=lambda w: PLAN.experiment_policies(w.experiment),
        policy_blocks=lambda w: PLAN.policy_blocks(w.experiment),
        run_facts=lambda w: PLAN.run_facts(w.experiment),
        allow_mixed_code=config["eval"]["allow_mixed_code"],
        reference=lambda w: PLAN.experiment_reference(w.experiment),
        dataset=lambda w: PLAN.experiment_dataset(w.experiment),
        role=lambda w: PLAN.experiment_role(w.experiment),
        knob=lambda w: PLAN.experiment_knob(w.experiment),
        labels=lambda w: PLAN.experiment_labels(w.experiment),
        n_boot=REPORT_N_BOOT,
        seed=REPORT_SEED,
    log:
        "results/logs/aggregate/{model}/{experiment}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule table:
    input:
        aggregate=lambda w: PLAN.aggregate_path(w.experiment, "json"),
        owner=PAPER_OWNER,
    output:
        "paper/generated/tables/{experiment}.tex",
    params:
        kind="experiment",
        config=PLAN.paper_config(),
    log:
        "results/logs/tables/{experiment}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule table_reproduction:
    input:
        aggregate=[PLAN.aggregate_path(e, "json") for e in PLAN.reproduction_experiments],
        owner=PAPER_OWNER,
    output:
        "paper/generated/tables/reproduction.tex",
    params:
        kind="reproduction",
        config=PLAN.paper_config(),
    log:
        "results/logs/tables/reproduction.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule table_presets:
    input:
        aggregate=PLAN.aggregate_path(PLAN.main_experiment, "json"),
        owner=PAPER_OWNER,
    output:
        "paper/generated/tables/presets.tex",
    params:
        kind="presets",
        config=PLAN.paper_config(),
    log:
        "results/logs/tables/presets.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule table_setup:
    input:
        aggregate=ALL_AGGREGATES,
        owner=PAPER_OWNER,
    output:
        "paper/generated/tables/setup.tex",
    params:
        kind="setup",
        config=PLAN.paper_config(),
    log:
        "results/logs/tables/setup.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule macros:
    input:
        aggregate=ALL_AGGREGATES,
        owner=PAPER_OWNER,
    output:
        PAPER_MACROS,
    params:
        config=PLAN.paper_config(),
    log:
        "results/logs/macros/macros.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/macros.py"


rule figure_tradeoff:
    input:
        aggregate=ALL_AGGREGATES,
    output:
        pdf="results/figures/{model}/tradeoff.pdf",
        png=report(
            "results/figures/{model}/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="Figures",
            labels={"figure": "speedup vs PPL increase"},
        ),
    params:
        kind="tradeoff",
        paper=PLAN.paper_config()["paper"],
    log:
        "results/logs/figures/{model}/tradeoff.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_sweep:
    input:
        aggregate=lambda w: PLAN.aggregate_path(w.sweep, "json"),
    output:
        pdf="results/figures/{model}/{sweep}.pdf",
        png=report(
            "results/figures/{model}/{sweep}.png",
            caption="../report/sweep.rst",
            category="Figures",
            subcategory="Sweeps",
            labels={"figure": "{sweep}"},
        ),
    params:
        kind="sweep",
        paper=PLAN.paper_config()["paper"],
    log:
        "results/logs/figures/{model}/{sweep}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_cache_trace:
    input:
        cells=PLAN.trace_cells(),
    output:
        pdf="results/figures/{model}/cache_trace.pdf",
        png=report(
            "results/figures/{model}/cache_trace.png",
            caption="../report/cache_trace.rst",
            category="Figures",
            labels={"figure": "measured cache length"},
        ),
    params:
        kind="cache_trace",
        paper=PLAN.paper_config()["paper"],
    log:
        "results/logs/figures/{model}/cache_trace.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_nll_along:
    input:
        cells=PLAN.nll_cells(),
        nll=PLAN.nll_paths(PLAN.nll_cells()),
    output:
        pdf="results/figures/{model}/nll_along.pdf",
        png=report(
            "results/figures/{model}/nll_along.png",
            caption="../report/nll_along.rst",
            category="Figures",
            labels={"figure": "per-token NLL"},
        ),
    params:
        kind="nll_along",
        policies=PLAN.nll_policies(),
        paper=PLAN.paper_config()["paper"],
    log:
        "results/logs/figures/{model}/nll_along.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_zoo:
    input:
        aggregate=[PLAN.aggregate_path(e, "json") for e in ZOOS[:1]],
    output:
        pdf="results/figures/{model}/{zoo_figure}.pdf",
        png=report(
            "results/figures/{model}/{zoo_figure}.png",
            caption="../report/zoo.rst",
            category="Figures",
            subcategory="Policy zoo",
            labels={"figure": "{zoo_figure}"},
        ),
    params:
        kind="zoo",
        paper=PLAN.paper_config()["paper"],
    log:
        "results/logs/figures/{model}/{zoo_figure}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule paper_figure:
    input:
        figure=lambda w: PLAN.figure_path(w.figure),
        owner=PAPER_OWNER,
    output:
        "paper/generated/figures/{figure}.pdf",
    log:
        "results/logs/figures/paper_{figure}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    shell:
        logged("cp {input.figure} {output}")

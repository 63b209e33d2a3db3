# Aggregates, LaTeX tables, figures and the macros the paper quotes (src/kvstream/report.py, figures.py).
#   results/aggregate/{experiment}.csv|json      pooled results with 95 % bootstrap intervals
#   paper/generated/tables/{experiment}.tex      booktabs table per experiment, + reproduction.tex, setup.tex
#   results/figures/{name}.pdf|png, paper/generated/figures/{name}.pdf
#   paper/generated/macros.tex                   every number the prose quotes, the author block, switches
# Each output depends only on what it reads, so a change to one policy reruns its cells and then only the
# aggregates, tables and figures of the experiments that contain it.

import re

REPORT_SEED = int(config["eval"].get("seed", 0))
REPORT_N_BOOT = 2000

SWEEPS = [e for e in EXPERIMENTS if e.startswith("sweep")]
MAIN_EXPERIMENT = "table1" if "table1" in EXPERIMENTS else EXPERIMENTS[0]  # the schema requires one experiment
MAIN_DATASET = experiment_dataset(MAIN_EXPERIMENT)
FIGURES = ["tradeoff", "cache_trace", "nll_along"] + SWEEPS
PAPER_TABLES = [f"paper/generated/tables/{e}.tex" for e in EXPERIMENTS] + [
    "paper/generated/tables/reproduction.tex",
    "paper/generated/tables/setup.tex",
]
PAPER_FIGURES = [f"paper/generated/figures/{f}.pdf" for f in FIGURES]
PAPER_MACROS = "paper/generated/macros.tex"

ALL_TARGETS += [f"results/figures/{f}.{ext}" for f in FIGURES for ext in ("pdf", "png")]
ALL_TARGETS += PAPER_TABLES + PAPER_FIGURES + [PAPER_MACROS]


def _alt(names):
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


def _nll(cells):
    return [c[: -len(".json")] + ".nll.npy" for c in cells]


def all_aggregates():
    return [aggregate_path(e, "json") for e in EXPERIMENTS]


def _main_dataset_policies():
    """Policies run on the main experiment's dataset, config order."""
    seen = {}
    for e in EXPERIMENTS:
        if experiment_dataset(e) == MAIN_DATASET:
            for p in experiment_policies(e):
                seen.setdefault(p, None)
    return list(seen)


def trace_cells():
    """First-sample cells of the sink policies (the figure picks R = 1, 32, 64 of one family)."""
    pols = [p for p in _main_dataset_policies() if policy_params(p)["type"] == "sink"]
    return [cell_path(MODEL, MAIN_DATASET, p, 0) for p in pols]


def nll_policies():
    """recompute (the reference), the sink-less window, and StreamingLLM (else the first sink policy)."""
    pols = _main_dataset_policies()
    out = [experiment_reference(MAIN_EXPERIMENT)]
    out += [p for p in pols if policy_params(p)["type"] == "window"][:1]
    sinks = [p for p in pols if policy_params(p)["type"] == "sink"]
    out += ["mit_streaming"] if "mit_streaming" in sinks else sinks[:1]
    return [p for p in dict.fromkeys(out) if p in pols]


def nll_cells():
    return [cell_path(MODEL, MAIN_DATASET, p, i) for p in nll_policies() for i in range(n_samples(MAIN_DATASET))]


def paper_config():
    """The parts of the config the tables and macros print (a change reruns them)."""
    keys = ("title", "authors", "model", "datasets", "eval")
    return {k: config.get(k) for k in keys}


wildcard_constraints:
    experiment=_alt(EXPERIMENTS),
    sweep=_alt(SWEEPS),


rule aggregate:
    input:
        cells=lambda w: experiment_cells(w.experiment),
        nll=lambda w: _nll(experiment_cells(w.experiment)),
        speed=lambda w: speed_path(experiment_dataset(w.experiment)),
    output:
        csv="results/aggregate/{experiment}.csv",
        json="results/aggregate/{experiment}.json",
    params:
        policies=lambda w: experiment_policies(w.experiment),
        reference=lambda w: experiment_reference(w.experiment),
        dataset=lambda w: experiment_dataset(w.experiment),
        n_boot=REPORT_N_BOOT,
        seed=REPORT_SEED,
    log:
        log_path("aggregate", "{experiment}"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule table:
    input:
        aggregate=lambda w: aggregate_path(w.experiment, "json"),
    output:
        "paper/generated/tables/{experiment}.tex",
    params:
        kind="experiment",
        config=paper_config(),
    log:
        log_path("tables", "{experiment}"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule table_reproduction:
    input:
        aggregate=[aggregate_path(e, "json") for e in ("table1", "table2") if e in EXPERIMENTS],
    output:
        "paper/generated/tables/reproduction.tex",
    params:
        kind="reproduction",
        config=paper_config(),
    log:
        log_path("tables", "reproduction"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule table_setup:
    input:
        aggregate=all_aggregates(),
    output:
        "paper/generated/tables/setup.tex",
    params:
        kind="setup",
        config=paper_config(),
    log:
        log_path("tables", "setup"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/tables.py"


rule macros:
    input:
        aggregate=all_aggregates(),
    output:
        PAPER_MACROS,
    params:
        config=paper_config(),
    log:
        log_path("macros", "macros"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/macros.py"


rule figure_tradeoff:
    input:
        aggregate=all_aggregates(),
    output:
        pdf="results/figures/tradeoff.pdf",
        png=report(
            "results/figures/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="Figures",
            labels={"figure": "speedup vs PPL increase"},
        ),
        paper="paper/generated/figures/tradeoff.pdf",
    params:
        kind="tradeoff",
    log:
        log_path("figures", "tradeoff"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_sweep:
    input:
        aggregate=lambda w: aggregate_path(w.sweep, "json"),
    output:
        pdf="results/figures/{sweep}.pdf",
        png=report(
            "results/figures/{sweep}.png",
            caption="../report/sweep.rst",
            category="Figures",
            subcategory="Sweeps",
            labels={"figure": "{sweep}"},
        ),
        paper="paper/generated/figures/{sweep}.pdf",
    params:
        kind="sweep",
    log:
        log_path("figures", "{sweep}"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_cache_trace:
    input:
        cells=trace_cells(),
    output:
        pdf="results/figures/cache_trace.pdf",
        png=report(
            "results/figures/cache_trace.png",
            caption="../report/cache_trace.rst",
            category="Figures",
            labels={"figure": "measured cache length"},
        ),
        paper="paper/generated/figures/cache_trace.pdf",
    params:
        kind="cache_trace",
    log:
        log_path("figures", "cache_trace"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"


rule figure_nll_along:
    input:
        cells=nll_cells(),
        nll=_nll(nll_cells()),
    output:
        pdf="results/figures/nll_along.pdf",
        png=report(
            "results/figures/nll_along.png",
            caption="../report/nll_along.rst",
            category="Figures",
            labels={"figure": "per-token NLL"},
        ),
        paper="paper/generated/figures/nll_along.pdf",
    params:
        kind="nll_along",
        policies=nll_policies(),
    log:
        log_path("figures", "nll_along"),
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/figures.py"

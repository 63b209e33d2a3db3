# The decode-step benchmark: `kvstream bench` on this machine (config `bench`), and a paper table of it
# together with GPU results committed under benchmarks/ (measured there by benchmarks/gpu_check.py:
# CI and laptops have no GPU, so those numbers travel as data, with the card's name in them). The run's
# benchmark is keyed by its model like its other results (results/bench/{model}/), though it times shapes.

if config["bench"]["enabled"]:

    rule bench:
        output:
            json="results/bench/{model}/bench.json",
            md="results/bench/{model}/bench.md",
        params:
            args=shell_args(
                *(("--shape", shape) for shape in config["bench"]["shapes"]),
                *(("--budget", budget) for budget in config["bench"]["budgets"]),
                *((f"--{key.replace('_', '-')}", config["bench"].get(key)) for key in ("steps", "warmup", "repeats")),
                ("--device", config["model"]["device"]), ("--recompute-steps", config["bench"].get("recompute_steps")),
            ),
        log:
            "results/logs/bench/{model}/bench.log",
        threads: all_cores()  # alone on the machine: a timing run shares no core with other jobs
        resources:
            **PLAN.rule_resources("bench", gpu=True),
        conda:
            "../../envs/kvstream.yaml"
        shell:
            logged("python -m kvstream bench {params.args} --threads 1 --out {output.json}")

    rule bench_table:
        input:
            results=[f"results/bench/{MODEL}/bench.json", *config["bench"]["gpu_results"]],
            owner=PAPER_OWNER,
        output:
            "paper/generated/tables/bench.tex",
        log:
            "results/logs/bench/table.log",
        threads: 1
        resources:
            **PLAN.rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/bench_table.py"

    ALL_TARGETS.append(f"results/bench/{MODEL}/bench.json")
    PAPER_TABLES.append("paper/generated/tables/bench.tex")

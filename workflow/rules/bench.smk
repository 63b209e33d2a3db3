# The decode-step benchmark: `kvstream bench` on this machine (config `bench`), and a paper table of it
# together with GPU results committed under benchmarks/ (measured there by benchmarks/gpu_check.py:
# CI and laptops have no GPU, so those numbers travel as data, with the card's name in them).

BENCH = config.get("bench") or {}

if BENCH.get("enabled", False):

    rule bench:
        output:
            json="results/bench/bench.json",
            md="results/bench/bench.md",
        params:
            args=" ".join(
                [f"--shape {s}" for s in BENCH.get("shapes", ["pythia-70m"])]
                + [f"--budget {b}" for b in BENCH.get("budgets", [512])]
                + [f"--steps {BENCH.get('steps', 32)} --warmup {BENCH.get('warmup', 4)}",
                   f"--repeats {BENCH.get('repeats', 2)} --device {config['model'].get('device', 'auto')}"]
                + ([f"--recompute-steps {BENCH['recompute_steps']}"] if BENCH.get("recompute_steps") else [])
            ),
        log:
            log_path("bench", "bench"),
        threads: all_cores()  # alone on the machine: a timing run shares no core with other jobs
        resources:
            **rule_resources("bench"),
            **({"gpu": 1} if USE_CUDA else {}),
        conda:
            "../../envs/kvstream.yaml"
        shell:
            "{KVSTREAM} bench {params.args} --threads 1 --out {output.json} > {log} 2>&1" + ON_FAILURE

    rule bench_table:
        input:
            "results/bench/bench.json",
            *BENCH.get("gpu_results", []),
        output:
            "paper/generated/tables/bench.tex",
        log:
            log_path("bench", "table"),
        threads: 1
        resources:
            **rule_resources("report"),
        conda:
            "../../envs/report.yaml"
        script:
            "../scripts/bench_table.py"

    ALL_TARGETS.append("results/bench/bench.json")
    PAPER_TABLES.append("paper/generated/tables/bench.tex")

# Speed, measured apart from quality: one `kvstream speed` job per dataset times every policy the
# experiments run on it, in one process, batch 1, in steady state (cache full), interleaved in rounds,
# each policy over whole eviction periods (docs/method.md, "Speed"). A policy whose schedule is identical
# to an earlier one's runs the same computation and takes that one's timing, as it takes its cells; the
# first such policy is timed anyway, as a measurement of timing noise (PLAN.speed_policies). The job asks
# for all of the run's cores so that no other job shares them while it times. Tables, figures and macros
# take speed (mean ms per token, speedup) from its JSON; the eval jobs' own step times are diagnostics.
# Like the eval jobs, the job has the code version of what it runs as a param: a change to that code reruns it.


rule speed:
    input:
        model=PLAN.model_dir(),
        tokens=lambda w: PLAN.tokens_path(w.dataset, 0),
    output:
        json="results/speed/{model}/{dataset}/speed.json",
        md="results/speed/{model}/{dataset}/speed.md",
    params:
        policies=lambda w: PLAN.speed_policies_json(w.dataset),
        reference=lambda w: PLAN.speed_reference(w.dataset),
        code_version=PLAN.speed_code_version,  # not passed on: a change reruns the job
        args=shell_args(  # a change reruns the speed runs, nothing upstream
            *((f"--{key.replace('_', '-')}", config["speed"][key]) for key in ("rounds", "min_steps", "min_events", "warmup_periods")),
            ("--steady-steps", config["speed"].get("steady_steps", config["speed"]["min_steps"])),
            ("--execution", config["speed"]["execution"]), ("--threads", PLAN.speed_threads()),
            ("--device", config["model"]["device"]), ("--dtype", config["model"]["dtype"]), ("--seed", config["eval"]["seed"]),
        ),
    log:
        "results/logs/speed/{model}/{dataset}.log",
    threads: max(all_cores(), PLAN.speed_threads())  # alone on the machine
    resources:
        **PLAN.rule_resources("speed", gpu=True),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        logged(
            "python -m kvstream speed --model {input.model} --tokens {input.tokens} --policies {params.policies}"
            " --reference {params.reference} {params.args} --out {output.json}"
        )


ALL_TARGETS.extend(PLAN.speed_path(d) for d in PLAN.speed_datasets)  # none for a long-stream-only dataset

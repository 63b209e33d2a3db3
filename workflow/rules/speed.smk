# Speed, measured apart from quality: one `kvstream speed` job per dataset times every policy the
# experiments run on it, in one process, batch 1, in steady state (cache full), interleaved in rounds,
# each policy over whole eviction periods (docs/method.md, "Speed"). A policy whose schedule is identical
# to an earlier one's runs the same computation and takes that one's timing, as it takes its cells; the
# first such policy is timed anyway, as a measurement of timing noise. The job asks for all of the
# run's cores so that no other job shares them while it times. Tables, figures and macros take
# speed (mean ms per token, speedup) from its JSON; the eval jobs' own step times are diagnostics.

SPEED = config.get("speed") or {}


def speed_path(dataset, ext="json"):
    return f"results/speed/{MODEL}/{dataset}/speed.{ext}"


def speed_policies(dataset):
    """The policies the speed run times: every evaluated one, and of the policies whose schedule is
    identical to an earlier one's (they reuse its cells and its timing) the first, as a probe of timing
    noise: it runs exactly the computation of its source, timed separately in the same run."""
    pols = dataset_policies(dataset)
    reused = [p for p in pols if reused_from(dataset, p) is not None]
    probe = reused[:1] if SPEED.get("noise_probe", True) else []
    return [p for p in pols if reused_from(dataset, p) is None or p in probe]


def speed_policies_json(dataset):
    """name -> resolved parameters of the timed policies, shell-quoted JSON."""
    return shlex.quote(json.dumps({p: policy_params(p) for p in speed_policies(dataset)}, sort_keys=True))


def speed_reference(dataset):
    refs = [experiment_reference(e) for e in EXPERIMENTS if experiment_dataset(e) == dataset]
    return refs[0]


def speed_args():
    """Settings of every speed run: a change reruns them (and nothing upstream)."""
    ev, m = config["eval"], config["model"]
    return (
        f"--rounds {SPEED.get('rounds', 3)} --min-steps {SPEED.get('min_steps', 64)}"
        f" --min-events {SPEED.get('min_events', 2)} --warmup-periods {SPEED.get('warmup_periods', 1)}"
        f" --steady-steps {SPEED.get('steady_steps', SPEED.get('min_steps', 64))}"
        f" --execution {SPEED.get('execution', 'auto')} --threads {SPEED.get('threads', ev.get('threads', 1))}"
        f" --device {m.get('device', 'auto')} --dtype {m.get('dtype', 'float32')} --seed {ev.get('seed', 0)}"
    )


rule speed:
    input:
        model=model_dir(),
        tokens=lambda w: tokens_path(w.dataset, 0),
    output:
        json="results/speed/{model}/{dataset}/speed.json",
        md="results/speed/{model}/{dataset}/speed.md",
    params:
        policies=lambda w: speed_policies_json(w.dataset),
        reference=lambda w: speed_reference(w.dataset),
        args=speed_args(),
    log:
        "results/logs/speed/{model}/{dataset}.log",
    threads: max(all_cores(), int(SPEED.get("threads", config["eval"].get("threads", 1))))  # alone on the machine
    resources:
        **rule_resources("speed"),
        **({"gpu": 1} if USE_CUDA else {}),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        (
            "{KVSTREAM} speed --model {input.model} --tokens {input.tokens} --policies {params.policies}"
            " --reference {params.reference} {params.args} --out {output.json} > {log} 2>&1 "
        )
        + ON_FAILURE


ALL_TARGETS.extend(speed_path(d) for d in DATASETS if dataset_policies(d))

# One eval job per (policy, sample) cell: results/cells/{model}/{dataset}/{policy}/s{i}.json (+ .nll.npy).
# The job's params are that policy's resolved parameters and the shared eval settings only, so editing
# one policy reruns only its cells (and the aggregates, tables, figures and paper that read them).

wildcard_constraints:
    policy="|".join(re.escape(p) for p in POLICIES),
    sample=r"\d+",


def policy_cli(policy):
    """`kvstream eval` arguments of a policy, from its resolved parameters."""
    p = policy_params(policy)
    args = ["--policy", p["type"]]
    if p["type"] == "sink":
        args += ["--n-sink", p["n_sink"], "--compress-every", p["compress_every"], "--cache-slack", p["cache_slack"]]
        args += ["--max-drop", "none" if p["max_drop"] is None else p["max_drop"]]
    if p["type"] in ("sink", "window"):
        args += ["--budget-mode", p["budget_mode"], "--positions", p["positions"]]
        if p["budget_mode"] == "fixed":
            args += ["--window-size", p["window_size"]]
    if "cap" in p:
        args += ["--cap", p["cap"]]
    return " ".join(str(a) for a in args)


def eval_settings_cli():
    """Arguments shared by every cell: a change reruns all cells."""
    ev, m = config["eval"], config["model"]
    return (
        f"--warmup {ev.get('warmup', 8)} --device {m.get('device', 'auto')} --dtype {m.get('dtype', 'float32')}"
        f" --threads {ev.get('threads', 1)} --seed {ev.get('seed', 0)}"
    )


rule eval:
    input:
        model=model_dir(),
        tokens="results/tokens/{model}/{dataset}/s{sample}.npy",
    output:
        cell="results/cells/{model}/{dataset}/{policy}/s{sample}.json",
        nll="results/cells/{model}/{dataset}/{policy}/s{sample}.nll.npy",
    params:
        policy=lambda w: policy_cli(w.policy),
        settings=eval_settings_cli(),
    log:
        "results/logs/eval/{model}/{dataset}/{policy}/s{sample}.log",
    threads: int(config["eval"].get("threads", 1))
    resources:
        **rule_resources("eval"),
        **({"gpu": 1} if USE_CUDA else {}),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        (
            "{KVSTREAM} eval --model {input.model} --tokens {input.tokens} {params.policy} {params.settings}"
            " --label model={wildcards.model} --label dataset={wildcards.dataset}"
            " --label policy={wildcards.policy} --label sample=s{wildcards.sample}"
            " --out {output.cell} > {log} 2>&1 "
        )
        + ON_FAILURE

# Quality cells: results/cells/{model}/{dataset}/{policy}/s{i}.json (+ .nll.npy), one per (policy, sample).
#
# Samples are evaluated in batches of eval.batch_size (one rule per dataset and batch, named
# eval_<dataset>_b<k>): one job evaluates one policy on the batch's samples and writes exactly the
# per-sample cells a one-sample run writes. A job's params are that policy's resolved parameters and
# the shared eval settings only, so editing one policy reruns only its jobs. Policies whose eviction
# schedule is provably identical to an earlier policy's (same kind, S, budget, positions and
# cache-length trace: they evict the same tokens at the same steps) are not evaluated again: rule
# reuse_<dataset>_b<k> copies the earlier policy's cells and writes the policy's own parameters into them.

BATCH_SIZE = int(config["eval"].get("batch_size", 1))
RECOMPUTE_EVERY = int(config["eval"].get("recompute_every", 1))


def sample_batches(dataset):
    n = n_samples(dataset)
    return [list(range(i, min(i + BATCH_SIZE, n))) for i in range(0, n, BATCH_SIZE)]


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
    if p["type"] == "recompute" and RECOMPUTE_EVERY > 1:
        args += ["--recompute-every", RECOMPUTE_EVERY]
    return " ".join(str(a) for a in args)


def eval_settings_cli():
    """Arguments shared by every cell: a change reruns all cells."""
    ev, m = config["eval"], config["model"]
    return (
        f"--warmup {ev.get('warmup', 8)} --device {m.get('device', 'auto')} --dtype {m.get('dtype', 'float32')}"
        f" --threads {ev.get('threads', 1)} --seed {ev.get('seed', 0)}"
    )


def _alt_names(names):
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


for _ds in DATASETS:
    _computed = [p for p in dataset_policies(_ds) if reused_from(_ds, p) is None]
    _reused = [p for p in dataset_policies(_ds) if reused_from(_ds, p) is not None]
    for _k, _batch in enumerate(sample_batches(_ds)):
        _tag = re.sub(r"\W", "_", f"{_ds}_b{_k}")

        rule:
            name:
                f"eval_{_tag}"
            input:
                model=model_dir(),
                tokens=[tokens_path(_ds, i) for i in _batch],
            output:
                cells=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.json" for i in _batch],
                nll=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.nll.npy" for i in _batch],
            wildcard_constraints:
                policy=_alt_names(_computed),
            params:
                policy=lambda w: policy_cli(w.policy),
                settings=eval_settings_cli(),
            log:
                f"results/logs/eval/{{model}}/{_ds}/{{policy}}/b{_k}.log",
            threads: int(config["eval"].get("threads", 1))
            resources:
                **rule_resources("eval"),
                **({"gpu": 1} if USE_CUDA else {}),
            conda:
                "../../envs/kvstream.yaml"
            shell:
                (
                    "{KVSTREAM} eval --model {input.model} --tokens {input.tokens} {params.policy} {params.settings}"
                    f" --label model={{wildcards.model}} --label dataset={_ds} --label policy={{wildcards.policy}}"
                    " --out {output.cells} > {log} 2>&1 "
                )
                + ON_FAILURE

        if _reused:

            rule:
                name:
                    f"reuse_{_tag}"
                input:
                    cells=lambda w, _ds=_ds, _batch=_batch: [
                        cell_path(w.model, _ds, reused_from(_ds, w.policy), i) for i in _batch
                    ],
                output:
                    cells=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.json" for i in _batch],
                    nll=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.nll.npy" for i in _batch],
                wildcard_constraints:
                    policy=_alt_names(_reused),
                params:
                    policy=lambda w: policy_params(w.policy),
                    source=lambda w, _ds=_ds: reused_from(_ds, w.policy),
                log:
                    f"results/logs/reuse/{{model}}/{_ds}/{{policy}}/b{_k}.log",
                threads: 1
                resources:
                    **rule_resources("report"),
                conda:
                    "../../envs/report.yaml"
                script:
                    "../scripts/reuse_cells.py"

# Quality cells: results/cells/{model}/{dataset}/{policy}/s{i}.json (+ .nll.npy), one per (policy, sample).
#
# Samples are evaluated in batches of eval.batch_size (one rule per dataset and batch, named
# eval_<dataset>_b<k>): one job evaluates one policy on the batch's samples and writes exactly the
# per-sample cells a one-sample run writes. The policy reaches `kvstream eval` as one JSON object, the
# fields of its resolved kvstream.schedule.Policy (PLAN.policy_json); a job's params are that and the
# shared eval settings only, so editing one policy reruns only its jobs. Policies whose eviction
# schedule is provably identical to an earlier policy's (same kind, S, budget, positions and
# cache-length trace: they evict the same tokens at the same steps) are not evaluated again: rule
# reuse_<dataset>_b<k> copies the earlier policy's cells and writes the policy's own parameters into them.
# Every eval job also gets the code version of the modules that compute a cell (PLAN.cell_code_version,
# kvstream.codeversion): a change to that code (comments and docstrings aside) reruns every cell, and each
# cell records the version it was computed with (`cell.code_version`, checked by the aggregate).

for _ds in DATASETS:
    _evaluated = [p for p in PLAN.dataset_policies(_ds) if PLAN.reused_from(_ds, p) is None]
    _reused = [p for p in PLAN.dataset_policies(_ds) if PLAN.reused_from(_ds, p) is not None]
    for _k, _batch in enumerate(PLAN.sample_batches(_ds)):

        rule:
            name:
                f"eval_{_ds}_b{_k}"
            input:
                model=PLAN.model_dir(),
                tokens=[PLAN.tokens_path(_ds, i) for i in _batch],
            output:
                cells=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.json" for i in _batch],
                nll=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.nll.npy" for i in _batch],
            wildcard_constraints:
                policy=alternation(_evaluated),
            params:
                policy_json=lambda w: PLAN.policy_json(w.policy),
                recompute_every=lambda w, _ds=_ds: PLAN.recompute_every(w.policy, _ds),
                settings=shell_args(  # shared by every cell: a change reruns them all
                    ("--warmup", config["eval"]["warmup"]), ("--device", config["model"]["device"]),
                    ("--dtype", config["model"]["dtype"]), ("--threads", config["eval"]["threads"]),
                    ("--seed", config["eval"]["seed"]),
                ),
                dataset=_ds,
                code_version=PLAN.cell_code_version,
            log:
                f"results/logs/eval/{{model}}/{_ds}/{{policy}}/b{_k}.log",
            threads: int(config["eval"]["threads"])
            resources:
                **PLAN.rule_resources("eval", gpu=True),
            conda:
                "../../envs/kvstream.yaml"
            shell:
                logged(
                    "python -m kvstream eval --model {input.model} --tokens {input.tokens}"
                    " --policy-json {params.policy_json} --recompute-every {params.recompute_every}"
                    " {params.settings} --label model={wildcards.model} --label dataset={params.dataset}"
                    " --label policy={wildcards.policy} --label code_version={params.code_version} --out {output.cells}"
                )

        if _reused:

            rule:
                name:
                    f"reuse_{_ds}_b{_k}"
                input:
                    cells=lambda w, _ds=_ds, _batch=_batch: [
                        PLAN.cell_path(_ds, PLAN.reused_from(_ds, w.policy), i, model=w.model) for i in _batch
                    ],
                output:
                    cells=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.json" for i in _batch],
                    nll=[f"results/cells/{{model}}/{_ds}/{{policy}}/s{i}.nll.npy" for i in _batch],
                wildcard_constraints:
                    policy=alternation(_reused),
                params:
                    policy=lambda w: PLAN.policy_fields(w.policy),
                    source=lambda w, _ds=_ds: PLAN.reused_from(_ds, w.policy),
                log:
                    f"results/logs/reuse/{{model}}/{_ds}/{{policy}}/b{_k}.log",
                threads: 1
                resources:
                    **PLAN.rule_resources("report"),
                conda:
                    "../../envs/report.yaml"
                script:
                    "../scripts/reuse_cells.py"

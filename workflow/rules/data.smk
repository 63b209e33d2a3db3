# Data and model: fetch_text (per dataset), prepare_model, tokenize_<dataset> (per model x dataset).
# Every job's stdout and stderr go to its log; on failure the last lines of the log are printed too
# (logged, common.smk), so a message such as "the Hub cannot be reached" shows on the terminal.

wildcard_constraints:
    model=alternation([MODEL]),
    dataset=alternation(DATASETS),


rule fetch_text:
    input:
        lambda w: PLAN.local_copy(w.dataset),
    output:
        "results/data/{dataset}/documents.jsonl",
    params:
        args=lambda w: shell_args(
            *((f"--{key.replace('_', '-')}", config["datasets"][w.dataset].get(key))
              for key in ("source", "path", "split", "hub_id", "max_documents"))
        ),
    log:
        "results/logs/fetch_text/{dataset}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("fetch_text"),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        logged("python -m kvstream fetch-text {params.args} --out {output}")


rule prepare_model:
    output:
        directory("results/models/{model}"),
    params:
        args=shell_args(*((f"--{key}", config["model"].get(key)) for key in ("source", "dtype", "path", "revision", "seed"))),
    log:
        "results/logs/prepare_model/{model}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("prepare_model"),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        logged("python -m kvstream prepare-model {params.args} --out {output}")


# One tokenize rule per dataset: its outputs s0..s{K-1}.npy depend on the dataset's n_samples.
for _ds in DATASETS:

    rule:
        name:
            f"tokenize_{_ds}"
        input:
            model=PLAN.model_dir(),
            documents=f"results/data/{_ds}/documents.jsonl",
        output:
            manifest=f"results/tokens/{MODEL}/{_ds}/manifest.json",
            samples=[PLAN.tokens_path(_ds, i) for i in range(PLAN.n_samples(_ds))],
        params:
            n_samples=PLAN.n_samples(_ds),
            tokens_per_sample=int(config["datasets"][_ds]["tokens_per_sample"]),
            out_dir=lambda w, output: str(Path(output.manifest).parent),
        log:
            f"results/logs/tokenize/{MODEL}/{_ds}.log",
        threads: 1
        resources:
            **PLAN.rule_resources("tokenize"),
        conda:
            "../../envs/kvstream.yaml"
        shell:
            logged(
                "python -m kvstream tokenize --model {input.model} --documents {input.documents}"
                " --n-samples {params.n_samples} --tokens-per-sample {params.tokens_per_sample}"
                " --out-dir {params.out_dir}"
            )

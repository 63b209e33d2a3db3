# Data and model: fetch_text (per dataset), prepare_model, tokenize_<dataset> (per model x dataset).
# Every job's stdout/stderr goes to its log; on failure the last lines of the log are printed too
# (ON_FAILURE), so a message such as "the Hub cannot be reached; point the config at a local copy"
# shows on the terminal.

wildcard_constraints:
    model=re.escape(MODEL),
    dataset="|".join(re.escape(d) for d in DATASETS),


def fetch_text_args(dataset):
    d = config["datasets"][dataset]
    args = ["--source", d["source"]]
    if d.get("path"):
        args += ["--path", d["path"]]
    if d.get("split"):
        args += ["--split", d["split"]]
    if d.get("hub_id"):
        args += ["--hub-id", d["hub_id"]]
    if d.get("max_documents"):
        args += ["--max-documents", d["max_documents"]]
    return " ".join(shlex.quote(str(a)) for a in args)


def prepare_model_args():
    m = config["model"]
    args = ["--source", m["source"], "--dtype", m.get("dtype", "float32")]
    for key in ("path", "revision", "seed"):
        if m.get(key) is not None:
            args += ["--" + key, m[key]]
    return " ".join(shlex.quote(str(a)) for a in args)


def fetch_text_input(wildcards):
    """A local copy the config points at is an input: editing it refetches."""
    path = config["datasets"][wildcards.dataset].get("path")
    return [path] if path and Path(path).exists() else []


rule fetch_text:
    input:
        fetch_text_input,
    output:
        "results/data/{dataset}/documents.jsonl",
    params:
        args=lambda w: fetch_text_args(w.dataset),
    log:
        "results/logs/fetch_text/{dataset}.log",
    threads: 1
    resources:
        **rule_resources("fetch_text"),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        "{KVSTREAM} fetch-text {params.args} --out {output} > {log} 2>&1 " + ON_FAILURE


rule prepare_model:
    output:
        directory("results/models/{model}"),
    params:
        args=prepare_model_args(),
    log:
        "results/logs/prepare_model/{model}.log",
    threads: 1
    resources:
        **rule_resources("prepare_model"),
    conda:
        "../../envs/kvstream.yaml"
    shell:
        "{KVSTREAM} prepare-model {params.args} --out {output} > {log} 2>&1 " + ON_FAILURE


# One tokenize rule per dataset: its outputs s0..s{K-1}.npy depend on the dataset's n_samples.
for _ds in DATASETS:

    rule:
        name:
            f"tokenize_{_ds}"
        input:
            model=model_dir(),
            documents=f"results/data/{_ds}/documents.jsonl",
        output:
            manifest=f"results/tokens/{MODEL}/{_ds}/manifest.json",
            samples=[tokens_path(_ds, i) for i in range(n_samples(_ds))],
        params:
            n_samples=n_samples(_ds),
            tokens_per_sample=int(config["datasets"][_ds]["tokens_per_sample"]),
            out_dir=f"results/tokens/{MODEL}/{_ds}",
        log:
            f"results/logs/tokenize/{MODEL}/{_ds}.log",
        threads: 1
        resources:
            **rule_resources("tokenize"),
        conda:
            "../../envs/kvstream.yaml"
        shell:
            (
                "{KVSTREAM} tokenize --model {input.model} --documents {input.documents}"
                " --n-samples {params.n_samples} --tokens-per-sample {params.tokens_per_sample}"
                " --out-dir {params.out_dir} > {log} 2>&1 "
            )
            + ON_FAILURE

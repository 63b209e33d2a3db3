# A minimal workflow with the pipeline's rule names, used by `scripts/slurm-selftest.sh --smoke`
# to check the SLURM bring-up and profiles/slurm/ without running the real pipeline.
# Each cell records the SLURM job id it ran under (or "local").

POLICIES = ["dense", "window"]
SAMPLES = [0, 1]


rule all:
    input:
        "smoke/aggregate.txt",


rule prepare_model:
    output:
        "smoke/model.txt",
    shell:
        "echo model job=${{SLURM_JOB_ID:-local}} > {output}"


rule eval:
    input:
        "smoke/model.txt",
    output:
        "smoke/cells/{policy}/s{sample}.txt",
    threads: 1
    shell:
        "echo {wildcards.policy} {wildcards.sample} job=${{SLURM_JOB_ID:-local}}"
        " gpus=${{SLURM_GPUS_ON_NODE:-0}} host=$(hostname) > {output}"


rule aggregate:
    input:
        expand("smoke/cells/{policy}/s{sample}.txt", policy=POLICIES, sample=SAMPLES),
    output:
        "smoke/aggregate.txt",
    shell:
        "cat {input} > {output}"

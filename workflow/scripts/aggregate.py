"""Snakemake `script:` entry point of rule aggregate: pool one experiment's cells (kvstream.study.aggregate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821  (snakemake is injected)
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.study.aggregate import aggregate, write_aggregate

    sm = snakemake  # noqa: F821
    agg = aggregate(
        paths(sm.input.cells),
        experiment=sm.wildcards.experiment,
        policies=list(sm.params.policies),
        reference=sm.params.reference,
        n_boot=int(sm.params.n_boot),
        seed=int(sm.params.seed),
        dataset=sm.params.dataset,
        speed=sm.input.speed,
        role=sm.params.role,
        knob=sm.params.knob,
        labels=dict(sm.params.labels or {}),
        policy_blocks=dict(sm.params.policy_blocks),
        run_facts=dict(sm.params.run_facts),
        allow_mixed_code=bool(sm.params.allow_mixed_code),
    )
    write_aggregate(agg, sm.output.json, sm.output.csv)
    print(f"{sm.wildcards.experiment}: {len(agg['policies'])} policies, {agg['n_samples']} samples -> {sm.output.json}")

"""The pipeline's config: every shipped config is valid; a bad one stops Snakemake before any job with
one message naming the field; the conda environments keep the pins of requirements.lock."""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline_helpers import DELETE, REPO, edited, load_config, planned_jobs, snakemake, write_config

DEFAULT = load_config(REPO / "config.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from pipeline_helpers import copy_repo

    return copy_repo(tmp_path_factory.mktemp("repo"))


def dry_run(workdir, cfg=None, *extra):
    args = ["--dry-run", "--cores", "1", *extra]
    if cfg is not None:
        args += ["--configfile", str(write_config(workdir / "test-config.yaml", cfg))]
    return snakemake(workdir, *args, check=False)


def eval_jobs(output):
    """Cell JSONs planned by the eval batch jobs and the reuse jobs (identical schedules), each listed once."""
    return [o for rule, outs in planned_jobs(output) if rule.startswith(("eval_", "reuse_"))
            for o in outs if o.endswith(".json")]


@pytest.mark.parametrize(
    "config_args",
    [
        # every (policy, sample) cell planned once: a policy shared between experiments is one cell
        [],
        ["--configfile", "config/tiny.yaml"],
        ["--configfile", "config/paper.yaml"],
        ["--configfile", "config/paper.yaml", "--config", "scale=full"],
    ],
    ids=["default", "tiny", "paper-quick", "paper-full"],
)
def test_shipped_configs_plan_one_job_per_cell(workdir, config_args):
    proc = dry_run(workdir, None, "--resources", "gpu=1", *config_args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    path = REPO / (config_args[1] if config_args else "config.yaml")
    cfg = load_config(path)
    if "scale=full" in config_args:
        for name, over in cfg["scales"]["full"]["datasets"].items():
            cfg["datasets"][name].update(over)
    expected = {
        f"results/cells/{cfg['model']['name']}/{e['dataset']}/{p}/s{i}.json"
        for e in cfg["experiments"].values()
        for p in e["policies"]
        for i in range(cfg["datasets"][e["dataset"]]["n_samples"])
    }
    cells = eval_jobs(proc.stdout)
    assert len(cells) == len(set(cells))
    assert set(cells) == expected
    # eval jobs ask for a GPU exactly when they run on CUDA (`auto` depends on this machine)
    gpu = re.findall(r"^rule eval_\w+:\n(?:    .*\n)*?    resources: (.*)$", proc.stdout, flags=re.M)
    n_eval = sum(1 for rule, _ in planned_jobs(proc.stdout) if rule.startswith("eval_"))
    assert len(gpu) == n_eval > 0
    if cfg["model"].get("device") in ("cpu", "cuda"):
        wanted = cfg["model"]["device"] == "cuda"
        assert all(("gpu=1" in r) == wanted for r in gpu), gpu[:2]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"policies.bad": {"type": "streaming"}}, "policies.bad.type: 'streaming' is not one of"),
        ({"policies.ours_best.n_sink": -1}, "policies.ours_best.n_sink: -1 is less than the minimum of 0"),
        ({"policies.ours_best.window_size": DELETE}, "policies.ours_best.window_size: missing (required field)"),
        ({"datasets.kjv.tokens_per_sample": DELETE}, "datasets.kjv.tokens_per_sample: missing (required field)"),
        ({"eval.cpa": 3}, "eval.cpa: unknown field"),
        ({"experiments.table1.policies": ["recompute", "ours_worst"]},
         "experiments.table1.policies[1]: unknown policy 'ours_worst'"),
        ({"experiments.table2.dataset": "pg19"}, "experiments.table2.dataset: unknown dataset 'pg19'"),
        ({"experiments.table2.reference": "dense"}, "experiments.table2.reference: 'dense' is not one of"),
        ({"policies.tight": {"type": "sink", "n_sink": 200, "compress_every": 64, "cache_slack": 0,
                             "max_drop": None, "budget_mode": "cap"}},
         "policies.tight: budget_mode cap leaves no window"),
    ],
    ids=["unknown-type", "negative-size", "missing-policy-field", "missing-dataset-field", "unknown-key",
         "unknown-policy", "unknown-dataset", "reference-not-run", "cap-without-window"],
)
def test_bad_config_stops_before_any_job_with_one_message(workdir, changes, message):
    proc = dry_run(workdir, edited(DEFAULT, **changes))
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, proc.stdout[-3000:]
    assert message in errors[0], errors[0]
    assert "Job stats" not in proc.stdout


def test_budget_mode_cap_derives_the_window_from_cap(workdir):
    cfg = edited(
        DEFAULT,
        **{"policies.capped": {"type": "sink", "n_sink": 4, "compress_every": 16, "cache_slack": 8,
                               "max_drop": 8, "budget_mode": "cap"},
           "experiments.capped": {"dataset": "kjv", "policies": ["recompute", "capped"]}},
    )
    proc = dry_run(workdir, cfg, "--printshellcmds")
    assert proc.returncode == 0, proc.stdout[-3000:]
    cmds = [line for line in proc.stdout.splitlines() if "--label policy=capped " in line]
    assert cmds and all("--budget-mode cap" in c and f"--cap {DEFAULT['eval']['cap']}" in c for c in cmds)
    assert not any("--window-size" in c for c in cmds)


def _pins(lines):
    return dict(re.match(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$", line).groups()
                for line in lines if "==" in line)


def test_conda_envs_keep_the_pins_of_requirements_lock():
    lock = _pins((REPO / "requirements.lock").read_text().splitlines())
    for env in sorted((REPO / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        pip = [d for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
        pins = _pins(pip[0]["pip"]) if pip else {}
        for name, version in pins.items():
            assert lock.get(name) == version, f"{env.name}: {name}=={version}, requirements.lock has {lock.get(name)}"

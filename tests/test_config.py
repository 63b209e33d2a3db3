"""The pipeline's config and kvstream.pipeline: every shipped config is valid; a bad one stops Snakemake
before any job with one message naming the field; what the DAG derives from a config (policies through
Policy, identical schedules, the experiments' roles); the conda environments keep the pins of requirements.lock."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import yaml

from kvstream.config import ConfigError, check_config
from kvstream.pipeline import DEFAULT_RESOURCES, Plan, job_environment
from kvstream.schedule import Policy
from pipeline_helpers import DELETE, REPO, edited, load_config, planned_jobs, snakemake, write_config

DEFAULT = load_config(REPO / "config.yaml")
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
SHIPPED = ["config.yaml", "config/tiny.yaml", "config/paper.yaml"]
# a sweep over R without its knob (the default run has no sweeps: they are in config/extended.yaml)
R_SWEEP = {"role": "sweep", "dataset": "kjv", "reference": "recompute", "policies": ["recompute", "ours_softlite", "ours_best"]}


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
    assert cmds
    for cmd in cmds:  # the policy reaches `kvstream eval` as one JSON object, W derived by Policy
        args = shlex.split(cmd.split(" > ")[0])
        fields = json.loads(args[args.index("--policy-json") + 1])
        cap = DEFAULT["eval"]["cap"]
        assert fields["budget_mode"] == "cap" and fields["cap"] == cap
        assert fields["window_size"] == cap - 4 - max(16, 8 + 1)
        assert Policy.from_dict(fields).max_forward_len == cap


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


# ------------------------------------------------------------------------- kvstream.pipeline, no Snakemake
def checked(cfg: dict) -> dict:
    return check_config(cfg, SCHEMA)


def plan(cfg: dict = DEFAULT, **changes) -> Plan:
    return Plan(checked(edited(cfg, **changes)), use_cuda=False)


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_pass_and_get_the_schema_defaults(path):
    cfg = checked(load_config(REPO / path))
    for e in cfg["experiments"].values():
        assert e["reference"] == "recompute" and e["role"] in ("main", "ablation", "sweep", "peak_matched", "sanity", "zoo", "factorial", "defects", "longstream")
        assert (e["role"] == "sweep") == ("knob" in e)
    assert cfg["speed"]["rounds"] >= 2 and cfg["eval"]["positions"] == "relative"
    assert cfg["paper"]["baseline"] == "mit_streaming"
    # every shipped config names its main experiment; sweeps vary the knob they name
    p = Plan(cfg, use_cuda=False)
    assert p.main_experiment == "table1" and p.experiment_role("table2") == "ablation"
    for sweep in p.sweeps:
        knob = p.experiment_knob(sweep)
        assert len({getattr(p.policy(q), knob) for q in p.experiment_policies(sweep) if q != "recompute"}) > 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scale": "huge"}, "config error: scale: 'huge' is not one of the config's scales"),
        ({"experiments.r_sweep": R_SWEEP}, "config error: experiments.r_sweep.knob: missing"),
        ({"experiments.r_sweep": dict(R_SWEEP, knob="delta")}, "config error: experiments.r_sweep.knob: 'delta' is not one of"),
        ({"experiments.table2.role": "main"}, "config error: experiments.table2.role: experiments.table1 is already the main"),
        ({"experiments.table2.role": "appendix"}, "config error: experiments.table2.role: 'appendix' is not one of"),
        ({"paper.baseline": "streaming_llm"}, "config error: paper.baseline: unknown policy 'streaming_llm'"),
        ({"paper.presets": ["ours_best", "ours_eager"]}, "config error: paper.presets[1]: unknown policy 'ours_eager'"),
        ({"paper.labels.h2o": "H2O"}, "config error: paper.labels.h2o: unknown policy 'h2o'"),
        ({"paper.stems.ours_best": "Best2"}, "config error: paper.stems.ours_best: 'Best2' does not match"),
        ({"paper.title": "x"}, "config error: paper.title: unknown field"),
        ({"policies.dense.budget_mode": "cap"}, "config error: policies.dense.budget_mode: only the kinds that evict"),
        ({"policies.capped": {"type": "sink", "n_sink": 4, "window_size": 10, "compress_every": 1, "cache_slack": 0,
                              "max_drop": None, "budget_mode": "cap"}},
         "config error: policies.capped.window_size: budget_mode cap derives the window from eval.cap"),
        ({"policies.tight": {"type": "sink", "n_sink": 200, "compress_every": 64, "cache_slack": 0, "max_drop": None,
                             "budget_mode": "cap"}},
         "config error: policies.tight: budget_mode cap leaves no window with eval.cap: cap=256 is too small"),
        ({"policies.recompute.n_sink": 4},
         "config error: policies.recompute.n_sink: a recompute policy does not use n_sink (it holds 0): leave it out"),
        ({"policies.win": {"type": "window", "window_size": 100, "n_sink": 4}},
         "config error: policies.win.n_sink: a window policy does not use n_sink (it holds 0): leave it out"),
        ({"policies.mit_streaming.recent": 8},
         "config error: policies.mit_streaming.recent: a sink policy does not use recent (it holds 0): leave it out"),
    ],
    ids=["unknown-scale", "sweep-without-knob", "unknown-knob", "two-mains", "unknown-role", "unknown-baseline",
         "unknown-preset", "unknown-label", "bad-stem", "unknown-paper-field", "dense-with-budget", "cap-with-window",
         "cap-too-small", "recompute-with-knob", "window-with-sink", "sink-with-recent"],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as exc:
        checked(edited(DEFAULT, **changes))
    assert str(exc.value).startswith(message), str(exc.value)


def test_policies_go_through_policy():
    p = plan(**{"policies.capped": {"type": "sink", "n_sink": 4, "compress_every": 16, "cache_slack": 8,
                                    "max_drop": 8, "budget_mode": "cap"}, "eval.positions": "absolute"})
    cap = DEFAULT["eval"]["cap"]
    for name in p.config["policies"]:
        fields = p.policy_fields(name)
        scored = {"recent", "seed"} if p.policy(name).scored else set()
        assert set(fields) == {"type", "n_sink", "window_size", "compress_every", "cache_slack", "max_drop",
                               "budget_mode", "cap", "positions"} | scored
        assert Policy.from_dict(fields) == p.policy(name)
        assert json.loads(shlex.split(p.policy_json(name))[0]) == fields
    assert p.policy("capped").max_forward_len == cap and p.policy("capped").budget == cap - 16
    assert p.policy("recompute").cap == cap and p.policy("dense").cap == cap
    assert p.policy("ours_best").cap is None  # a fixed budget: eval.cap does not decide its cells
    assert p.policy("ours_best").positions == "absolute" and p.policy("window").positions == "absolute"
    assert p.policy("recompute").positions == "relative"  # nor does eval.positions decide recompute's
    assert p.recompute_every("recompute") == DEFAULT["eval"]["recompute_every"] > 1
    assert p.recompute_every("ours_best") == 1


def test_identical_schedules_reuse_the_first_policys_cells():
    sink = {"type": "sink", "n_sink": 4, "window_size": 252, "compress_every": 1, "cache_slack": 0}
    p = plan(**{
        "policies.eager_capped": dict(sink, max_drop=1),  # eager: one token per event, whatever delta >= 1
        "policies.absolute": dict(sink, max_drop=None, positions="absolute"),
        "experiments.extra": {"dataset": "kjv", "policies": ["recompute", "eager_capped", "absolute"]},
    })
    assert p.reused_from("kjv", "mit_streaming") is None
    assert p.reused_from("kjv", "eager_capped") == "mit_streaming"
    assert p.reused_from("kjv", "absolute") is None  # other positions: other keys
    # the default config's shared points: delta >= overflow never caps an event at R = 32, sigma = 16
    assert p.reused_from("kjv", "abl_s16_dnull") == "ours_softlite"
    speed = p.speed_policies("kjv")
    assert "mit_streaming" in speed and "eager_capped" not in speed  # timed once ...
    first_reused = next(q for q in p.dataset_policies("kjv") if p.reused_from("kjv", q))
    assert first_reused in speed  # ... but the first reuse is timed as a noise probe
    assert "eager_capped" not in Plan(checked(edited(p.config, **{"speed.noise_probe": False})), use_cuda=False).speed_policies("kjv")


def test_roles_not_names_decide_the_papers_experiments():
    renamed = {"main_table": dict(DEFAULT["experiments"]["table1"]), "abl": dict(DEFAULT["experiments"]["table2"]),
               "r_sweep": dict(R_SWEEP, knob="compress_every"),
               "other": {"dataset": "kjv", "policies": ["recompute", "window"]}}
    p = plan(**{"experiments": renamed})
    assert p.main_experiment == "main_table" and p.reproduction_experiments == ["main_table", "abl"]
    assert p.sweeps == ["r_sweep"] and p.experiment_knob("r_sweep") == "compress_every"
    assert p.experiment_role("other") == "other" and p.experiment_knob("other") is None
    assert p.nll_policies() == ["recompute", "window", "mit_streaming"]  # paper.baseline
    assert plan(**{"experiments": renamed, "paper.baseline": "ours_softlite"}).nll_policies()[-1] == "ours_softlite"
    assert p.experiment_labels("abl") == {"recompute": "Full recomputation", "ours_softlite": "Lazy (Softlite)"}
    assert p.trace_cells()[0] == "results/cells/smollm2-135m/kjv/mit_streaming/s0.json"
    assert {"paper", "experiments", "title", "eval"} <= set(p.paper_config())
    # without role main the first experiment is the main one; without a baseline, the first sink policy
    no_roles = {k: {f: v for f, v in e.items() if f not in ("role", "knob")} for k, e in renamed.items()}
    p = plan(**{"experiments": dict(list(no_roles.items())[::-1]), "paper.baseline": None})
    assert p.main_experiment == "other" and p.sweeps == [] and p.reproduction_experiments == ["other"]
    assert p.nll_policies() == ["recompute", "window", "ours_softlite"]  # the dataset's first sink policy


def test_paths_and_batches():
    p = plan(**{"eval.batch_size": 3})
    assert p.cell_path("kjv", "window", "s2") == p.cell_path("kjv", "window", 2) == "results/cells/smollm2-135m/kjv/window/s2.json"
    assert p.nll_paths([p.cell_path("kjv", "window", 0)]) == ["results/cells/smollm2-135m/kjv/window/s0.nll.npy"]
    assert p.sample_batches("kjv") == [[0, 1, 2], [3, 4, 5], [6, 7]]  # 8 samples in batches of 3
    cells = p.used_cells()
    assert len(cells) == len(set(cells)) == sum(
        DEFAULT["datasets"][d]["n_samples"] * len(p.dataset_policies(d)) for d in DEFAULT["datasets"])


def test_resources_and_the_gpu_request():
    p = plan(**{"resources": {"eval": {"runtime": 5}}})
    assert p.rule_resources("eval", gpu=True) == {"mem_mb": DEFAULT_RESOURCES["eval"]["mem_mb"], "runtime": 5}
    cuda = Plan(p.config, use_cuda=True)
    assert cuda.rule_resources("eval", gpu=True) == {"mem_mb": 16000, "runtime": 5, "gpu": 1}
    assert "gpu" not in cuda.rule_resources("report") and cuda.rule_resources("bench") == {"mem_mb": 2000, "runtime": 30}


def test_job_environment_puts_the_interpreter_and_src_first(tmp_path):
    env = {"PATH": "/usr/bin"}
    job_environment(tmp_path / "src", python="/venv/bin/python", environ=env)
    assert env == {"PATH": os.pathsep.join(["/venv/bin", "/usr/bin"]), "PYTHONPATH": str(tmp_path / "src")}
    job_environment(tmp_path / "src", python="/venv/bin/python", environ=env)  # idempotent
    assert env["PATH"].count("/venv/bin") == 1 and env["PYTHONPATH"] == str(tmp_path / "src")

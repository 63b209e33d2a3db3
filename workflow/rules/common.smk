# Shared by every rule file: the validated config, the names of things, the paths of outputs.
#
# For the report and paper rules (workflow/rules/report.smk, paper.smk):
#   MODEL                          model name (config model.name), as in output paths
#   EXPERIMENTS                    experiment names, config order
#   POLICIES, DATASETS             names, config order
#   experiment_dataset(name)       dataset name of an experiment
#   experiment_policies(name)      policy names of an experiment, config order
#   experiment_reference(name)     the reference policy (recompute unless set)
#   experiment_cells(name)         cell JSON paths of an experiment: policy-major, then sample
#   policy_params(name)            resolved parameters of a policy (dict, see resolve_policy)
#   cell_path(model, dataset, policy, sample)   results/cells/{model}/{dataset}/{policy}/s{i}.json
#   n_samples(dataset)             samples of a dataset
#   aggregate_path(name, ext)      results/aggregate/{name}.{ext}
#   rule_resources(group)          dict(mem_mb=..., runtime=...) for a rule group (config `resources`)
#   ALL_TARGETS                    list; rule files append what `rule all` must build
#   KVSTREAM                       the command that runs the kvstream CLI in a job

import copy
import functools
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(workflow.basedir).resolve()
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


# ---------------------------------------------------------------------------------------------------
# The kvstream command inside jobs: the interpreter that runs Snakemake (the .venv) is first on PATH,
# the repository's src/ on PYTHONPATH, so `python -m kvstream` works without activating anything. Under
# `--sdm conda` the job's environment is activated after this, so its python comes first.
# ---------------------------------------------------------------------------------------------------
_bindir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bindir:
    os.environ["PATH"] = _bindir + os.pathsep + os.environ.get("PATH", "")
_src = str(REPO / "src")
if _src not in sys.path:  # the DAG itself asks the torch-free kvstream.schedule (identical schedules)
    sys.path.insert(0, _src)
if _src not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_src, os.environ.get("PYTHONPATH", "")] if p)
KVSTREAM = "python -m kvstream"
# Shell suffix of a job whose output goes to {log}: keep the exit status, show the log's tail on stderr
# (so a message such as "the Hub cannot be reached; point the config at a local copy" reaches the terminal).
ON_FAILURE = '|| {{ s=$?; echo "--- last lines of {log}:" >&2; tail -n 25 {log} >&2; exit $s; }}'


# ---------------------------------------------------------------------------------------------------
# Config: optional `scale` merge, JSON schema, cross-checks. Any problem stops the run before a job
# starts, with one message that names the field.
# ---------------------------------------------------------------------------------------------------
class ConfigError(WorkflowError):
    pass


def _merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _field(path):
    return ".".join(str(p) for p in path) or "(top level)"


def check_config(cfg):
    """Validate a config dict; return it with the `scale` merged. Raises ConfigError (one message)."""
    import jsonschema
    import yaml

    cfg = copy.deepcopy(dict(cfg))
    if cfg.get("scale") is not None:
        scales = cfg.get("scales") or {}
        if cfg["scale"] not in scales:
            raise ConfigError(
                f"config error: scale: '{cfg['scale']}' is not one of the config's scales "
                f"({', '.join(scales) or 'none defined'})"
            )
        cfg = _merge(cfg, scales[cfg["scale"]])

    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(cfg))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = list(err.absolute_path)
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [k for k in err.validator_value if k not in err.instance]
            msg = f"config error: {_field(path + missing[:1])}: missing (required field)"
        elif err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set((err.schema.get("properties") or {}).keys())
            extra = [k for k in err.instance if k not in allowed]
            msg = (
                f"config error: {_field(path + extra[:1])}: unknown field"
                + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else "")
            )
        elif err.validator == "not" and len(path) == 2 and path[0] == "policies":
            msg = (
                f"config error: {_field(path)}: a policy of type {err.instance.get('type')} takes no "
                "n_sink/window_size/compress_every/cache_slack/max_drop"
            )
        else:
            msg = f"config error: {_field(path)}: {err.message}"
        if len(errors) > 1:
            msg += f"  ({len(errors) - 1} more problem(s) after this one is fixed)"
        raise ConfigError(msg)

    cap = cfg["eval"]["cap"]
    for name, p in cfg["policies"].items():
        if p.get("budget_mode") == "cap":
            if p["type"] in ("recompute", "dense"):
                raise ConfigError(f"config error: policies.{name}.budget_mode: only sink and window policies have a budget")
            if "window_size" in p:
                raise ConfigError(
                    f"config error: policies.{name}.window_size: budget_mode cap derives the window from eval.cap; "
                    "remove window_size or use budget_mode fixed"
                )
            w = resolve_policy(name, p, cfg)["window_size"]
            if w < 1:
                raise ConfigError(
                    f"config error: policies.{name}: budget_mode cap leaves no window (eval.cap {cap} - n_sink "
                    f"- max(compress_every, cache_slack + 1) = {w})"
                )
    for name, e in cfg["experiments"].items():
        if e["dataset"] not in cfg["datasets"]:
            raise ConfigError(
                f"config error: experiments.{name}.dataset: unknown dataset '{e['dataset']}' "
                f"(datasets: {', '.join(cfg['datasets'])})"
            )
        for i, p in enumerate(e["policies"]):
            if p not in cfg["policies"]:
                raise ConfigError(
                    f"config error: experiments.{name}.policies[{i}]: unknown policy '{p}' "
                    f"(policies: {', '.join(cfg['policies'])})"
                )
        ref = e.get("reference", "recompute")
        if ref not in e["policies"]:
            raise ConfigError(
                f"config error: experiments.{name}.reference: '{ref}' is not one of the experiment's policies; "
                f"add it to experiments.{name}.policies (PPL increase and speedup are measured against it)"
            )
    return cfg


def resolve_policy(name, p, cfg):
    """The parameters that define a policy's cells: only what changes its results.

    type, positions (sink, window), cap (recompute, dense, budget_mode cap), n_sink, window_size,
    compress_every, cache_slack, max_drop, budget_mode, plus derived budget (C) and max_forward_len.
    """
    ev = cfg["eval"]
    cap = ev["cap"]
    t = p["type"]
    out = {"type": t}
    if t == "recompute":
        out.update(cap=cap, budget=cap, max_forward_len=cap)
    elif t == "dense":
        out.update(cap=cap)  # prefill length min(cap, N); the cache is never evicted
    else:
        mode = p.get("budget_mode", "fixed")
        if t == "window":
            s, r, sigma, delta = 0, 1, 0, None
        else:
            s, r, sigma, delta = p["n_sink"], p["compress_every"], p["cache_slack"], p["max_drop"]
        extra = max(r, sigma + 1)
        w = cap - s - extra if mode == "cap" else p["window_size"]
        out.update(budget_mode=mode)
        if mode == "cap":
            out.update(cap=cap)
        if t == "sink":
            out.update(n_sink=s, compress_every=r, cache_slack=sigma, max_drop=delta)
        out.update(
            window_size=w,
            positions=p.get("positions", ev.get("positions", "relative")),
            budget=s + w,
            max_forward_len=s + w + extra,
        )
    return out


if not config:
    raise ConfigError("config error: no config; run from the repository root (config.yaml) or pass --configfile")
_checked = check_config(config)
config.clear()
config.update(_checked)
validate(config, str(SCHEMA))  # Snakemake's own check; fills the schema's defaults

# ---------------------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------------------
MODEL = config["model"]["name"]
DATASETS = list(config["datasets"])
POLICIES = list(config["policies"])
EXPERIMENTS = list(config["experiments"])
ALL_TARGETS = []


def n_samples(dataset):
    return int(config["datasets"][dataset]["n_samples"])


def experiment_dataset(name):
    return config["experiments"][name]["dataset"]


def experiment_policies(name):
    return list(config["experiments"][name]["policies"])


def experiment_reference(name):
    return config["experiments"][name].get("reference", "recompute")


def policy_params(name):
    return resolve_policy(name, config["policies"][name], config)


def _sample_index(sample):
    s = str(sample)
    return int(s[1:]) if s.startswith("s") else int(s)


def cell_path(model, dataset, policy, sample):
    return f"results/cells/{model}/{dataset}/{policy}/s{_sample_index(sample)}.json"


def experiment_cells(name):
    ds = experiment_dataset(name)
    return [cell_path(MODEL, ds, p, i) for p in experiment_policies(name) for i in range(n_samples(ds))]


def aggregate_path(name, ext="csv"):
    return f"results/aggregate/{name}.{ext}"


def used_cells():
    """Every cell some experiment needs, each once (a policy shared by experiments is one cell)."""
    seen = {}
    for e in EXPERIMENTS:
        for c in experiment_cells(e):
            seen.setdefault(c, None)
    return list(seen)


def dataset_policies(dataset):
    """Policies some experiment runs on a dataset, config order."""
    seen = {}
    for e in EXPERIMENTS:
        if experiment_dataset(e) == dataset:
            for p in experiment_policies(e):
                seen.setdefault(p, None)
    return list(seen)


@functools.lru_cache(maxsize=None)
def _schedule_key(dataset, policy):
    """What decides a policy's cells on a dataset: kind, S, budget, positions and the cache-length trace."""
    from kvstream.schedule import Policy, cache_lengths

    p = policy_params(policy)
    pol = Policy.from_dict(p)
    n = int(config["datasets"][dataset]["tokens_per_sample"])
    return (p["type"], p.get("n_sink"), p.get("budget"), p.get("cap"), p.get("positions"), tuple(cache_lengths(pol, n)))


@functools.lru_cache(maxsize=None)
def reused_from(dataset, policy):
    """The earlier policy (config order) whose cells this one reuses, or None when it is evaluated itself."""
    key = _schedule_key(dataset, policy)
    for other in dataset_policies(dataset):
        if other == policy:
            return None
        if _schedule_key(dataset, other) == key:
            return other
    return None


def model_dir(model=None):
    return f"results/models/{model or MODEL}"


def tokens_path(dataset, sample, model=None):
    return f"results/tokens/{model or MODEL}/{dataset}/s{_sample_index(sample)}.npy"


# ---------------------------------------------------------------------------------------------------
# Device and resources
# ---------------------------------------------------------------------------------------------------
def _cuda_at_dag_time():
    device = config["model"].get("device", "auto")
    if device != "auto":
        return device == "cuda"
    # torch.cuda.is_available() is False without an NVIDIA driver: skip the slow torch import then.
    if not (shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists()):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


USE_CUDA = _cuda_at_dag_time()

_DEFAULT_RESOURCES = {
    "fetch_text": {"mem_mb": 4000, "runtime": 60},
    "prepare_model": {"mem_mb": 8000, "runtime": 60},
    "tokenize": {"mem_mb": 4000, "runtime": 30},
    "eval": {"mem_mb": 16000 if USE_CUDA else 4000, "runtime": 120},
    "report": {"mem_mb": 2000, "runtime": 15},
    "paper": {"mem_mb": 2000, "runtime": 15},
}


def rule_resources(group):
    """mem_mb and runtime (minutes) of a rule group: config `resources.<group>` over the defaults."""
    res = dict(_DEFAULT_RESOURCES.get(group, {"mem_mb": 2000, "runtime": 30}))
    res.update((config.get("resources") or {}).get(group) or {})
    return res


def all_cores():
    """The run's --cores (a timing job asks for all of them so that it runs alone); 1 when the run has
    none (--report, a dry run without --cores)."""
    try:
        return int(workflow.cores)
    except Exception:  # Snakemake raises when --cores was not given
        return 1


def log_path(*parts):
    return "results/logs/" + "/".join(parts) + ".log"

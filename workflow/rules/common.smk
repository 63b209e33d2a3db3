# Shared by all rule files. The checked config and what the DAG derives from it; the code behind it is
# the torch-free src/kvstream/config.py (the check) and pipeline.py (the Plan), tested in tests/test_config.py;
# this file only wires them in.
#
#   PLAN                      kvstream.pipeline.Plan of the checked config: names, cells, identical
#                             schedules, paths, resources, the experiments' roles (PLAN.cell_path, ...)
#   MODEL                     model name (config model.name), as in output paths
#   DATASETS, EXPERIMENTS     names, config order
#   ALL_TARGETS               list: every cell; rule files append what the default target must build
#   alternation(names)        a wildcard constraint matching exactly these names
#   shell_args(*pairs)        (flag, value) pairs as shell-quoted job arguments (params of the rules)
#   all_cores()               the run's --cores (a timing job asks for all of them, to run alone)
#   logged(command, tail)     a job's shell command with its output in {log}, see below
#   paper_owner_checked       input of the stamp of paper/ (report.smk): stops a run replacing another model's paper
#   paper_owner_json()        the stamp's content

import json
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

REPO = Path(workflow.basedir).resolve()

# The DAG itself asks kvstream (the torch-free kvstream.pipeline and kvstream.schedule): this checkout's
# src/ comes first, also when Snakemake runs from an environment without kvstream installed.
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from kvstream.errors import KVStreamError
from kvstream.paper_owner import check_paper_owner, owner_record
from kvstream.config import ConfigError, check_config
from kvstream.pipeline import Plan, job_environment

# Jobs run `python -m kvstream`: the interpreter running Snakemake first on PATH, src/ on PYTHONPATH
# (under --sdm conda the job's environment is activated after this, so its python comes first).
job_environment(REPO / "src")

# The config: optional `scale` merge, the JSON schema (its defaults filled in), cross-checks through
# kvstream.schedule.Policy. Any problem stops the run before a job starts, with one message naming the field.
if not config:
    raise WorkflowError("config error: no config; run from the repository root (config.yaml) or pass --configfile")
try:
    _checked = check_config(config, yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text()))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(_checked)

PLAN = Plan(config)
MODEL = PLAN.model
DATASETS = PLAN.datasets
EXPERIMENTS = PLAN.pooled_experiments  # the long stream's cells come from PLAN.used_cells; its report: longstream.smk
ALL_TARGETS = PLAN.used_cells()


def alternation(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


def shell_args(*pairs):
    """(flag, value) pairs as one string of shell-quoted job arguments; pairs without a value (None, "") left out."""
    return " ".join(f"{flag} {shlex.quote(str(v))}" for flag, v in pairs if v is not None and v != "")


def all_cores():
    """The run's --cores; 1 when the run has none (--report, a dry run without --cores)."""
    try:
        return int(workflow.cores)
    except Exception:  # Snakemake raises when --cores was not given
        return 1


def logged(command, tail=25):
    """`command` with its stdout and stderr in the job's {log}. When it fails, the log's last lines go to
    stderr too (so a message such as "the Hub cannot be reached; point the config at a local copy"
    reaches the terminal) and the exit status is kept. ({{ }} is a literal brace for Snakemake.)"""
    log = "{log}"
    return f'{command} > {log} 2>&1 || {{{{ s=$?; echo "--- last lines of {log}:" >&2; tail -n {tail} {log} >&2; exit $s; }}}}'


def paper_owner_checked(wildcards):
    """No input, once paper/ is found to hold this model's outputs (or none, or overwrite_paper is set);
    evaluated only when a job that writes under paper/ is part of the run."""
    try:
        check_paper_owner(MODEL, overwrite=config["overwrite_paper"] in (True, "true"))
    except KVStreamError as exc:
        raise WorkflowError(str(exc)) from None
    return []


def paper_owner_json():
    """The stamp's content (kvstream.paper_owner.owner_record), shell-quoted: a param of its rule."""
    return shlex.quote(json.dumps(owner_record(MODEL)))

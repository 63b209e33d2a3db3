"""Helpers of the pipeline tests (test_config.py, test_pipeline.py): run Snakemake on a copy of the repo."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# What a run needs; outputs, caches and the venv stay behind.
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", ".snakemake", "results", "__pycache__", "*.egg-info", ".pytest_cache", "generated",
    "*.pdf", "*.aux", "*.log", "*.bbl", "*.blg", "*.fls", "*.fdb_latexmk", "*.out",
)
COPIED = ["Snakefile", "config.yaml", "config", "workflow", "envs", "paper", "src", "tests/fixtures", "benchmarks"]


def copy_repo(dest: Path) -> Path:
    """A copy of the repository's pipeline files in dest (a fresh place to run Snakemake)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORE)
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's Snakemake in workdir; returns the completed process (stdout and stderr merged)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def planned_jobs(output: str) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a `snakemake --dry-run` listed, `all` left out."""
    jobs = []
    rule = None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^output: (.*)$", line.strip())
        if m and rule is not None:
            jobs.append((rule, [o.strip() for o in m.group(1).split(",")]))
            rule = None
    # jobs without outputs (rule all) never reach the list
    return jobs


def load_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def edited(cfg: dict, **changes) -> dict:
    """A deep copy of cfg with dotted-path changes: edited(cfg, **{"eval.cap": 3})."""
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = out
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return out


_DELETE = object()
DELETE = _DELETE


def fake_complete(workdir: Path, configfile: str) -> None:
    """Every output of the config's DAG, empty (the paper's stamp written as its rule writes it), then their
    metadata recorded with --touch: a checkout where the whole run is done."""
    proc = snakemake(workdir, "--configfile", configfile, "--dry-run", "--cores", "1")
    model = load_config(workdir / configfile)["model"]["name"]
    for _, outputs in planned_jobs(proc.stdout):
        for out in outputs:
            path = workdir / out
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"model": model}) if out == "paper/generated/owner.json" else "")
            else:  # a directory output (the prepared model)
                path.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--configfile", configfile, "--touch", "--forceall", "--cores", "1")

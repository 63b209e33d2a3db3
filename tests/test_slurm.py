"""Cluster execution: profiles/slurm and profiles/local (docs/cluster.md).

Always run (a few seconds each, no SLURM needed): dry runs of the small workflow
scripts/slurm/smoke.smk, which has the pipeline's rule names, through both profiles, checking what
each job would ask SLURM for and that the KVSTREAM_SLURM_* variables switch it.

Opt-in (root, Debian; installs slurmctld/slurmd/munge, starts them, stops them). Times measured on
a 2-core VM that 4 other engineers were loading at the same time (load average 3-5):
    KVSTREAM_SLURM_TEST=1      scripts/slurm-selftest.sh: the whole tiny pipeline (34 SLURM jobs, paper
                               PDFs included) through a real single-node SLURM vs. its eval cells run
                               locally: 10.5 min (local reference 3 min, SLURM run 7.5 min)
    KVSTREAM_SLURM_TEST=eval   the same up to the eval cells only (KVSTREAM_SLURM_UNTIL=eval): 8 min
                               (17 SLURM jobs with 14 cells)
    KVSTREAM_SLURM_TEST=smoke  scripts/slurm-selftest.sh --smoke: scripts/slurm/smoke.smk only, each eval
                               job holding one of the node's fake GPUs: 1.5 min
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "scripts" / "slurm" / "smoke.smk"
SELFTEST = REPO / "scripts" / "slurm-selftest.sh"


def _snakemake() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def dry_run(tmp_path: Path, profile: str, env: dict[str, str] | None = None, *extra: str) -> dict[str, list[dict]]:
    """Dry-run smoke.smk with a profile; return {rule: [resources dict of each job]}."""
    workdir = tmp_path / "wd"
    workdir.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTREAM_SLURM_")}
    full_env.update(env or {})
    cmd = _snakemake() + [
        "--snakefile", str(SMOKE), "--directory", str(workdir),
        "--profile", str(REPO / "profiles" / profile), "--dry-run", *extra,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs: dict[str, list[dict]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule:
            res = dict(kv.split("=", 1) for kv in m.group(1).split(", ") if "=" in kv)
            jobs.setdefault(rule, []).append(res)
            rule = None
    return jobs


def test_slurm_profile_defaults(tmp_path):
    jobs = dry_run(tmp_path, "slurm")
    assert len(jobs["eval"]) == 4
    for res in jobs["eval"]:
        assert res["gpu"] == "1", res  # eval cells ask for one GPU
        assert "gpu_model" not in res
        assert res["slurm_partition"] == ""  # unset: the cluster's default partition
        assert res["slurm_account"] == ""
    for rule in ("prepare_model", "aggregate"):
        for res in jobs[rule]:
            assert "gpu" not in res, (rule, res)  # CPU-only rules ask no GPU
            assert res["mem_mb"] == "2000" and res["runtime"] == "30", (rule, res)  # profile defaults


def test_slurm_profile_environment(tmp_path):
    env = {
        "KVSTREAM_SLURM_PARTITION": "all",  # a Python builtin's name must stay a string
        "KVSTREAM_SLURM_GPU_PARTITION": "gpu-a100",
        "KVSTREAM_SLURM_ACCOUNT": "123456",  # a numeric account must stay a string too
        "KVSTREAM_SLURM_GPU_MODEL": "a100",
    }
    jobs = dry_run(tmp_path, "slurm", env)
    for res in jobs["eval"]:
        assert res["gpu"] == "1" and res["gpu_model"] == "a100", res
        assert res["slurm_partition"] == "gpu-a100", res
        assert res["slurm_account"] == "123456", res
    for res in jobs["prepare_model"]:
        assert res["slurm_partition"] == "all" and "gpu" not in res, res


def test_slurm_profile_cpu_only(tmp_path):
    jobs = dry_run(tmp_path, "slurm", {"KVSTREAM_SLURM_GPUS": "0", "KVSTREAM_SLURM_GPU_MODEL": "a100"})
    for res in jobs["eval"]:
        assert res["gpu"] == "0" and "gpu_model" not in res, res


def test_slurm_submit_command(tmp_path):
    """What the plugin (2.8.0) turns the eval resources into: sbatch --gpus=... and nothing for CPU rules."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Res(dict):
        __getattr__ = dict.__getitem__

    def job(**res):
        return SimpleNamespace(resources=Res(res))

    assert set_gres_string(job(gpu=1)).strip() == "--gpus=1"
    assert set_gres_string(job(gpu=1, gpu_model="a100")).strip() == "--gpus=a100:1"
    assert set_gres_string(job(gpu=0)).strip() == ""
    assert set_gres_string(job(mem_mb=1000)).strip() == ""


def test_local_profile(tmp_path):
    jobs = dry_run(tmp_path, "local", None, "--cores", "2")
    assert len(jobs["eval"]) == 4 and len(jobs["prepare_model"]) == 1


def _selftest_mode() -> str | None:
    value = os.environ.get("KVSTREAM_SLURM_TEST", "").strip().lower()
    if value in ("", "0", "no", "false"):
        return None
    return value if value in ("smoke", "eval") else "full"


@pytest.mark.slow
@pytest.mark.skipif(_selftest_mode() is None, reason="set KVSTREAM_SLURM_TEST=1 (or =eval, =smoke) to bring up a real SLURM")
def test_slurm_selftest():
    if os.geteuid() != 0:
        pytest.skip("the SLURM selftest needs root (apt-get, munged/slurmctld/slurmd)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("needs a Debian-like system (apt-get) or SLURM installed")
    mode = _selftest_mode()
    args = ["bash", str(SELFTEST)] + (["--smoke"] if mode == "smoke" else [])
    env = dict(os.environ)
    if mode == "eval":
        env["KVSTREAM_SLURM_UNTIL"] = "eval"
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    print(out[-6000:])
    assert proc.returncode == 0, out[-6000:]
    assert "PASSED" in out
    assert re.search(r"OK: \d+ eval cells", out)

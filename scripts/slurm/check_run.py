"""Checks and report for scripts/slurm-selftest.sh (standard library only).

Reads `scontrol show job -o` (all jobs slurmctld still holds; MinJobAge=3600 keeps finished ones)
and the two work directories, prints one line per SLURM job of the Snakemake run, and exits
non-zero with a message when
  - a job of the run did not end COMPLETED,
  - an eval cell was not produced by its own SLURM job,
  - (pipeline mode) the local and SLURM runs do not have the same cells, or a cell's NLL array
    (results/cells/**/s*.nll.npy) differs by a single byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path


def parse_scontrol(path: Path) -> list[dict[str, str]]:
    jobs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("JobId="):
            continue
        # key=value pairs separated by spaces; values may contain spaces only in a few
        # fields we do not need (Command, WorkDir are the last ones we use and have none here)
        fields = {}
        for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", line):
            fields.setdefault(m.group(1), m.group(2))
        jobs.append(fields)
    return jobs


def elapsed_s(runtime: str) -> int:
    """[D-]HH:MM:SS -> seconds."""
    days = 0
    if "-" in runtime:
        d, runtime = runtime.split("-", 1)
        days = int(d)
    parts = [int(p) for p in runtime.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def rule_of(comment: str) -> tuple[str, str]:
    m = re.match(r"rule_(\w+?)(?:_wildcards_(.*))?$", comment or "")
    if not m:
        return comment or "?", ""
    return m.group(1), m.group(2) or ""


def gres_of(job: dict[str, str]) -> str:
    """GPUs of a job as scontrol shows them: TresPerJob=gres:gpu:1 (sbatch --gpus=1)."""
    return job.get("TresPerJob") or job.get("TresPerNode") or job.get("Gres") or ""


def gpu_count(job: dict[str, str]) -> int:
    m = re.search(r"gpu(?::[\w.]+)?:(\d+)", gres_of(job))
    return int(m.group(1)) if m else 0


def fail(msg: str) -> None:
    print(f"slurm-selftest: CHECK FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["smoke", "full"], required=True)
    ap.add_argument("--jobs", type=Path, required=True)
    ap.add_argument("--local", type=Path, required=True)
    ap.add_argument("--slurm", type=Path, required=True)
    ap.add_argument("--local-wall", type=int, default=0)
    ap.add_argument("--slurm-wall", type=int, default=0)
    ap.add_argument("--expect-gpus", type=int, default=0, help="GPUs each eval job should hold")
    args = ap.parse_args()

    slurm_wd = os.path.realpath(args.slurm)
    jobs = [j for j in parse_scontrol(args.jobs) if os.path.realpath(j.get("WorkDir", "")) == slurm_wd]
    if not jobs:
        fail(f"slurmctld knows no job with WorkDir={slurm_wd}: nothing ran through SLURM")
    jobs.sort(key=lambda j: int(j["JobId"]))

    print(f"{'jobid':>6}  {'rule':<20} {'state':<10} {'wall_s':>6}  {'node':<8} {'gres':<10} wildcards")
    bad = []
    by_rule: dict[str, list[dict[str, str]]] = {}
    for j in jobs:
        rule, wc = rule_of(j.get("Comment", ""))
        rule = re.sub(r"^(eval|reuse)_\w+$", r"\1", rule)  # one rule per dataset batch: count them together
        by_rule.setdefault(rule, []).append(j)
        wall = elapsed_s(j.get("RunTime", "0:0:0"))
        gres = gres_of(j) or "-"
        print(f"{j['JobId']:>6}  {rule:<20} {j.get('JobState', '?'):<10} {wall:>6}  {j.get('NodeList', ''):<8} {gres:<10} {wc}")
        if j.get("JobState") != "COMPLETED":
            bad.append(f"{j['JobId']} ({rule}) {j.get('JobState')}")
    total_job_s = sum(elapsed_s(j.get("RunTime", "0:0:0")) for j in jobs)
    print(
        f"{len(jobs)} SLURM jobs ("
        + ", ".join(f"{r}: {len(v)}" for r, v in by_rule.items())
        + f"), sum of job wall times {total_job_s} s; "
        f"SLURM run {args.slurm_wall} s wall, local run {args.local_wall} s wall"
    )
    if bad:
        fail("jobs not COMPLETED: " + ", ".join(bad))
    eval_jobs = by_rule.get("eval", [])
    if not eval_jobs:
        fail("no eval job ran through SLURM")
    for rule, rjobs in by_rule.items():
        want = args.expect_gpus if rule == "eval" else 0
        for j in rjobs:
            if gpu_count(j) != want:
                fail(f"job {j['JobId']} ({rule}) was allocated {gpu_count(j)} GPUs, expected {want}: {gres_of(j)}")

    if args.mode == "smoke":
        cells = sorted((args.slurm / "smoke" / "cells").rglob("*.txt"))
        ids = {j["JobId"] for j in eval_jobs}
        seen = set()
        for c in cells:
            text = c.read_text()
            m = re.search(r"job=(\S+)", text)
            jid = m.group(1) if m else None
            if jid not in ids:
                fail(f"{c} was written under job {jid}, not by an eval SLURM job")
            seen.add(jid)
            m = re.search(r"gpus=(\d+)", text)
            if args.expect_gpus and (not m or int(m.group(1)) != args.expect_gpus):
                fail(f"{c}: the job step saw {m.group(1) if m else '?'} GPUs, expected {args.expect_gpus}")
        if len(seen) != len(cells) or len(cells) != len(eval_jobs):
            fail(f"{len(cells)} cells, {len(eval_jobs)} eval jobs, {len(seen)} distinct job ids")
        local_cells = sorted((args.local / "smoke" / "cells").rglob("*.txt"))
        if [c.relative_to(args.local) for c in local_cells] != [c.relative_to(args.slurm) for c in cells]:
            fail("local and SLURM runs produced different cells")
        print(f"OK: {len(cells)} eval cells, each written inside its own SLURM job holding {args.expect_gpus} GPU(s)")
        return

    def nll_files(root: Path) -> dict[str, Path]:
        base = root / "results" / "cells"
        return {str(p.relative_to(base)): p for p in sorted(base.rglob("*.nll.npy"))}

    local, slurm = nll_files(args.local), nll_files(args.slurm)
    if not local:
        fail(f"the local run produced no results/cells/**/*.nll.npy in {args.local}")
    if set(local) != set(slurm):
        fail(
            "different cells: only local "
            + str(sorted(set(local) - set(slurm))[:5])
            + ", only SLURM "
            + str(sorted(set(slurm) - set(local))[:5])
        )
    # One eval job writes the cells of one policy for a batch of samples (eval_<dataset>_b<k>); cells of a
    # policy with an identical schedule are copies (reused_from). Every evaluated policy must have run
    # as SLURM eval jobs.
    evaluated = set()
    for key, path in slurm.items():
        cell = json.loads(path.with_name(path.name[: -len(".nll.npy")] + ".json").read_text())
        if not cell.get("reused_from"):
            evaluated.add(key.split("/")[2])
    model = next(iter(slurm)).split("/")[0]  # eval wildcards: <model>_<policy>
    ran = {rule_of(j.get("Comment", ""))[1][len(model) + 1 :] for j in eval_jobs}
    if evaluated != ran:
        fail(f"policies evaluated {sorted(evaluated)} but SLURM eval jobs ran {sorted(ran)}")
    differ = []
    for key in sorted(local):
        a, b = local[key].read_bytes(), slurm[key].read_bytes()
        if a != b:
            differ.append(key)
    if differ:
        fail(f"{len(differ)} of {len(local)} NLL arrays differ between local and SLURM runs: {differ[:5]}")
    digest = hashlib.sha256(b"".join(local[k].read_bytes() for k in sorted(local))).hexdigest()[:16]
    print(
        f"OK: {len(local)} eval cells ({len(evaluated)} policies evaluated) ran as {len(eval_jobs)} SLURM jobs; all NLL arrays are "
        f"bit-identical to the local run (sha256 of all: {digest})"
    )


if __name__ == "__main__":
    main()

"""Where a number came from: code version, machine, library versions, and a hash of what a cell computed."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from kvstream.codeversion import CELL_ENTRY, code_version
from kvstream.io import sha256_file
from kvstream.schedule import Policy


def git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_provenance(*, entry: str, hashed: dict, model, device: torch.device, dtype: torch.dtype) -> dict:
    """What every job's record says about where it ran: commit, code version of `entry`'s modules, library
    versions, machine; config_hash over `hashed`, everything that decides the job's numbers."""
    import transformers

    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "code_version": code_version(entry),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "config_hash": hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16],
        "model": str(model),
        "hostname": socket.gethostname(),
        "started_at": now(),
    }


def cell_provenance(*, model: str, tokens_file: str | os.PathLike, policy: Policy, device: torch.device,
                    dtype: torch.dtype, n_tokens: int, max_tokens: int | None, warmup: int, seed: int,
                    recompute_every: int = 1) -> dict:
    """The provenance block of a cell."""
    hashed = {
        "model": str(model), "tokens_sha256": sha256_file(tokens_file), "policy": policy.as_dict(),
        "dtype": str(dtype), "max_tokens": max_tokens, "warmup": warmup, "seed": seed,
    }
    if recompute_every != 1:
        hashed["recompute_every"] = recompute_every
    return {**run_provenance(entry=CELL_ENTRY, hashed=hashed, model=model, device=device, dtype=dtype),
            "seed": seed, "tokens_file": str(tokens_file), "n_tokens": n_tokens}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

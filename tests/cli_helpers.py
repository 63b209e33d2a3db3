"""Helpers for tests that call the `kvstream` command line in-process."""

from __future__ import annotations


def eval_argv(model_dir, tokens_file, out, *policy) -> list[str]:
    """`kvstream eval` on one tokens file, one thread, two warm-up steps; `policy`: its flags."""
    return ["eval", "--model", str(model_dir), "--tokens", str(tokens_file), "--threads", "1", "--warmup", "2",
            "--out", str(out), *policy]

"""Shared by the report scripts: send stdout/stderr of a Snakemake `script:` job to its log."""

import contextlib
import sys


@contextlib.contextmanager
def logged(snakemake):
    path = snakemake.log[0] if snakemake.log else None
    if path is None:
        yield
        return
    with open(path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc(file=fh)
            fh.flush()
            raise


def paths(x):
    """A Snakemake named input as a list (a single file comes as a plain string)."""
    return [x] if isinstance(x, str) else list(x)

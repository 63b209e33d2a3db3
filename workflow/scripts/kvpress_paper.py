"""Snakemake `script:` entry point of rule kvpress_paper: the kvpress comparison's switch, macros and table
from the results committed under benchmarks/kvpress/ (config bench.kvpress_results), or the switch off."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _log import logged, paths  # noqa: E402

with logged(snakemake):  # noqa: F821
    from kvstream.errors import KVStreamError
    from kvstream.io import atomic_path
    from kvstream.study.kvpress import latex_macros, latex_table, load_result, switch_off

    sm = snakemake  # noqa: F821
    results = [load_result(path) for path in paths(sm.input.results)]
    if len(results) > 1:
        raise KVStreamError("bench.kvpress_results: the paper shows one kvpress comparison; name one file")
    text = latex_macros(results[0]) + latex_table(results[0]) if results else switch_off()
    with atomic_path(sm.output[0]) as tmp:
        tmp.write_text(text)
    print(f"wrote {sm.output[0]} from {len(results)} kvpress result(s)")

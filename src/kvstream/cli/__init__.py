"""`kvstream` command line: every command is registered here, from the modules of this package.

A module listed in SUBCOMMANDS (kvstream.cli.<job>) provides `add_parser(subparsers)`, which registers
its subcommand(s) and sets `func` (called with the parsed args; returns an exit code or None). The
library modules hold no argument parsing: a command module turns arguments into library calls.
Modules are imported lazily so `kvstream --help` stays fast and a missing optional dependency only
breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvstream.errors import KVStreamError

SUBCOMMANDS = [
    "kvstream.cli.eval",  # eval
    "kvstream.cli.data",  # fetch-text, prepare-model, tokenize
    "kvstream.cli.bench",  # bench
    "kvstream.cli.speed",  # speed
    "kvstream.cli.study",  # aggregate, tables, figures, macros
    "kvstream.cli.retrieval",  # retrieval
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # module not written yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KVStreamError as exc:
        print(f"kvstream {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

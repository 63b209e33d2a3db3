"""The code version of a computation: a sha256 over the code of the kvstream modules it runs, comments and
docstrings aside. Standard library only (no torch): the Snakemake DAG computes it.

A cell's numbers come from the modules `kvstream eval` imports (followed through the package, function-local
imports included): the schedule, slots, eviction rules, rotation, caches, the decode step, evaluation, model
loading. The workflow hands the version to every eval job as a param, so Snakemake reruns the cells when that
code changes (its own `code` trigger sees only a rule's shell command or script), and the cell records it
(`cell.code_version`). The speed run gets the version of `kvstream speed`'s modules the same way. The aggregate
refuses to pool cells of different versions (kvstream.study.verify).

Each module counts as `ast.dump` of its parsed source with the docstrings removed: comments, docstrings,
blank lines and formatting change nothing; any other edit (a constant, a formula, an error message) does.
The dump depends on the Python version, so another interpreter reruns the cells once.
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

PACKAGE = "kvstream"
CELL_ENTRY = "kvstream.cli.eval"  # what computes a cell
SPEED_ENTRY = "kvstream.cli.speed"  # what computes a speed run
RETRIEVAL_ENTRY = "kvstream.cli.retrieval"  # what computes a retrieval result
# Imported by those commands but never part of a number: error classes, atomic writes and hashing, and the
# provenance record (where a number came from). A change there reruns nothing.
NOT_NUMBERS = frozenset({"kvstream.errors", "kvstream.io", "kvstream.provenance"})
VERSION_CHARS = 16


def package_modules(package_dir: str | os.PathLike) -> dict[str, Path]:
    """Module name -> file of every module of the package (kvstream.cli for cli/__init__.py)."""
    root = Path(package_dir)
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(tree: ast.AST, known) -> set[str]:
    """The modules of `known` that a parsed file imports anywhere (function-local imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from kvstream import cells`
    return {name for name in found if name in known}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_modules(entry: str, package_dir: str | os.PathLike) -> dict[str, str]:
    """Module -> its code without docstrings (`ast.dump`), for `entry` and every module it imports,
    NOT_NUMBERS left out (and not followed)."""
    files = package_modules(package_dir)
    if entry not in files:
        raise ValueError(f"{entry} is not a module of {package_dir}")
    todo, dumps = [entry], {}
    while todo:
        name = todo.pop()
        if name in dumps or name in NOT_NUMBERS:
            continue
        tree = ast.parse(files[name].read_text(encoding="utf-8"), filename=str(files[name]))
        todo += sorted(imported_modules(tree, files))
        dumps[name] = ast.dump(_strip_docstrings(tree))
    return dict(sorted(dumps.items()))


def code_version(entry: str = CELL_ENTRY, package_dir: str | os.PathLike | None = None) -> str:
    """The code version of what `entry` computes: 16 hex digits of a sha256 over its modules' code."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name, dump in code_modules(entry, root).items():
        h.update(f"{name}\n{dump}\n".encode())
    return h.hexdigest()[:VERSION_CHARS]

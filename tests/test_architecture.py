"""The shape of the library (docs/ARCHITECTURE.md): modules by job, small, no import cycles, argument
parsing only in kvstream.cli, and the modules the workflow and the report read are torch-free."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kvstream"
MAX_LINES = 500
# imported by the Snakemake DAG or the report environment (no torch there), so torch-free all the way down
TORCH_FREE = ["kvstream.schedule", "kvstream.slots", "kvstream.cells", "kvstream.io", "kvstream.config", "kvstream.pipeline",
              "kvstream.stats", "kvstream.study"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module this file imports (function-local imports too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from kvstream import report`
    return found


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by job: at most {MAX_LINES})"


def test_no_import_cycles():
    graph = {name: _internal(_imports(path)) - {name} for name, path in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work; every other edge counts
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_argument_parsing_lives_in_cli():
    offenders = [n for n, p in MODULES.items() if "argparse" in _imports(p) and not n.startswith("kvstream.cli")]
    assert not offenders, f"argparse outside kvstream.cli: {offenders}"


@pytest.mark.parametrize("root", TORCH_FREE)
def test_torch_free_modules(root):
    """What these modules import at load time, followed through the package, never reaches torch."""
    todo = [n for n in MODULES if n == root or n.startswith(root + ".")]
    assert todo, f"{root} does not exist"
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        imports = _imports(MODULES[name], top_level_only=True)
        heavy = {i for i in imports if i.split(".")[0] in ("torch", "transformers")}
        assert not heavy, f"{root} imports torch through {name}: {sorted(heavy)}"
        todo += sorted(_internal(imports))

#!/usr/bin/env bash
# The environment of kvpress's side of the comparison: .venv-kvpress/ at the repository root (ignored), with
# kvpress 0.5.5 and the transformers it accepts (< 5.3), beside the main .venv (transformers 5.24).
# torch first, alone, then everything pinned in requirements.txt with --no-deps: no resolver run can swap the
# CPU torch wheel for a multi-GB CUDA build. kvstream itself goes in too (--no-deps), for the benchmark's
# torch-free helpers (tokenizing, timing, writing JSON); its cache is not used under this transformers.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
reqs=benchmarks/kvpress/requirements.txt
stamp=.venv-kvpress/.lock-$(sha256sum "$reqs" pyproject.toml | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0
[ -x .venv-kvpress/bin/python ] || "$PYTHON" -m venv .venv-kvpress
.venv-kvpress/bin/python -m pip install -q "$(grep '^torch==' "$reqs")"
.venv-kvpress/bin/python -m pip install -q --no-deps -r "$reqs"
.venv-kvpress/bin/python -m pip install -q --no-deps -e .
.venv-kvpress/bin/python -c "import kvpress, transformers; assert transformers.__version__ < '5.3'"
rm -f .venv-kvpress/.lock-*
touch "$stamp"

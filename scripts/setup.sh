#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine with Python 3.11:
#   - .venv/ at the repository root with the pinned requirements (requirements.lock) and kvstream itself
#   - TeX Live, latexmk and poppler-utils (pdftotext) from Debian packages, for the paper
# Idempotent: a second run checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.kvstream-lock-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)

if [ ! -f "$stamp" ]; then
    echo "setup: creating .venv with the pinned requirements (requirements.lock)" >&2
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, alone: an unpinned resolver run could pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "$(grep '^torch==' requirements.lock)"
    .venv/bin/python -m pip install -q -r requirements.lock
    .venv/bin/python -m pip install -q --no-deps -e .
    rm -f .venv/.kvstream-lock-*
    touch "$stamp"
fi

need_apt=()
command -v latexmk >/dev/null || need_apt+=(latexmk)
command -v pdflatex >/dev/null || need_apt+=(texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended)
kpsewhich booktabs.sty >/dev/null 2>&1 || need_apt+=(texlive-latex-extra)
command -v pdftotext >/dev/null || need_apt+=(poppler-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing from Debian packages: ${need_apt[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
fi

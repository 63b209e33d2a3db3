# The two commands of the README. Both set up what is missing first (scripts/setup.sh).
CORES ?= 2

.PHONY: setup run paper test

setup:
	bash scripts/setup.sh

# The main job on the embedded default: SmolLM2-135M on the King James Bible, CPU, PDF included.
run: setup
	.venv/bin/snakemake --cores $(CORES)

paper: run

test: setup
	.venv/bin/python -m pytest -q

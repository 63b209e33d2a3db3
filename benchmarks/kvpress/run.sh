#!/usr/bin/env bash
# Both sides of the kvpress comparison, then the committed result benchmarks/kvpress/$NAME.json (+ .md).
# Run it alone on the machine, at normal priority: `uptime` before and after goes into the result.
#   bash benchmarks/kvpress/run.sh [NAME] [extra args for both sides, e.g. --rounds 8]
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:-smollm2-C512}
shift || true
bash benchmarks/kvpress/setup.sh
work=$(mktemp -d)
uptime > "$work/uptime-before"
.venv/bin/python benchmarks/kvpress/compare.py side ours --out "$work/ours.json" "$@"
.venv-kvpress/bin/python benchmarks/kvpress/compare.py side kvpress --out "$work/kvpress.json" "$@"
uptime > "$work/uptime-after"
.venv/bin/python benchmarks/kvpress/compare.py combine "$work/ours.json" "$work/kvpress.json" \
    --uptime-before "$work/uptime-before" --uptime-after "$work/uptime-after" --out "benchmarks/kvpress/$name.json"

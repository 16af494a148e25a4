#!/usr/bin/env bash
# Regenerate the benchmark results that have a quick mode: bash bench/run_all.sh [--scaling-only]
#
# Writes JSON (and PNG) beside each other in bench/results/:
#   scaling.json, scaling_{experts,topk,seq,ep}.png  bench/scaling.py, "How cost grows" (~5-6 min)
#   mfu_quick.json        bench/mfu.py, openmoe-tiny and the quickstart model (~10 s)
#   moe_layer_quick.json  bench/moe_layer.py at 2048 tokens, 5 reps (~1.5 min)
# About 7 minutes in all on the shared 2-core machine (one thread per rank; 411 s on 2026-11-25),
# more while other jobs hold the cores. The other benches
# (fp8_convergence: ~1 h; rebalance, planner_quality, checkpoint, pipeline, ...) run by hand as
# bench/README.md says.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
mkdir -p bench/results
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "scaling.py"
"$PY" bench/scaling.py --out bench/results

if [ "${1:-}" != "--scaling-only" ]; then
    stamp "mfu.py (openmoe-tiny, quickstart)"
    "$PY" bench/mfu.py --only openmoe-tiny quickstart --iters 7 --warmup 2 \
        --json bench/results/mfu_quick.json.tmp
    mv bench/results/mfu_quick.json.tmp bench/results/mfu_quick.json
    stamp "moe_layer.py (2048 tokens, 5 reps)"
    "$PY" bench/moe_layer.py --tokens 2048 --reps 5 --warmup 1 --json bench/results/moe_layer_quick.json.tmp
    mv bench/results/moe_layer_quick.json.tmp bench/results/moe_layer_quick.json
fi
stamp "done"

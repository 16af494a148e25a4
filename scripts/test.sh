#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): set up, lint, run the default test suite.
#   bash scripts/test.sh            default suite (skips tests marked slow)
#   bash scripts/test.sh --all      everything, slow tests included
#   bash scripts/test.sh -k router  extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ruff check .
if [ "${1:-}" = "--all" ]; then shift; set -- -m "slow or not slow" "$@"; fi
python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up (once) and run the whole test suite. Extra arguments go to pytest, e.g.: bash launch/test.sh -k data
# The test files run on TEST_WORKERS processes (default 2, pytest-xdist; each file stays on one, in order, so
# module fixtures and the SLURM cluster are started once); TEST_WORKERS=0 runs everything in this process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
workers=${TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest --durations=25 "$@"
fi
# --no-loadscope-reorder: hand out the files in conftest.py's order (heaviest first), not by number of tests
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder --durations=25 "$@"

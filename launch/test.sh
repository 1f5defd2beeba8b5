#!/usr/bin/env bash
# Set up (once) and run the whole test suite. Extra arguments go to pytest, e.g.: bash launch/test.sh -k data
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
exec .venv/bin/python -m pytest "$@"

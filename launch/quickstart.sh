#!/usr/bin/env bash
# Set up (once) and train the quick-start CNN on the generated shapes dataset, on CPU. Extra arguments are
# key=value overrides, e.g.: bash launch/quickstart.sh train.epochs=3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
exec .venv/bin/trainer train configs/quickstart_multiclass.yaml "$@"

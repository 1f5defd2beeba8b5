#!/usr/bin/env bash
# Creates .venv and installs the project with its tested pins (launch/constraints.txt).
# Idempotent: a second call only checks a stamp. Needs Python >= 3.10 and access to the package registry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: Python >= 3.10 needed ($PY is $($PY -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=$(cat pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing into .venv (torch is large: a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e ".[dev]"
  # torchvision's compiled ops must load with this torch (a mismatched pair fails here, not mid-run)
  .venv/bin/python -c 'import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)'
  echo "$stamp" > .venv/.setup-stamp
fi

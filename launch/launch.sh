#!/usr/bin/env bash
# Train with N local processes through accelerate, with a checked-in accelerate config (never a user's own
# defaults). Prints the command before running it.
#   bash launch/launch.sh configs/quickstart_binary.yaml 2 train.epochs=3
# GPUs when there are any (one process per GPU), else CPU processes (gloo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ $# -lt 2 ]; then echo "usage: launch/launch.sh RECIPE NUM_PROCESSES [key=value ...]" >&2; exit 2; fi
recipe=$1; nproc=$2; shift 2
py=${TRAINER_PY:-.venv/bin/python}
[ -x "$py" ] || py=python3
if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  config=launch/accelerate/gpu_1node.yaml
elif [ "$nproc" -eq 1 ]; then
  config=launch/accelerate/cpu_1proc.yaml
else
  config=launch/accelerate/cpu_multiproc.yaml
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
cmd=("$py" -m accelerate.commands.launch --config_file "$config" --num_processes "$nproc"
     -m trainer train "$recipe" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"

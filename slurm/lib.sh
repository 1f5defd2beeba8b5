# Shared by the sbatch scripts in this folder (sourced, not run). Submit from the project root:
#   sbatch slurm/train.sbatch configs/RECIPE.yaml [key=value ...]
# What it does: picks the run directory (stable across requeues: same job id), exports the head node's
# address and a job-derived port, turns SIGUSR1/SIGTERM into a stop request for the trainer (a file it
# checks at every step boundary), runs the launch, and requeues the job when the trainer stopped to be
# preempted. Environment knobs: TRAINER_PY (python with the project installed, default .venv/bin/python),
# RUN_DIR (default runs/<job name>-<job id>[_<array task>]), TRAINER_SWEEP (a sweep folder: this array
# task trains that sweep's task number SLURM_ARRAY_TASK_ID), TRAINER_TUNE (a tune folder: this job is one
# worker of `trainer tune`, which pulls trials from the study until it has its trials; the sbatch script's
# own launch line is not reached).

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
TRAINER_PY=${TRAINER_PY:-.venv/bin/python}
[ -x "$TRAINER_PY" ] || TRAINER_PY=python3
JOB_KEY=${SLURM_JOB_ID}
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB_KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi

# ---- what to train: the script's arguments, one task of a sweep, or trials of a tune (below) ----
if [ -n "${TRAINER_TUNE:-}" ]; then
  ARGS=(tune-worker)
elif [ -n "${TRAINER_SWEEP:-}" ]; then
  mapfile -t ARGS < <("$TRAINER_PY" -m trainer sweep-args "$TRAINER_SWEEP" "${SLURM_ARRAY_TASK_ID:?sweep tasks run as a job array}")
  [ "${#ARGS[@]}" -gt 0 ] || { echo "[slurm] no task ${SLURM_ARRAY_TASK_ID} in ${TRAINER_SWEEP}" >&2; exit 2; }
  export TRAINER_STATUS_FILE="${TRAINER_SWEEP}/status/${SLURM_ARRAY_TASK_ID}.json"
else
  ARGS=("$@")
fi
[ "${#ARGS[@]}" -gt 0 ] || { echo "usage: sbatch $0 configs/RECIPE.yaml [key=value ...]" >&2; exit 2; }
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${JOB_KEY}}
for a in "${ARGS[@]}"; do case "$a" in run.dir=*) RUN_DIR=${a#run.dir=} ;; esac; done
ARGS=("${ARGS[0]}" "run.dir=${RUN_DIR}" "${ARGS[@]:1}")   # the user's own run.dir=, if any, comes later and wins

# ---- preemption: a signal becomes a stop request; the trainer saves at the next step and exits 3 ----
export TRAINER_STOP_FILE="${RUN_DIR%/}.stop"
if [ -n "${TRAINER_TUNE:-}" ]; then export TRAINER_STOP_FILE="${TRAINER_TUNE%/}/stop/worker-${JOB_KEY}"; fi
rm -f "$TRAINER_STOP_FILE"
STOP_REQUESTED=0
request_stop() {
  STOP_REQUESTED=1
  mkdir -p "$(dirname "$TRAINER_STOP_FILE")" && touch "$TRAINER_STOP_FILE"
  echo "[slurm] $1 received: asking the trainer to save and stop" >&2
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

# ---- rendezvous: the first node's address (works when node names do not resolve) and a job-derived port ----
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$HEAD_NODE" -o | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "[slurm] job ${JOB_KEY} restart ${SLURM_RESTART_COUNT:-0} nodes ${SLURM_JOB_NODELIST} head ${MASTER_ADDR}:${MASTER_PORT} run ${RUN_DIR}" >&2

# Run a command in the background and wait for it: bash runs a trap only while waiting, and `wait` returns
# early (> 128) when one fires, so wait again until the command has really ended.
run_and_wait() {
  "$@" &
  local child=$! rc
  while true; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  return "$rc"
}

# One node: one `accelerate launch` starting NPROC processes (GPUs, or CPU processes with gloo).
launch_one_node() {
  local nproc=$1 config=$2
  echo "[slurm] + accelerate launch --config_file $config --num_processes $nproc -m trainer train ${ARGS[*]}" >&2
  run_and_wait srun --ntasks=1 --nodes=1 "$TRAINER_PY" -m accelerate.commands.launch --config_file "$config" \
    --num_processes "$nproc" --main_process_port "$MASTER_PORT" -m trainer train "${ARGS[@]}"
}

# Several nodes: one task per node, each running `accelerate launch` with its own SLURM_NODEID as machine rank.
launch_nodes() {
  local nproc_per_node=$1
  local total=$((SLURM_NNODES * nproc_per_node))
  echo "[slurm] + srun (1 per node) accelerate launch --num_machines $SLURM_NNODES --num_processes $total -m trainer train ${ARGS[*]}" >&2
  # the node and task counts said, not inherited from the job's request: a job requeued onto fewer nodes
  # (scontrol update NumNodes=...) keeps its first SLURM_NTASKS, which would put two launches on one node
  run_and_wait srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$0" -m accelerate.commands.launch --config_file launch/accelerate/multinode.yaml \
      --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$1" \
      --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m trainer train "${@:2}"' \
    "$TRAINER_PY" "$total" "${ARGS[@]}"
}

# Exit 3 from the trainer = stopped on request after a checkpoint: requeue (the same job id, so the same run
# directory; the trainer resumes). A stop request that killed the trainer before it could answer (a signal
# before its handler existed) requeues too: the last checkpoint is intact.
finish() {
  local rc=$1
  if [ -n "${TRAINER_STATUS_FILE:-}" ]; then
    mkdir -p "$(dirname "$TRAINER_STATUS_FILE")"
    # whole or not at all: written beside it, then renamed over it (`trainer collect` may read it meanwhile);
    # the temporary's name is a status file's too (status/*.json: the sweep folder's own, never a user's)
    local tmp
    tmp="$(dirname "$TRAINER_STATUS_FILE")/.tmp-$$-$(basename "$TRAINER_STATUS_FILE")"
    printf '{"exit_code": %d, "job": "%s", "restart": %d, "stop_requested": %d}\n' \
      "$rc" "$JOB_KEY" "${SLURM_RESTART_COUNT:-0}" "$STOP_REQUESTED" > "$tmp" && mv -f "$tmp" "$TRAINER_STATUS_FILE"
  fi
  if [ "$rc" -eq 3 ] || { [ "$STOP_REQUESTED" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
    echo "[slurm] requeueing ${JOB_KEY} (trainer exit ${rc}); it resumes from its latest checkpoint" >&2
    rm -f "$TRAINER_STOP_FILE"
    scontrol requeue "$JOB_KEY" && exit 0
  fi
  rm -f "$TRAINER_STOP_FILE"
  exit "$rc"
}

# ---- a tune worker: the same job id after a requeue, so the same worker id, which re-attaches to its trial ----
if [ -n "${TRAINER_TUNE:-}" ]; then
  echo "[slurm] + trainer tune-worker ${TRAINER_TUNE} --worker-id ${JOB_KEY}" >&2
  run_and_wait "$TRAINER_PY" -m trainer tune-worker "$TRAINER_TUNE" --worker-id "$JOB_KEY" \
    --worker-index "${SLURM_ARRAY_TASK_ID:-0}"
  finish $?
fi

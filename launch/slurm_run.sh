#!/usr/bin/env bash
# The body both SLURM batch scripts share.
# Use when: not directly; launch/slurm_*.sbatch exec it inside the allocation. It
#   1. checks with `python -m launch.plan` that the job fits this allocation, before 256 GPUs sit idle on an OOM;
#   2. starts one rank per GPU with srun, every rank with the same Hydra overrides (so the same run_dir);
#   3. requeues the job when the ranks exit 75, the code `python -m train` returns after it saved a checkpoint
#      on SIGTERM (sent ahead of the time limit by `#SBATCH --signal=TERM@...`, or by preemption).
#
# Arguments: Hydra overrides, the batch script's first and the user's after them (later ones win).
# Variables: PYTHON (python), PLAN_CHECK (1; 0 skips step 1), MASTER_PORT (derived from the job id).
# The check plans for launch.gpu_memory_gb (default 80 GiB): on other GPUs pass e.g. launch.gpu_memory_gb=140
# (H200) with the overrides; train ignores launch.*.
#
# Ranks are started by srun itself, not by torchrun, so that the scheduler's SIGTERM reaches every rank
# directly and srun returns their exit code (torchrun would report 1, and by default it SIGKILLs its
# workers 30 s after passing a SIGTERM on, which may cut a checkpoint short).
set -euo pipefail

: "${SLURM_JOB_ID:?run inside a SLURM allocation: sbatch launch/slurm_qwen3_8b.sbatch [overrides]}"
: "${SLURM_NTASKS_PER_NODE:?set #SBATCH --ntasks-per-node to the GPUs per node (one rank per GPU)}"
PYTHON=${PYTHON:-python}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# awk, not head: head exits after one line and pipefail would fail the job on scontrol's SIGPIPE
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
# below Linux's ephemeral ports (32768 up), where an outgoing connection may hold the derived one
MASTER_PORT=${MASTER_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

if [[ "${PLAN_CHECK:-1}" != 0 ]]; then
  if ! "$PYTHON" -m launch.plan "$@" "launch.nodes=$NNODES" "launch.gpus_per_node=$SLURM_NTASKS_PER_NODE"; then
    echo "tristage: launch.plan says this job does not run as configured on $NNODES x $SLURM_NTASKS_PER_NODE" \
      "GPUs (see above); not starting. PLAN_CHECK=0 skips the check." >&2
    exit 1
  fi
fi

echo "tristage: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES nodes, master $MASTER_ADDR:$MASTER_PORT" >&2

# Each task maps SLURM's ids onto the variables torch.distributed reads (train/engine.py: world_from_env).
# --kill-on-bad-exit=0: on SIGTERM every rank saves its shard and exits 75; the first to finish must not
# take the others down mid-save. A rank that fails on its own tells the others through the rendezvous store,
# and they exit within seconds (train/faults.py, announce_failure) rather than wait out dist.timeout_s.
set +e
# A SIGTERM (preemption, scancel, --signal=B:TERM) that reaches this batch shell would end it at once, before the
# requeue below: trapped, bash waits for srun, whose ranks got the signal themselves (children reset the trap)
trap 'echo "tristage: the batch shell got a signal; waiting for the ranks" >&2' TERM USR1
# shellcheck disable=SC2016  # the $SLURM_* variables must expand inside each task, not here
srun --kill-on-bad-exit=0 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID \
         LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
  exec "$@"' rank "$PYTHON" -m train "$@"
rc=$?
set -e

if [[ $rc -eq 75 ]]; then
  echo "tristage: checkpoint saved after SIGTERM; requeueing job $SLURM_JOB_ID" >&2
  # a job that may not be requeued, or one preemption requeues already: said, and still 75 (not scontrol's code)
  scontrol requeue "$SLURM_JOB_ID" || echo "tristage: scontrol requeue failed; submit the same command again to" \
    "resume from the checkpoint" >&2
fi
exit "$rc"

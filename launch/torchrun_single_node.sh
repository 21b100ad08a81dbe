#!/usr/bin/env bash
# One machine, one process per GPU, started by torchrun.
#
# Use when: all GPUs of the job sit in one node (or for a multi-process run on the CPU: NPROC=2, gloo).
# Nothing else to set up: torchrun's --standalone rendezvous picks a free port on localhost.
#
#   launch/torchrun_single_node.sh model=qwen3_1_7b curriculum=qwen3 deepspeed=zero2 run_dir=runs/q17
#   NPROC=4 launch/torchrun_single_node.sh experiment=smoke run_dir=runs/smoke4
#
# Arguments are Hydra overrides for `python -m train`. NPROC defaults to the GPUs nvidia-smi lists (1 without
# a GPU). Relaunching the same command with the same run_dir resumes from the latest checkpoint.
# torchrun reports any failing worker as exit 1, so the requeue code 75 (checkpoint saved after SIGTERM)
# does not come through here; the SLURM scripts start ranks with srun to keep it.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    if ! gpus=$(nvidia-smi -L) || [[ -z "$gpus" ]]; then
      echo "nvidia-smi lists no GPU (driver or device problem?); set NPROC to the ranks to start" >&2
      exit 2
    fi
    NPROC=$(grep -c '^GPU ' <<< "$gpus")  # the GPUs, not their MIG devices' lines
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # the ranks see only these: one rank each
      IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
      NPROC=${#visible[@]}
      if ((NPROC == 0)) || [[ ${visible[0]} == -1 ]]; then  # set but empty, or CUDA's "none": ranks see no GPU
        echo "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU from the ranks; unset it, list the" \
          "GPUs to use, or set NPROC" >&2
        exit 2
      fi
    fi
  else
    NPROC=1
  fi
fi

# torchrun met 0 with a bare AssertionError, and another word with a traceback naming no variable
if [[ ! $NPROC =~ ^([1-9][0-9]*|auto|cpu|gpu|xpu)$ ]]; then
  echo "error: NPROC=$NPROC: must be the number of processes (GPUs) on this node, at least 1" >&2
  exit 2
fi

exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m train "$@"

#!/usr/bin/env bash
# Several nodes without a scheduler: run this same command on every node; torchrun's c10d rendezvous on the
# head node gathers them (elastic agent per node, one process per GPU).
#
# Use when: you start the nodes yourself (ssh, a cloud instance group, a Kubernetes job) and no SLURM.
#
#   # on each of the 4 nodes (HEAD_ADDR = a hostname or IP of node 0 reachable from all nodes):
#   NNODES=4 HEAD_ADDR=10.0.0.1 launch/torchrun_multi_node.sh model=qwen3_8b curriculum=qwen3 \
#       deepspeed=zero2 model.activation_checkpointing=true run_dir=/shared/runs/qwen3_8b
#
# Variables: NNODES (required), HEAD_ADDR (required), HEAD_PORT (29500), NPROC (GPUs per node, default: all
# nvidia-smi lists), RDZV_ID (job id shared by the nodes, default tristage). run_dir must be on a file system
# every node sees, the same path on all of them: every rank writes its checkpoint shard there.
# torchrun turns a worker's exit 75 (checkpoint saved after SIGTERM) into exit 1; to continue, start the same
# command again on every node: the run resumes from run_dir.
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes}"
: "${HEAD_ADDR:?set HEAD_ADDR to the address of node 0 (the c10d rendezvous host)}"
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
if [[ ! $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "error: NNODES=$NNODES: must be the number of nodes, at least 1 (or torchrun's MIN:MAX)" >&2
  exit 2
fi

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:${HEAD_PORT:-29500}" --rdzv_id="${RDZV_ID:-tristage}" \
  --max_restarts=0 -m train "$@"

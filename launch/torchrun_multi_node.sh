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
# NPROC: one rank per GPU the ranks can see, unless set (launch/nproc.sh checks it)
# shellcheck source=launch/nproc.sh
source "$(dirname "${BASH_SOURCE[0]}")/nproc.sh"
if [[ ! $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "error: NNODES=$NNODES: must be the number of nodes, at least 1 (or torchrun's MIN:MAX)" >&2
  exit 2
fi

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:${HEAD_PORT:-29500}" --rdzv_id="${RDZV_ID:-tristage}" \
  --max_restarts=0 -m train "$@"

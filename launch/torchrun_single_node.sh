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

# NPROC: one rank per GPU the ranks can see, unless set (launch/nproc.sh checks it)
# shellcheck source=launch/nproc.sh
source "$(dirname "${BASH_SOURCE[0]}")/nproc.sh"

exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m train "$@"

#!/usr/bin/env bash
# The ranks per node for the torchrun scripts, sourced by them (not run on its own): NPROC as given, else one
# per GPU the ranks can see; exits 2 naming the variable where no rank could start.
#
# Use when: never directly; launch/torchrun_single_node.sh and launch/torchrun_multi_node.sh source it.
# Without NPROC: the entries of CUDA_VISIBLE_DEVICES where it is set (indices or UUIDs), else every `GPU` line of
# `nvidia-smi -L` (MIG devices not counted), else 1 (no nvidia-smi: a CPU run). CUDA_VISIBLE_DEVICES set but
# empty, or -1, hides every GPU: refused.

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

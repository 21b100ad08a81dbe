#!/usr/bin/env bash
# Speed on the H200 test machine in one prepared command: tristage vs HF vs HF + Liger (train/bench.py), the real
# training path at the same shape, each optimisation on its own, and the GPU tests; results land in $OUT.
#
# Use when: the project's H200 machine is at hand (Python 3.12, torch 2.11, transformers 5.17, no
# deepspeed/hydra/datasets, no network). First, on a machine with the package registries, from the repository
# root: the wheels it lacks go into .whl/ (git-ignored; the development sessions use their helper script outside
# the repository, `bash ../shared/gpu/wheels.sh liger-kernel==0.8.5`), and the fixture corpus is tokenized:
#   TRISTAGE_DATA_ROOT=$PWD/.cache/gpu_data python -m data.prepare data=fixture
# then on the GPU machine, with .whl/ and .cache/gpu_data/fixture beside the tree: OUT=<folder> bash
# launch/gpu_check.sh (a session's device call: command "bash launch/gpu_check.sh", carrying those two paths,
# timeout 600 s). About 9.5 minutes. PARTS picks parts (default "bench train ablate tests"; "extra" is the
# FlexAttention and partitioned-build GPU tests), BUDGET_S (560: the final reports need ~15 s of the call's 600)
# caps the parts; each stops at its own limit, and what it finished stays in $OUT (JSON written after every run).
# A CPU rehearsal of the script itself (tests/test_bench.py): PY=python SKIP_WHEELS=1 BENCH_ARGS="--device cpu"
# TRAIN_ARGS="model=tiny_dense device=cpu ..." launch/gpu_check.sh
set -uo pipefail

OUT=${OUT:-$PWD/gpu_out}
PARTS=${PARTS:-bench train ablate tests}
BUDGET_S=${BUDGET_S:-560}
PY=${PY:-python3}
read -r -a bench_args <<<"${BENCH_ARGS:-}"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TRISTAGE_DATA_ROOT=$PWD/.cache/gpu_data

# The missing packages, carried as wheels (shared/gpu/README.md's line; PYTHONPATH may be unset there).
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} || exit 1
fi

{
  date -u +"%Y-%m-%d %H:%M UTC"
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  for m in transformers deepspeed liger_kernel hydra omegaconf; do
    "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -n 1
  done
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# run_part NAME LIMIT_S MIN_S LOG COMMAND...: run when PARTS names it and at least MIN_S of the budget is left,
# output to LOG, killed at min(LIMIT_S, what is left).
run_part() {
  local name=$1 limit=$2 min=$3 log=$4
  shift 4
  [[ " $PARTS " == *" $name "* ]] || return 0
  local left=$((BUDGET_S - SECONDS))
  local t=$((left < limit ? left : limit))
  if ((t < min)); then
    echo "[gpu_check] $name skipped: ${left}s of the budget left"
    return 0
  fi
  echo "[gpu_check] $name: limit ${t}s, started at ${SECONDS}s"
  timeout -s KILL "$t" "$@" >"$log" 2>&1
  echo "[gpu_check] $name: exit $? at ${SECONDS}s (log: $log)"
}

# 1. The comparison table (issue item 1): every case, pure bf16 and DeepSpeed ZeRO-1 bf16, peers side by side;
#    every case's bf16 rows run first, so a kill at the limit costs DeepSpeed rows rather than whole cases.
run_part bench 290 120 "$OUT/bench.log" "$PY" -m train.bench "${bench_args[@]}" --json "$OUT/bench.json"

# 2. The real path (item 2): python -m train through DeepSpeed on the bench's 0.6b_4k shape, with the attention
#    kernel the bench's probe picked; KILL at the limit leaves metrics.jsonl (one line per step) behind.
#    If compiling failed in the bench (it then measured the eager model), the training run goes eager too.
#    Steps 30-31 run under torch.profiler (2 of ~200 timed steps: the median tokens/s barely moves); their op table
#    goes to the end of train.log (only 8 files come back from the device, all taken).
read -r attention compile < <("$PY" -c "import json; m = json.load(open('$OUT/bench.json'))['meta']; \
print(m['attention'].get('0.6b_4k', 'auto'), 'false' if m.get('compile_failed') else 'true')" 2>/dev/null \
  || echo auto true)
rm -rf runs/gpu_speed
run_part train 110 60 "$OUT/train.log" "$PY" -m train experiment=gpu_speed model.attention_backend="$attention" \
  model.compile="$compile" run_dir=runs/gpu_speed logging.profile.start_step=30 "${train_args[@]}"
[[ -f runs/gpu_speed/metrics.jsonl ]] && cp runs/gpu_speed/metrics.jsonl "$OUT/train_metrics.jsonl"
for table in runs/gpu_speed/profile/*/rank0.ops.txt; do
  [[ -f $table ]] && { echo "== torch.profiler, $table"; cat "$table"; } >>"$OUT/train.log"
done

# 3. Each means on its own (item 3, train/PERF_NOTES.md), with the bench's attention pick (its compiled graphs are
#    then in Inductor's cache already).
ablate_cases=0.6b_4k,moe_8l_4k
[[ " ${bench_args[*]} " == *" cpu "* ]] && ablate_cases=tiny_dense,tiny_moe
run_part ablate 100 60 "$OUT/ablate.log" "$PY" -m train.bench --ablate --cases "$ablate_cases" --attention "$attention" \
  "${bench_args[@]}" --json "$OUT/ablate.json"

# 4. The GPU tests (Inductor vs eager, attention kernels vs math, grouped GEMM vs loop), one line per test (-v) so
#    a KILL at the limit still shows what passed, each test stopped at 25 s where pytest-timeout is installed (it is
#    on the H200's image). The tiny bench on CUDA is left out: part 1 ran every peer on CUDA already.
pytest_timeout=()
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_timeout=(--timeout=25)
run_part tests 70 30 "$OUT/pytest_gpu.log" "$PY" -m pytest -v -m gpu tests/test_bench.py "${pytest_timeout[@]}" \
  --deselect tests/test_bench.py::test_bench_tiny_on_cuda_runs_every_peer -p no:cacheprovider
[[ -f "$OUT/pytest_gpu.log" ]] && tail -n 15 "$OUT/pytest_gpu.log"

# 5. Not in the default PARTS (they train through `python -m train`, ~2-3 minutes): FlexAttention document
#    masking on CUDA (model and trainer), ZeRO-3's partitioned build in bf16 and a re-sharded resume through fused
#    AdamW (ZeRO-1 -> 2 and ZeRO-3 -> 1). PARTS="extra" in a later session.
run_part extra 300 60 "$OUT/pytest_extra.log" "$PY" -m pytest -v -m gpu tests/test_doc_mask.py \
  tests/test_partitioned_init.py tests/test_faults.py -p no:cacheprovider
[[ -f "$OUT/pytest_extra.log" ]] && tail -n 15 "$OUT/pytest_extra.log"

# The tables last (the device tool returns the end of the output).
[[ -f "$OUT/ablate.json" ]] && "$PY" -m train.bench --report "$OUT/ablate.json" | awk '/^## Runs/{p=1} /^## tristage/{p=0} p'
if [[ -f "$OUT/bench.json" ]]; then
  compare=()
  [[ -f "$OUT/train_metrics.jsonl" ]] && compare=(--train-metrics "$OUT/train_metrics.jsonl" --train-case "${TRAIN_CASE:-0.6b_4k:4}")
  "$PY" -m train.bench --report "$OUT/bench.json" "${compare[@]}" --json "$OUT/bench.json"
else
  echo "[gpu_check] no bench.json: see $OUT/bench.log"
  tail -n 40 "$OUT/bench.log" 2>/dev/null
fi
echo "[gpu_check] done in ${SECONDS}s"

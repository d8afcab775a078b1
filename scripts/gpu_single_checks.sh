#!/usr/bin/env bash
# The single-GPU measurements of one device session, on a machine with 2 GPUs: two lanes run
# side by side, one per GPU, so nothing shares a GPU with a timed kernel.
#   lane A (GPU 0): msa-bench at 256K and 1M (index kernel, main kernel, full op, dense and
#                   FlexAttention baselines), then scripts/gpu_check_backend.py;
#   lane B (GPU 1): scripts/gpu_run_megatron_lm.sh (Megatron-LM's loop), then
#                   scripts/gpu_check_train.py (msa-train: bf16, kernels, resume).
# Prerequisite: the wheels installed and PYTHONPATH set (see scripts/gpu_run_megatron_lm.sh);
# MSA_COMMIT=<sha> names the commit in the bench table (the device has no .git).
#   OUT=<dir> bash scripts/gpu_single_checks.sh        (logs: $OUT/{bench,backend,mlm,train}*)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/runs/gpu_single_$(date +%Y%m%d_%H%M%S)}
PY=${PYTHON:-python3}
BENCH_IMPLS=${BENCH_IMPLS:-cudnn-dense,flex-blocksparse,index-fused,kl-sparse-fused,msa-main,msa-op}
BENCH_LENGTHS=${BENCH_LENGTHS:-256K,1M}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

lane_a() {
  export CUDA_VISIBLE_DEVICES=0
  "$PY" -m msa_megatron.bench.harness --impls "$BENCH_IMPLS" --lengths "$BENCH_LENGTHS" \
    --bwd-max-L 1M --time-budget-s "${BENCH_BUDGET_S:-240}" --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" >> "$OUT/status.txt"
  "$PY" scripts/gpu_check_backend.py > "$OUT/backend.log" 2>&1
  echo "gpu_check_backend rc=$?" >> "$OUT/status.txt"
}

lane_b() {
  export CUDA_VISIBLE_DEVICES=1
  OUT="$OUT/mlm" bash scripts/gpu_run_megatron_lm.sh > "$OUT/mlm.log" 2>&1
  echo "gpu_run_megatron_lm rc=$?" >> "$OUT/status.txt"
  "$PY" scripts/gpu_check_train.py --steps 30 --warmup 10 --run-dir /tmp/msa_gpu_check_train > "$OUT/train.log" 2>&1
  echo "gpu_check_train rc=$?" >> "$OUT/status.txt"
  cp /tmp/msa_gpu_check_train/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true
}

lane_a & A=$!
lane_b & B=$!
wait $A $B
cat "$OUT/status.txt"

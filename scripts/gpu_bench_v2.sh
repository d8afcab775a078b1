#!/usr/bin/env bash
# Issue 17's one-table benchmark on one H100 (<= 8 minutes): cuDNN, FlexAttention, fla-nsa,
# the old / new main path and the whole op at 32K / 128K (fwd, fwd+bwd) and 1M (prefill;
# fwd+bwd with peak memory), on random, trained and Flex-pattern selections, each with its
# measured U8 (msa_megatron/bench/done_when.py), then the GPU tests of the index kernels.
# Prerequisites: the wheels installed and PYTHONPATH set, fla-core among them
# (.whl/fla_core-0.6.0-py3-none-any.whl; without it the fla-nsa rows say why they are
# missing); MSA_COMMIT=<sha> names the commit (the device has no .git).
# Trained selections: MSA_TRAINED_SELECTION=<selections_32K.npz or selection_stats.json>
# from scripts/selection_stats.py (default: docs/selections/selections_32K.npz if committed).
#   OUT=<dir> bash scripts/gpu_bench_v2.sh        -> $OUT/bench_v2/done_when.{md,json}, $OUT/bench_v2.log
# BENCH_ORDER=128k,32k,1m measures 32K before 1M (default 128k,1m,32k); BENCH_BUDGET_S (420) cuts the last cells.
# Split over calls on one warm machine: BENCH_LENGTHS=128k,32k, then BENCH_LENGTHS=1m
# BENCH_PREVIOUS=<first call's done_when.json> (carried back in) -> one table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/runs/bench_v2_$(date +%Y%m%d_%H%M%S)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
EXTRA=()
[ "${BENCH_FLEX_UNION:-0}" = 1 ] && EXTRA+=(--flex-union)   # Flex on random/trained selections at 128K
[ -n "${BENCH_PREVIOUS:-}" ] && EXTRA+=(--previous "$BENCH_PREVIOUS")   # an earlier call's done_when.json
"$PY" -m msa_megatron.bench.done_when --out "$OUT/bench_v2" --time-budget-s "${BENCH_BUDGET_S:-420}" \
  --selections "${BENCH_SELECTIONS:-random,trained,flex}" --order "${BENCH_ORDER:-128k,1m,32k}" --lengths "${BENCH_LENGTHS:-32k,128k,1m}" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/bench_v2.log"
echo "done_when rc=${PIPESTATUS[0]}" | tee -a "$OUT/status.txt"

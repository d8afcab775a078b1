#!/usr/bin/env bash
# msa-bench before / after on one GPU, in one call (issue 16: "no kernel slower"): the same
# rows (index-fused, msa-main, msa-op, kl-sparse-fused at 32K and 128K, bf16 paper layout,
# random selection) with the old tree's msa_megatron and with this checkout's, alternating
# old / new for ROUNDS rounds (default 2: the fastest time per side is kept, so a noisy round
# does not decide), then a side-by-side table with ratios new / old.
#
#   git archive 533a76b msa_megatron | tar -x -C .bench_old          # the old package
#   OLD_TREE=.bench_old OUT=<dir> PYTHONPATH=/tmp/site bash scripts/gpu_bench_before_after.sh
#
# Writes $OUT/{old_r1,new_r1,old_r2,new_r2}/bench.{md,json} + .log and $OUT/before_after.{md,json};
# exit status 1 when a row is slower than the tolerance (BENCH_TOLERANCE, default 0.03), 2 on
# a setup error. Budget: BENCH_BUDGET_S per harness run (default 60 s) x 2 x ROUNDS + Triton
# compiles of the first round: about 4 minutes on an H100.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OLD_TREE:?OLD_TREE=<dir holding the old msa_megatron package> is required}"
OLD_TREE=$(cd "$OLD_TREE" && pwd) || exit 2
OUT=${OUT:-$REPO/runs/bench_before_after_$(date +%Y%m%d_%H%M%S)}
PY=${PYTHON:-python3}
IMPLS=${BENCH_IMPLS:-index-fused,msa-main,msa-op,kl-sparse-fused}
LENGTHS=${BENCH_LENGTHS:-32K,128K}
ROUNDS=${ROUNDS:-2}
BUDGET=${BENCH_BUDGET_S:-60}
NEW_COMMIT=${MSA_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo new)}
OLD_COMMIT=${OLD_COMMIT:-old-tree}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
[ -d "$OLD_TREE/msa_megatron" ] || { echo "no msa_megatron package under OLD_TREE=$OLD_TREE" >&2; exit 2; }

# One harness run of tree $1 (old|new) into $OUT/$2. Runs from $OUT, never from a repo root:
# `python -m` puts the working directory first on sys.path, which would shadow PYTHONPATH.
bench() {
  local tree=$1 dir=$2 root commit
  if [ "$tree" = old ]; then root=$OLD_TREE; commit=$OLD_COMMIT; else root=$REPO; commit=$NEW_COMMIT; fi
  (
    cd "$OUT" || exit 2
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" MSA_COMMIT="$tree:$commit"
    got=$("$PY" -c "import msa_megatron, os; print(os.path.dirname(os.path.dirname(msa_megatron.__file__)))")
    if [ "$got" != "$root" ]; then echo "$tree: imported msa_megatron from $got, expected $root" >&2; exit 2; fi
    "$PY" -m msa_megatron.bench.harness --impls "$IMPLS" --lengths "$LENGTHS" --bwd-max-L 128K \
      --selections random --no-peak --warmup 25 --rep 100 --time-budget-s "$BUDGET" --out "$OUT/$dir"
  ) > "$OUT/$dir.log" 2>&1
  local rc=$?
  echo "$dir rc=$rc ($(tail -n 1 "$OUT/$dir.log" | cut -c1-120))"
  [ $rc -ne 2 ] || exit 2
}

"$PY" -c "import torch; print('device', torch.cuda.get_device_name())" || exit 2
olds=() news=()
for r in $(seq 1 "$ROUNDS"); do
  bench old "old_r$r"; olds+=("$OUT/old_r$r")
  bench new "new_r$r"; news+=("$OUT/new_r$r")
done
join() { local IFS=,; echo "$*"; }
cd "$OUT" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m msa_megatron.bench.before_after \
  --old "$(join "${olds[@]}")" --new "$(join "${news[@]}")" --out "$OUT" --tolerance "${BENCH_TOLERANCE:-0.03}"

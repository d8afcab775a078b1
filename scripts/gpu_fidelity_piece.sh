#!/usr/bin/env bash
# One slice of the fidelity scale matrix (issue 19) on one GPU: runs the next runs of
# `scripts/fidelity.py --piece scale` that are not complete yet, within BUDGET_S seconds, and
# packs their small results (metrics.jsonl, summary.json, config.yaml, run.json, log tails;
# no checkpoints) into one tarball $OUT/fidelity_piece_<UTC stamp>.tar.gz (KBs).
#
# Completed runs are skipped when their run.json (complete: true) is in DONE (the tarballs of
# earlier calls extracted into results/fidelity_scale in the repo). At the budget the running
# trainer gets SIGTERM, saves a checkpoint in WORK and exits; the next call on the same warm
# machine resumes it (a fresh machine starts it again: checkpoints never travel).
#
# Prerequisite on a bare GPU machine: megatron-core / hydra-core / omegaconf / antlr4 wheels in
# /tmp/site. From the repository root:
#   export PYTHONPATH=/tmp/site; OUT=$OUT BUDGET_S=480 bash scripts/gpu_fidelity_piece.sh
# Afterwards, here: tar xzf <files_at>/fidelity_piece_*.tar.gz -C results/fidelity_scale
#                   python scripts/fidelity.py --scale-report results/fidelity_scale
# Runs go one at a time (preset scale: run 12 measured no gain from sharing the GPU); PARALLEL=<n>
# lets n share it (each its own process and MASTER_PORT, each SIGTERMed at the budget). A fresh
# run starts only when the planner expects it to finish in this call; SHARE_EFF (0..1, default
# the preset's 0) is what sharing gains in the planner: K runs give 1+(K-1)e x one run.
# Knobs: BUDGET_S=480 (keep ~1.5 min below the call's limit), GRACE_S=60 (of the budget, for the
# SIGTERM checkpoints and packing), PRESET=scale (any SCALE_PRESETS name of
#   msa_megatron/experiments/fidelity/scale.py: scale_long, retrieval, retrieval_32k, ...),
#   WORK=/tmp/fid_<PRESET>, DONE= (default results/fidelity_<PRESET's report name>: results/fidelity_scale,
#   results/fidelity_retrieval, results/fidelity_retrieval_long, results/fidelity_retrieval_32k),
#   RUNS= (comma-separated subset, run in that order), RERUN= (complete runs to run again, e.g. to add a new probe's
#   numbers), PARALLEL=auto, SHARE_EFF=, GPU_MEM_GIB= (dry runs without a GPU
#   plan for 80), FIT_MARGIN=0.10 (> -1; -0.9 starts a run that cannot finish in this call, to be
#   resumed by the next call on the warm machine), DRY_RUN=1 (print the plan of this call, run nothing).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_fidelity_piece}
BUDGET_S=${BUDGET_S:-480}
PRESET=${PRESET:-scale}
WORK=${WORK:-/tmp/fid_$PRESET}  # one per preset: runs of two presets may share a name
DONE=${DONE:-}
RUNS=${RUNS:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# a copied tree may carry no (or a stale) .git: name the commit when it is known
if [ -z "${MSA_COMMIT:-}" ] && [ -f .msa_commit ]; then export MSA_COMMIT=$(cat .msa_commit); fi
args=(--piece "$PRESET" --budget-s "$BUDGET_S" --grace-s "${GRACE_S:-60}" --work "$WORK"
      --export "$OUT" --parallel "${PARALLEL:-auto}")
[ -n "$DONE" ] && args+=(--done "$DONE")
[ -n "$RUNS" ] && args+=(--runs "$RUNS")
[ -n "${RERUN:-}" ] && args+=(--rerun "$RERUN")
[ -n "${SHARE_EFF:-}" ] && args+=(--share-eff "$SHARE_EFF")
[ -n "${GPU_MEM_GIB:-}" ] && args+=(--gpu-mem-gib "$GPU_MEM_GIB")
[ -n "${FIT_MARGIN:-}" ] && args+=(--fit-margin "$FIT_MARGIN")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
"$PY" scripts/fidelity.py "${args[@]}" 2>&1 | tee "$OUT/piece.log"
rc=${PIPESTATUS[0]}
echo "[gpu_fidelity_piece] exit $rc; files in $OUT:"; ls -la "$OUT"
exit $rc

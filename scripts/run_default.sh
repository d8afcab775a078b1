#!/usr/bin/env bash
# The default job: set up the environment, then train the tiny MSA model on the embedded
# corpus (this Python's standard library, no download) on the CPU: full-attention warmup,
# then sparse attention. A few minutes on 2 cores. Prints where the logs and the wandb run
# are, and ends with a summary (LM loss, indexer KL, selection recall at start and end).
#
#   bash scripts/run_default.sh                      # the default job
#   bash scripts/run_default.sh train.steps=300      # any msa-train override
#   MSA_NPROC=2 bash scripts/run_default.sh          # 2 processes under torchrun (DP=2)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
PY=${MSA_VENV:-$ROOT/.venv}/bin/python
# msa-train picks a new runs/<model>-<attention>-<timestamp> itself; MSA_RUN_DIR names one
RUN_ARGS=()
if [ -n "${MSA_RUN_DIR:-}" ]; then RUN_ARGS=("run_dir=$MSA_RUN_DIR"); fi
NPROC=${MSA_NPROC:-1}
export PYTHONUNBUFFERED=1 WANDB_SILENT=true
cd "$ROOT"
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m msa_megatron.train)
else
  LAUNCH=("$PY" -m msa_megatron.train)
fi
echo "[default job] ${LAUNCH[*]} ${RUN_ARGS[*]} $*"
"${LAUNCH[@]}" "${RUN_ARGS[@]}" "$@"
echo "[default job] done: the run directory is printed above (config.yaml, metrics.jsonl, summary.json, plots/, checkpoints/, wandb/, tensorboard/)"

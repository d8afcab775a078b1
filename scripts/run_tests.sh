#!/usr/bin/env bash
# The test suite (README's second command; .ci/run calls exactly this). CPU only: the
# Triton kernels run under TRITON_INTERPRET=1, Megatron-Core under gloo.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
# pytest exits 5 when it collects no test: that fails this script too.
exec "${MSA_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"

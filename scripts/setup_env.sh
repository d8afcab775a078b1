#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment: Python >= 3.12 (megatron-core 0.19
# requires it), torch, and msa_megatron with its train and test extras, installed editable.
# Re-running is cheap: the install is skipped while setup.cfg/pyproject.toml are unchanged.
# Environment: MSA_VENV (default ./.venv), MSA_PYTHON (an interpreter to use),
#              MSA_TORCH (pip spec for torch, default torch==2.13.0).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MSA_VENV:-$ROOT/.venv}
TORCH_SPEC=${MSA_TORCH:-torch==2.13.0}

py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${MSA_PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && py_ok "$c" && { command -v "$c"; return 0; }
  done
  # pyenv keeps other versions out of PATH unless selected: look at them directly.
  local root=${PYENV_ROOT:-$HOME/.pyenv}
  for c in "$root"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$c" ] && py_ok "$c" && { echo "$c"; return 0; }
  done
  return 1
}

stamp_of() { cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16; echo "$TORCH_SPEC"; }

if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
  PY=$(find_python) || { echo "msa_megatron needs Python >= 3.12 (megatron-core 0.19 requires it); none found. Install one (e.g. 'pyenv install 3.12') or set MSA_PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "[setup] creating $VENV with $PY ($("$PY" --version 2>&1))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
want=$(stamp_of)
if [ "$(cat "$VENV/.msa_stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and msa_megatron[train,test] into $VENV (first time: a few minutes)"
  quiet() { grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true; }
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q -e "$ROOT[train,test]" 2>&1 | quiet
  "$VENV/bin/python" -c 'import torch, megatron.core, msa_megatron' 2>/dev/null || { echo "[setup] install failed: torch, megatron-core or msa_megatron does not import" >&2; exit 1; }
  echo "$want" > "$VENV/.msa_stamp"
fi

"""Transformer Engine spec on a GPU (issue 15 parts 1-2), as a pytest entry point to the
``model`` section of ``scripts/gpu_te_check.py``: the TE spec against the local spec on the same
weights (modes dense / msa_warmup / msa, loss and every gradient within the bf16 noise),
checkpoint interchange both ways, FP8 linears with MSA's kernels in bf16. Tolerances are the
script's (its docstring). Skipped without CUDA or without Transformer Engine
(``scripts/te_install.sh`` installs it on the GPU machine).

    PYTHONPATH=$PWD:/tmp/site:/tmp/te_site python3 -m pytest -m gpu tests/gpu/test_gpu_te.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="Transformer Engine not installed")
def test_te_spec_matches_local_spec_checkpoints_interchange_fp8(tmp_path):
    assert torch.cuda.is_available()
    result = tmp_path / "model.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_te_check.py"), "--child", "model", "--result",
                           str(result), "--tmp", str(tmp_path), "--logs", str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert "error" not in out, out.get("traceback", out["error"])
    for mode, row in out["parity"].items():
        assert row["pass"], (mode, row)
    for name in ("ckpt_local_to_te", "ckpt_te_to_local"):
        assert out[name]["pass"], (name, out[name])
    for mode, row in out["fp8"].items():
        assert row["pass"] and row["msa_core_input_dtypes"] == ["bfloat16"], (mode, row)

"""The wheel works without the checkout: build it, install it into a fresh venv, run
``msa-train`` for two steps from a directory outside the repository.

The fresh venv is made with ``--system-site-packages`` from this interpreter, and this
environment's site-packages are appended to its path (a ``.pth`` line: a venv's "system" site
is the *base* interpreter's, not the test venv's), so torch / megatron-core / hydra are reused
and only the wheel (``--no-deps``) is installed; its own site-packages come first on the path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                               "wandb", "outputs", ".whl")


def _run(cmd, cwd, env, timeout=240):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSA_CONFIG_DIR", "VIRTUAL_ENV")}
    env.update(MSA_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="disabled", PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info left in the checkout
    shutil.copytree(REPO, src, symlinks=True, ignore=_SKIP)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], tmp_path, env)
    wheels = list(dist.glob("msa_megatron-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env)
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    (purelib / "zz_test_env.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheels[0]], tmp_path, env)

    assert not (purelib / "patches").exists(), "a top-level 'patches' package was installed into site-packages"
    assert (purelib / "msa_megatron" / "patches" / "mcore_019_msa_registration.py").is_file()
    assert (purelib / "msa_megatron" / "configs" / "config.yaml").is_file()
    assert (purelib / "msa_megatron" / "configs" / "model" / "tiny.yaml").is_file()
    where = _run([py, "-c", "import importlib.util, msa_megatron; print(msa_megatron.__file__); "
                            "print(importlib.util.find_spec('patches'))"], tmp_path, env).split()
    assert where[0].startswith(str(purelib)) and where[1] == "None", where

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = elsewhere / "run"
    out = _run([venv / "bin" / "msa-train", "model=tiny", "train.steps=2", "train.global_batch_size=2",
                "train.micro_batch_size=2", "train.seq_length=128", "attention.warmup.steps=1", "train.eval_interval=0",
                "logging.progress_bar=false", "logging.wandb.enabled=false", "checkpoint.save_at_end=false",
                f"run_dir={run_dir}"], elsewhere, env)
    assert "msa-train model=tiny train.steps=2" in out  # the console shows the overrides of this launch
    assert (run_dir / "summary.json").is_file(), out[-3000:]
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"lm_loss"' in line]
    assert len(steps) == 2, steps
    assert str(REPO) not in out, "the run imported the checkout instead of the installed wheel"

"""The real entry point: ``python -m torch.distributed.run --nproc-per-node 2 -m
msa_megatron.train ...`` from a foreign working directory, stopped by SIGTERM (as a
scheduler would), then resumed from the checkpoint it saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import QUIET

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_torchrun_tp2_sigterm_saves_then_resumes(server, tmp_path, cache_dir):
    run = tmp_path / "run"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = QUIET + ["parallel=tp2", "train.steps=500", "attention.warmup.steps=2", "train.debug.step_sleep_s=0.5",
                    f"run_dir={run}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), MSA_CACHE_DIR=str(cache_dir), WANDB_MODE="offline")
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "msa_megatron.train", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    jsonl = run / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
                proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
                break
            time.sleep(0.2)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "torchrun.log").read_text()
    assert "resolved configuration:" in output and "tp: 2" in output
    events = [line for line in jsonl.read_text().splitlines() if '"preempted"' in line]
    assert len(events) == 1, output[-5000:]
    step = int(events[0].split('"step": ')[1].split(",")[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert (run / "config.yaml").is_file() and not (cwd / "outputs").exists() and not list(cwd.iterdir())

    resumed = server.run(run, QUIET + ["parallel=tp2", f"train.steps={step + 2}", "attention.warmup.steps=2"])
    assert resumed.ok(), resumed.logs[-5000:]
    assert sorted(s for s in resumed.steps() if s > step) == [step + 1, step + 2]
    assert resumed.steps()[step + 1]["attention_mode"] == "msa"

"""The real entry point: ``python -m torch.distributed.run --nproc-per-node 2 -m
msa_megatron.train ...`` from a foreign working directory, stopped by SIGTERM (as a
scheduler would), then resumed from the checkpoint it saved."""

from __future__ import annotations

import json
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
    assert "msa-train " in output and "parallel=tp2" in output and "resolved configuration:" not in output
    assert "tp: 2" in (run / "config.yaml").read_text() and "sp True" in output  # parallel=tp2 is TP=2 + SP
    events = [line for line in jsonl.read_text().splitlines() if '"preempted"' in line]
    assert len(events) == 1, output[-5000:]
    step = int(events[0].split('"step": ')[1].split(",")[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert (run / "config.yaml").is_file() and not (cwd / "outputs").exists() and not list(cwd.iterdir())

    resumed = server.run(run, QUIET + ["parallel=tp2", f"train.steps={step + 2}", "attention.warmup.steps=2"])
    assert resumed.ok(), resumed.logs[-5000:]
    assert sorted(s for s in resumed.steps() if s > step) == [step + 1, step + 2]
    assert resumed.steps()[step + 1]["attention_mode"] == "msa"


def _env(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), MSA_CACHE_DIR=str(cache_dir), WANDB_MODE="offline")
    return env


def test_torchrun_config_error_is_one_line_on_every_launch(tmp_path, cache_dir):
    """Issue 18.6: the line was missing in 5 of 22 launches (rank 0 killed first) and sat
    inside torchrun's traceback. Now: one line per node, also named as torchrun's root cause."""
    expected = ("msa-train: error: parallel='tp=3 pp=1 cp=1' is invalid: allowed values are layouts with "
                "tp*pp*cp dividing the 2 processes (tp*pp*cp=3)")
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "msa_megatron.train", "parallel.tp=3"], cwd=tmp_path, env=_env(cache_dir),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert [ln for ln in out.splitlines() if ln.startswith("msa-train:")] == [expected], out[-4000:]
        assert f"traceback : {expected}" in out  # torchrun's "Root Cause" section names it too


def test_multirun_runs_every_job_in_its_own_run_dir_and_fails_if_one_failed(tmp_path, cache_dir):
    """Issue 18.9: `msa-train -m` ran only the first job (sys.exit in the task) and exited 0."""
    small = ["attention=dense", "train.steps=1", "train.seq_length=64", "train.global_batch_size=2",
             "train.micro_batch_size=2", "logging.wandb.enabled=false", "logging.progress_bar=false",
             "train.eval_interval=0"]
    r = subprocess.run([sys.executable, "-m", "msa_megatron.train", "-m", "attention=dense,swa", *small[1:]],
                       cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing of hydra's in the working directory
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0].startswith("tiny-dense-") and runs[0].endswith("-job0")
    assert runs[1].startswith("tiny-swa-") and runs[1].endswith("-job1")
    for name in runs:
        assert (tmp_path / "runs" / name / "checkpoints" / "step_00000001" / "manifest.json").is_file()
    swa = next(r for r in map(json.loads, (tmp_path / "runs" / runs[1] / "metrics.jsonl").read_text().splitlines())
               if "event" not in r)  # the first step record (the held_out event precedes it)
    assert swa["attention_mode"] == "swa"  # was logged as "dense"

    r = subprocess.run([sys.executable, "-m", "msa_megatron.train", "-m", "train.steps=1,0", f"run_dir={tmp_path / 'sw'}",
                        *small[:1], *small[2:]], cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 2, r.stderr[-4000:]
    assert (tmp_path / "sw" / "0" / "metrics.jsonl").is_file()  # job 0 ran, in its own directory
    assert "msa-train: error: train.steps=0 is invalid" in r.stderr
    assert "msa-train: error: 1 of 2 multirun jobs failed (jobs [1])" in r.stderr

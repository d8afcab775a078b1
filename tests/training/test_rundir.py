"""One owner per run directory, and runs that share a machine (issue 18, items 3-4)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msa_megatron.training.config import UsageError
from msa_megatron.training.rundir import RunDirLock, holder_of

from .conftest import QUIET

REPO = Path(__file__).resolve().parents[2]


def test_lock_refuses_a_second_owner_and_takes_over_a_stale_one(tmp_path):
    first = RunDirLock(str(tmp_path)).acquire()
    assert first.stale is None
    locked, holder = holder_of(str(tmp_path))
    assert locked and holder.startswith(f"pid {os.getpid()} on host ")
    with pytest.raises(UsageError, match=rf"^run_dir={tmp_path}: in use by pid {os.getpid()} on host .*; wait for "
                                         "that run to end"):
        RunDirLock(str(tmp_path)).acquire()
    first.release()
    assert holder_of(str(tmp_path)) == (False, "")  # a clean end leaves no holder behind
    # a run that died (kill -9): its line stays, nobody holds the flock
    (tmp_path / ".lock").write_text("pid 999999 on host elsewhere since 2026-01-01 00:00:00\n")
    assert holder_of(str(tmp_path))[0] is False
    second = RunDirLock(str(tmp_path)).acquire()
    assert second.stale == "pid 999999 on host elsewhere since 2026-01-01 00:00:00"
    second.release()


@pytest.mark.slow
def test_two_single_process_runs_at_once_and_a_second_launch_refused(server, tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), MSA_CACHE_DIR=str(cache_dir), WANDB_MODE="offline")
    args = QUIET + ["attention=dense", "train.steps=3", "train.debug.step_sleep_s=3", "checkpoint.interval=1"]
    procs = []
    for name in ("a", "b"):
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "msa_megatron.train", *args, f"run_dir={tmp_path / name}"],
                                      cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        jsonl = tmp_path / "a" / "metrics.jsonl"
        deadline = time.time() + 150
        while time.time() < deadline and procs[0].poll() is None and not jsonl.exists():
            time.sleep(0.2)
        assert procs[0].poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        # a second launch on the live run_dir: refused, naming the holder; the live run is untouched
        second = server.run(tmp_path / "a", QUIET + ["attention=dense", "train.steps=3"], world=1)
        assert second.codes == [2], second.logs[-3000:]
        assert f"msa-train: error: run_dir={tmp_path / 'a'}: in use by pid {procs[0].pid} on host" in second.logs
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("a", "b")]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for name in ("a", "b"):
        assert (tmp_path / name / "checkpoints" / "latest").read_text().strip() == "step_00000003"

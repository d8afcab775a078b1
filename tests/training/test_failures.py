"""What a user sees when things go wrong (issue 18, items 8 and 10): torn metrics lines,
a full disk, Ctrl-C, a GPU preset on a CPU machine, an MSA budget that covers the whole
sequence, MFU on CPU, and the per-run notices that are INFO, not WARNING."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from msa_megatron.training.checkpoint import disk_full
from msa_megatron.training.preemption import PreemptionFlag

from .conftest import QUIET

SHORT = ["train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=2", "attention.warmup.steps=1"]


def test_disk_full_is_named_with_the_directory_and_bytes_free(tmp_path):
    line = disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert line.startswith(f"no space left on the device of {tmp_path}: ") and line.endswith(" bytes free")
    # torch's writer says only "unexpected pos": a full disk only when the device is (nearly) full
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"), tmp_path) is None
    assert disk_full(ValueError("something else"), tmp_path) is None


def test_second_ctrl_c_aborts():
    flag = PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # first: a request to save and stop
        assert flag.received == signal.SIGINT and flag.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.slow
def test_torn_metrics_line_resumes_and_ctrl_c_saves(server, tmp_path):
    run = tmp_path / "run"
    first = server.run(run, QUIET + SHORT + ["train.steps=4", "checkpoint.interval=1", "logging.peak_tflops=null",
                                             "logging.log_interval=3"], world=1)
    assert first.ok(), first.logs[-3000:]
    # the switch to sparse (after warmup step 1) is logged at step 2, not at the next log interval
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attention_mode"]["switched_at_steps"] == [2] and "msa_warmup -> msa (from step 2)" in first.logs
    # MSA budget = whole sequence: said once; no MFU on CPU unless asked; per-run notices are INFO
    assert "block 16 x top-4 = 64 tokens >= train.seq_length 64: every query selects every key" in first.logs
    assert all("mfu" not in r for r in first.steps().values()) and "mfu          off (no MFU on CPU" in first.logs
    assert "WARNING msa_megatron.megatron: MSA: registered" not in first.logs
    warnings = [ln for ln in first.logs.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "every query selects every key" in warnings[0], warnings  # the budget, only
    assert "torch.cuda.current_device, torch.cuda.synchronize" not in first.logs
    assert "INFO msa_megatron.compat: MSA: no CUDA device: Megatron-Core runs on CPU" in first.logs
    with open(run / "metrics.jsonl", "a") as f:  # a run killed (or a disk filled) mid-line
        f.write('{"step": 3, "lm_lo')
    # issue 18.8: the torn line blocked every resume (JSONDecodeError); Ctrl-C gave tracebacks, no save
    resumed = server.run(run, QUIET + SHORT + ["train.steps=400", "checkpoint.interval=0", "train.debug.step_sleep_s=0.2"],
                         world=1, sigterm_after_records=7, signal_name="SIGINT")
    assert resumed.ok(), resumed.logs[-3000:]
    assert "dropped 1 unreadable (torn) line" in resumed.logs
    events = [r for r in resumed.records() if r.get("event") == "preempted"]
    assert len(events) == 1 and events[0]["message"].startswith("SIGINT received: checkpoint saved at step")
    step = events[0]["step"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert sorted(resumed.steps()) == list(range(1, step + 1)) and "Traceback" not in resumed.logs


@pytest.mark.slow
def test_gpu_preset_without_a_gpu_is_refused(server, tmp_path):
    r = server.run(tmp_path / "gpu", QUIET + ["model=small_moe", "train=gpu"], world=1)
    assert r.codes == [2]
    assert ("msa-train: error: train.requires_gpu=True is invalid: allowed values are false on a machine without a "
            "CUDA GPU") in r.logs
    assert not (Path(tmp_path / "gpu") / "checkpoints").exists()

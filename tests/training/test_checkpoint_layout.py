"""Checkpoint directory semantics without a process group: which checkpoint a run resumes
from, what counts as complete, and what a start-up sweeps (no Megatron import)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msa_megatron.training.checkpoint import CheckpointManager, resolve_checkpoint
from msa_megatron.training.config import ConfigError

from .test_config import cfg_of


def _complete(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def test_resume_sources_and_completeness(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    _complete(ck / "step_00000004")
    (ck / "step_00000008").mkdir(parents=True)  # renamed? no: incomplete, and not `latest`
    (ck / ".tmp-step_00000012").mkdir()  # a save that crashed
    (ck / ".trash-step_00000002").mkdir()  # a prune that crashed
    (ck / "latest").write_text("step_00000004\n")

    mgr = CheckpointManager(cfg_of(f"run_dir={run}", "checkpoint.verify=false"))
    assert mgr.resume_source() == ("resume", ck / "step_00000004")
    assert not (ck / ".tmp-step_00000012").exists() and not (ck / ".trash-step_00000002").exists()

    with pytest.raises(ConfigError, match=r"^checkpoint\.resume='never' is invalid: allowed values are auto: .* already holds"):
        CheckpointManager(cfg_of(f"run_dir={run}", "checkpoint.resume=never")).resume_source()

    (ck / "latest").write_text("step_00000008\n")
    assert mgr.latest() is None  # names an incomplete directory: not a checkpoint
    assert mgr.candidates()[0] == (ck / "step_00000008", "`latest` names step_00000008, which is incomplete (no metadata.json)")


def test_load_and_init_from_resolve_a_step_or_a_checkpoints_dir(tmp_path):
    src = tmp_path / "other"
    step = _complete(src / "checkpoints" / "step_00000003")
    (src / "checkpoints" / "latest").write_text("step_00000003\n")
    assert resolve_checkpoint(str(step)) == step
    assert resolve_checkpoint(str(src / "checkpoints")) == step
    assert resolve_checkpoint(str(src)) == step  # a run directory works too
    with pytest.raises(ConfigError, match=r"^checkpoint\.load=.*: not a complete checkpoint \(no metadata.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^checkpoint\.init_from=.*/nowhere: not a checkpoint: .* does not exist$"):
        resolve_checkpoint(str(tmp_path / "nowhere"), "checkpoint.init_from")

    fresh = tmp_path / "fresh"
    mgr = CheckpointManager(cfg_of(f"run_dir={fresh}", f"checkpoint.load={src}", "checkpoint.verify=false"))
    assert mgr.resume_source() == ("load", step)
    mgr = CheckpointManager(cfg_of(f"run_dir={fresh}", f"checkpoint.init_from={src / 'checkpoints'}",
                                   "checkpoint.verify=false"))
    assert mgr.resume_source() == ("init", step)
    assert CheckpointManager(cfg_of(f"run_dir={tmp_path / 'new'}")).resume_source() == ("fresh", None)

"""Run directories and resume (issue 18, item 5): every launch without run_dir is a new
run; resuming an existing one with a configuration that changes what the run is, is one
error before anything is written; allowed changes are applied, the LR schedule continues."""

from __future__ import annotations

import math
import os

import pytest
import yaml

from msa_megatron.training.rundir import config_changes

from .conftest import QUIET


SMALL = QUIET + ["attention=dense", "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=2",
                 "checkpoint.interval=0"]


def test_config_changes_split_refused_and_allowed():
    saved = {"run_dir": "a", "model": {"hidden_size": 128}, "train": {"steps": 4, "lr": 1e-3, "seq_length": 256},
             "logging": {"level": "INFO"}}
    current = {"run_dir": "b", "model": {"hidden_size": 256}, "train": {"steps": 8, "lr": 2e-3, "seq_length": 512},
               "logging": {"level": "DEBUG"}}
    refused, allowed = config_changes(saved, current)
    assert refused == ["model.hidden_size 128 -> 256", "train.seq_length 256 -> 512"]
    assert allowed == {"logging.level": ("INFO", "DEBUG"), "run_dir": ("a", "b"), "train.lr": (1e-3, 2e-3),
                       "train.steps": (4, 8)}


def test_a_field_added_to_the_schema_since_the_run_started_is_no_change():
    saved = {"train": {"steps": 4}}
    current = {"train": {"steps": 4, "new_knob": 0, "other": 1}}
    refused, allowed = config_changes(saved, current, {"train.new_knob": 0, "train.other": 0})
    assert refused == ["train.other '<absent>' -> 1"] and allowed == {}


def test_an_msa_run_from_before_index_grad_clip_resumes_only_with_its_global_clipping():
    """Runs saved before attention.msa.index_grad_clip existed clipped all parameters by one
    norm; resuming one under the new default (separate) would change its training mid-run, so
    it is refused and names the value that resumes it exactly."""
    saved = {"attention": {"type": "msa", "msa": {"kl_coeff": 1.0}}}
    defaults = {"attention.msa.index_grad_clip": "separate"}
    new_default = {"attention": {"type": "msa", "msa": {"kl_coeff": 1.0, "index_grad_clip": "separate"}}}
    refused, allowed = config_changes(saved, new_default, defaults)
    assert refused == ["attention.msa.index_grad_clip 'global' (the behaviour before the field existed) -> "
                       "'separate'"] and allowed == {}
    pinned = {"attention": {"type": "msa", "msa": {"kl_coeff": 1.0, "index_grad_clip": "global"}}}
    assert config_changes(saved, pinned, defaults) == ([], {})
    # a run saved with the field compares as any other field; a dense run has no such field
    assert config_changes(new_default, new_default, defaults) == ([], {})
    assert config_changes({"attention": {"type": "dense"}}, {"attention": {"type": "dense"}}, defaults) == ([], {})


def test_resume_last_picks_the_newest_run_of_this_model_and_attention(tmp_path, monkeypatch):
    from msa_megatron.training.config import UsageError
    from msa_megatron.training.loop import choose_run_dir

    from .test_config import cfg_of

    monkeypatch.chdir(tmp_path)
    cfg = cfg_of("checkpoint.resume=last", "attention=dense")
    with pytest.raises(UsageError, match=r"^checkpoint\.resume=last: no earlier run with checkpoints matches "
                                         r"runs/tiny-dense-\*"):
        choose_run_dir(cfg)
    for name in ("tiny-dense-20260101-000000", "tiny-dense-20260102-000000", "tiny-msa-20260103-000000"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "latest").write_text("step_00000001\n")
    (tmp_path / "runs" / "tiny-dense-20260104-000000").mkdir()  # no checkpoint: not resumable
    assert choose_run_dir(cfg) == "runs/tiny-dense-20260102-000000"
    fresh = choose_run_dir(cfg_of("attention=dense"), "-job3")
    assert fresh.startswith("runs/tiny-dense-2") and fresh.endswith("-job3") and not os.path.exists(fresh)


@pytest.mark.slow
def test_new_dirs_by_default_refused_changes_and_a_continuing_lr_schedule(server, tmp_path):
    # two launches without run_dir: two runs (the second trained, not "nothing to do")
    first = server.run(None, SMALL + ["train.steps=4"], world=1, cwd=tmp_path)
    assert first.ok(), first.logs[-3000:]
    second = server.run(None, SMALL + ["train.steps=2"], world=1, cwd=tmp_path)
    assert second.ok(), second.logs[-3000:]
    assert first.run_dir != second.run_dir and first.run_dir.name.startswith("tiny-dense-")
    assert sorted(first.steps()) == [1, 2, 3, 4] and sorted(second.steps()) == [1, 2]
    run = first.run_dir
    config = (run / "config.yaml").read_text()
    assert f"run_dir: {run.relative_to(tmp_path)}" in config

    # resuming with a different sequence length / model: one error listing both, nothing rewritten
    bad = server.run(run, SMALL + ["train.steps=6", "train.seq_length=128", "model.hidden_size=64"], world=1)
    assert bad.codes == [2], bad.logs[-3000:]
    (line,) = [ln for ln in bad.logs.splitlines() if ln.startswith("msa-train: error:")]
    assert "model.hidden_size 128 -> 64; train.seq_length 64 -> 128" in line and "checkpoint.load=" in line
    assert (run / "config.yaml").read_text() == config and sorted(first.steps()) == [1, 2, 3, 4]
    never = server.run(run, SMALL + ["train.steps=4", "checkpoint.resume=never", "train.seed=7"], world=1)
    assert never.codes == [2] and "already holds checkpoints" in never.logs
    assert (run / "config.yaml").read_text() == config

    # extending the finished run: the LR schedule continues at min_lr (cosine ended at step 4)
    longer = server.run(run, SMALL + ["train.steps=6"], world=1)
    assert longer.ok(), longer.logs[-3000:]
    steps = longer.steps()
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    min_lr = yaml.safe_load(config)["train"]["min_lr"]
    assert steps[5]["lr"] == steps[6]["lr"] == pytest.approx(min_lr) and steps[4]["lr"] < steps[3]["lr"]
    assert "resume: changed train.steps 4 -> 6" in longer.logs and "LR schedule continues as saved" in longer.logs

    # a new learning rate on resume: applied (no KeyError from the optimizer's param groups)
    new_lr = server.run(run, SMALL + ["train.steps=7", "train.min_lr=5e-5", "train.lr=2e-3"], world=1)
    assert new_lr.ok(), new_lr.logs[-3000:]
    assert new_lr.steps()[7]["lr"] == pytest.approx(5e-5) and math.isfinite(new_lr.steps()[7]["lm_loss"])
    assert f"train.min_lr {min_lr!r} -> 5e-05" in new_lr.logs
    assert "min_lr: 5.0e-05" in (run / "config.yaml").read_text()

"""The per-iteration MSA plan (warmup switch, recall sampling) and what the loop hooks do with
it and with the metrics, checked without Megatron-LM's loop (the CPU pretrain run covers that)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msa_megatron import MSAConfig
from msa_megatron.megatron_lm.hooks import CONSOLE_KEYS, MSATrainingHooks, hooks_for, reset_hooks
from msa_megatron.megatron_lm.schedule import MSASchedule, StepPlan


def modes(schedule, iterations, consumed=lambda it: 0):
    return [schedule.plan(it, consumed(it)).mode for it in iterations]


def test_warmup_switches_at_the_configured_iteration():
    s = MSASchedule(MSAConfig(), warmup_iters=3)
    # train_step(iteration=k) runs iteration k + 1 (Megatron logs 1-based iterations)
    assert modes(s, range(6)) == ["msa_warmup"] * 3 + ["msa"] * 3
    assert modes(MSASchedule(MSAConfig(), warmup_iters=0), range(2)) == ["msa", "msa"]
    assert modes(MSASchedule(MSAConfig()), range(2)) == ["msa", "msa"]  # no warmup configured
    assert modes(MSASchedule(MSAConfig(mode="dense"), warmup_iters=1), range(3)) == ["msa_warmup", "dense", "dense"]


def test_warmup_in_tokens_counts_consumed_samples():
    # 4 samples of 512 tokens per iteration, warmup 5000 tokens -> ceil(5000 / 2048) = 3 iterations
    s = MSASchedule(MSAConfig(), warmup_tokens=5000, seq_length=512)
    assert modes(s, range(5), consumed=lambda it: 4 * it) == ["msa_warmup"] * 3 + ["msa"] * 2
    # batch-size ramp-up: the samples consumed decide, not the iteration count
    assert modes(s, [10], consumed=lambda it: 9) == ["msa_warmup"]  # 4608 tokens < 5000
    assert modes(s, [10], consumed=lambda it: 10) == ["msa"]  # 5120 tokens


def test_resume_re_derives_the_plan():
    s = MSASchedule(MSAConfig(recall_interval=10), warmup_iters=20)
    fresh = [s.plan(it) for it in range(50)]
    resumed = MSASchedule(MSAConfig(recall_interval=10), warmup_iters=20)
    assert [resumed.plan(it) for it in range(30, 50)] == fresh[30:]


def test_recall_at_iteration_1_and_multiples_of_the_interval_not_in_dense_mode():
    # msa_megatron.schedule's rule, shared with msa-train: iteration 1 gives the start value
    s = MSASchedule(MSAConfig(recall_interval=3), warmup_iters=2)
    assert [it + 1 for it in range(9) if s.plan(it).selection_recall] == [1, 3, 6, 9]
    assert not any(MSASchedule(MSAConfig(recall_interval=0)).plan(it).selection_recall for it in range(9))
    assert not any(MSASchedule(MSAConfig(recall_interval=1, mode="dense")).plan(it).selection_recall for it in range(3))


def test_schedule_from_args():
    assert MSASchedule.from_args(SimpleNamespace(msa=None)) is None
    args = SimpleNamespace(msa=MSAConfig(topk=4).to_dict(), msa_warmup_iters=None, msa_warmup_tokens=100,
                           seq_length=10)
    s = MSASchedule.from_args(args)
    assert s.msa == MSAConfig(topk=4) and s.warmup_tokens == 100 and s.seq_length == 10
    with pytest.raises(ValueError, match="not both"):
        MSASchedule(MSAConfig(), warmup_iters=1, warmup_tokens=1, seq_length=1)


# ----------------------------------------------------------------------------- hooks
class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name,) + args[1:])
            return 2
        return record


def test_before_train_step_applies_only_changes(monkeypatch):
    import msa_megatron.megatron as backend

    rec = Recorder()
    monkeypatch.setattr(backend, "set_attention_mode", rec("mode"), raising=False)
    monkeypatch.setattr(backend, "set_selection_recall_sampling", rec("recall"), raising=False)
    resets = []
    monkeypatch.setattr(backend, "reset_msa_metrics", lambda: resets.append(1), raising=False)
    said = []
    hooks = MSATrainingHooks(MSASchedule(MSAConfig(recall_interval=2), warmup_iters=2), printer=said.append)
    for it in range(5):
        hooks.before_train_step(["chunk"], it, consumed_samples=0)
    assert rec.calls == [("mode", "msa_warmup"), ("recall", True),  # iteration 1 (recall's start value)
                         # 2: recall sampled again, unchanged: no call
                         ("mode", "msa"), ("recall", False),  # 3
                         ("recall", True),  # 4
                         ("recall", False)]  # 5
    assert len(resets) == 5  # every step drops what evaluation forwards recorded
    assert said == [" [MSA] iteration 1: attention mode msa_warmup (2 MSA layers on rank 0)",
                    " [MSA] iteration 3: attention mode msa_warmup -> msa"]


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))


class FakeWandb:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((dict(values), step))


METRICS = {"indexer_kl": 0.5, "indexer_kl/layer_1": 0.4, "indexer_kl/layer_2": 0.6, "index_entropy": 3.0,
           "index_entropy/layer_1": 3.0, "main_entropy": 2.0, "main_entropy/layer_1": 2.0}


def test_log_writes_like_training_log():
    hooks = MSATrainingHooks(MSASchedule(MSAConfig()))
    hooks.applied = StepPlan("msa", False)
    writer, wandb = FakeWriter(), FakeWandb()
    loss = {"lm loss": torch.tensor(6.0)}
    total = {}
    line = hooks.log(METRICS, 7, writer, wandb, total, loss, skipped_iter=0)
    expected = {"msa/" + k: v for k, v in METRICS.items()}
    expected["msa/sparse"] = 1.0
    assert {(n, v) for n, v, _ in writer.scalars} == set(expected.items())
    assert {s for _, _, s in writer.scalars} == {7}
    assert wandb.logged == [(expected, 7)]
    # Megatron's order kept (lm loss first), MSA means accumulated as tensors like losses
    assert list(total) == ["lm loss", "msa indexer kl", "msa index entropy", "msa main entropy"]
    assert float(total["lm loss"]) == 0.0  # training_log adds this step's loss to it
    hooks.log(METRICS, 8, None, None, total, loss, skipped_iter=0)
    assert float(total["msa indexer kl"]) == pytest.approx(1.0) and total["msa indexer kl"].shape == (1,)
    hooks.log(METRICS, 9, None, None, total, loss, skipped_iter=1)  # skipped: not counted, as losses
    assert float(total["msa indexer kl"]) == pytest.approx(1.0)
    assert line is None and set(CONSOLE_KEYS) <= set(METRICS)


def test_the_index_branch_grad_norm_is_logged_beside_the_msa_metrics():
    """msa.index_grad_clip=separate: Megatron's grad-norm is the backbone's; the index branch's
    norm (its grad-norm group's, kept after train_step) goes out as msa/index_grad_norm."""
    from msa_megatron.patches.mcore_019_index_grad_norm_group import INDEX_GRAD_NORM_GROUP

    class Opt:
        grad_norms_by_group = {INDEX_GRAD_NORM_GROUP: 2.5, "mtp": 9.0}

    hooks = MSATrainingHooks(MSASchedule(MSAConfig()))
    hooks.applied = StepPlan("msa", False)
    hooks.after_train_step(Opt())
    wandb = FakeWandb()
    hooks.log(METRICS, 3, None, wandb, {}, {"lm loss": torch.tensor(1.0)}, skipped_iter=0)
    assert wandb.logged[0][0]["msa/index_grad_norm"] == 2.5 and "msa/mtp" not in wandb.logged[0][0]
    hooks.after_train_step(object())  # global clipping: no group norm, nothing logged
    wandb = FakeWandb()
    hooks.log(METRICS, 4, None, wandb, {}, {"lm loss": torch.tensor(1.0)}, skipped_iter=0)
    assert "msa/index_grad_norm" not in wandb.logged[0][0]


def test_recall_line_and_warmup_flag():
    hooks = MSATrainingHooks(MSASchedule(MSAConfig()))
    hooks.applied = StepPlan("msa_warmup", True)
    wandb = FakeWandb()
    metrics = dict(METRICS, **{"recall": 0.9, "recall/layer_1": 0.85, "recall/layer_2": 0.95})
    line = hooks.log(metrics, 20, None, wandb, {}, {}, skipped_iter=0)
    assert line == " [MSA] iteration       20 | selection recall: 0.9000 | per layer: 1:0.850 2:0.950 |"
    assert wandb.logged[0][0]["msa/sparse"] == 0.0 and wandb.logged[0][0]["msa/recall/layer_2"] == 0.95


def test_nothing_without_metrics():
    hooks = MSATrainingHooks(MSASchedule(MSAConfig()))
    writer, total = FakeWriter(), {}
    assert hooks.log({}, 1, writer, None, total, {"lm loss": torch.tensor(1.0)}, 0) is None
    assert writer.scalars == [] and total == {}


def test_hooks_are_per_run():
    reset_hooks()
    assert hooks_for(SimpleNamespace(msa=None)) is None
    args = SimpleNamespace(msa=MSAConfig().to_dict(), msa_warmup_iters=2, msa_warmup_tokens=None, seq_length=8)
    first = hooks_for(args)
    assert isinstance(first, MSATrainingHooks) and hooks_for(args) is first
    other = SimpleNamespace(**vars(args))
    assert hooks_for(other) is not first
    reset_hooks()

"""The Megatron-LM training-loop patch: pinned, version-guarded, idempotent, reversible; the
wrappers run the MSA hooks around upstream ``train_step`` / ``training_log`` (stand-ins here; the
real ones run in tests/megatron_lm/test_mlm_pretrain_cpu.py) and pass straight through without MSA. Its pins, version guard and reversibility are tested in test_mcore_019_training_pins.py."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from msa_megatron import MSAConfig
from msa_megatron.megatron_lm import hooks as hooks_module
from msa_megatron.patches import mcore_019_training_loop as patch


@pytest.fixture
def run_args(monkeypatch):
    """Megatron's global args and writers for one fake run (msa set by the test)."""
    from megatron.training import global_vars

    args = SimpleNamespace(msa=None, msa_warmup_iters=2, msa_warmup_tokens=None, seq_length=16,
                           consumed_train_samples=0)
    writer = SimpleNamespace(scalars=[], add_scalar=lambda n, v, s: writer.scalars.append((n, v, s)))
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    monkeypatch.setattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", writer)
    monkeypatch.setattr(global_vars, "_GLOBAL_WANDB_WRITER", None)
    hooks_module.reset_hooks()
    yield args, writer
    hooks_module.reset_hooks()


def _stub_like(upstream, record):
    """A stand-in with upstream's signature that records what it was called with."""
    def stub(*args, **kwargs):
        record.append(inspect.signature(upstream).bind(*args, **kwargs).arguments)
        return "upstream result"
    stub.__signature__ = inspect.signature(upstream)
    return stub


def test_train_step_applies_the_plan_first(unpatched, run_args, monkeypatch):
    args, _ = run_args
    args.msa = MSAConfig(recall_interval=3).to_dict()
    seen, plans = [], []
    monkeypatch.setattr(hooks_module.MSATrainingHooks, "before_train_step",
                        lambda self, model, it, consumed: plans.append((model, it, consumed)))
    step = patch._train_step(_stub_like(patch.upstream(f"{patch.TARGET}:train_step"), seen))
    args.consumed_train_samples = 12
    assert step("fwd", "data", ["chunk"], "opt", "sched", "cfg", "fb", iteration=4) == "upstream result"
    assert plans == [(["chunk"], 4, 12)] and seen[0]["iteration"] == 4
    with pytest.raises(RuntimeError, match="without iteration="):
        step("fwd", "data", ["chunk"], "opt", "sched", "cfg", "fb")


def test_training_log_adds_msa_metrics_before_upstream_runs(unpatched, run_args, monkeypatch, capsys):
    args, writer = run_args
    args.msa = MSAConfig().to_dict()
    metrics = {"indexer_kl": 0.25, "indexer_kl/layer_0": 0.25, "recall": 0.75, "recall/layer_0": 0.75}
    monkeypatch.setattr(hooks_module.MSATrainingHooks, "collect", lambda self: dict(metrics))
    seen = []
    upstream = patch.upstream(f"{patch.TARGET}:training_log")

    def fake_training_log(*a, **k):
        bound = inspect.signature(upstream).bind(*a, **k).arguments
        seen.append(dict(bound["total_loss_dict"]))
        print("upstream iteration line")
        return "flag"

    fake_training_log.__signature__ = inspect.signature(upstream)

    log = patch._training_log(fake_training_log)
    total = {}
    result = log({"lm loss": torch.tensor(3.0)}, total, 1e-3, 5, 1.0, False, 0, 1.0, None, None, None)
    assert result == "flag"
    assert set(seen[0]) == {"lm loss", "msa indexer kl"}  # present when upstream prints and resets
    assert ("msa/indexer_kl", 0.25, 5) in writer.scalars and ("msa/recall/layer_0", 0.75, 5) in writer.scalars
    out = capsys.readouterr().out.splitlines()
    assert out == ["upstream iteration line",
                   " [MSA] iteration        5 | selection recall: 0.7500 | per layer: 0:0.750 |"]


def test_without_msa_both_pass_straight_through(unpatched, run_args, monkeypatch):
    _, writer = run_args
    monkeypatch.setattr(hooks_module.MSATrainingHooks, "collect",
                        lambda self: pytest.fail("no MSA: nothing to collect (it is a collective)"))
    seen = []
    step = patch._train_step(_stub_like(patch.upstream(f"{patch.TARGET}:train_step"), seen))
    assert step("fwd", "data", ["chunk"], "opt", "sched", "cfg", "fb") == "upstream result"
    log = patch._training_log(_stub_like(patch.upstream(f"{patch.TARGET}:training_log"), seen))
    total = {}
    assert log({}, total, None, 1, 1.0, False, 0, None, None, None, None) == "upstream result"
    assert total == {} and writer.scalars == [] and len(seen) == 2

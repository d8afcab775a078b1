"""msa_megatron.training.step: the one forward step + loss of msa-train, Megatron-LM's pretrain
script and the multi-GPU validator.

The loss function is checked against its contract (sum, count, [sum, count] report that
survives the schedule's in-place division); the whole step is run through Megatron-Core's
forward_backward_func on two gloo ranks with context parallelism, where the logged loss must be
the token mean over the full sequence and each rank's gradients those of the mean of its
micro-batches' token means (calculate_per_token_loss off, every caller's setting)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from msa_megatron.training.step import LM_LOSS_KEY, MEGATRON_LM_LOSS_KEY, masked_lm_loss

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key", [LM_LOSS_KEY, MEGATRON_LM_LOSS_KEY])
def test_masked_lm_loss_contract(dtype, key):
    g = torch.Generator().manual_seed(3)
    out = (torch.rand(3, 37, generator=g) * 5).to(dtype).requires_grad_(True)
    mask = (torch.rand(3, 37, generator=g) > 0.3).float()
    mask[1] = 0  # one fully masked sequence
    loss, count, report = masked_lm_loss(mask, out, report_key=key)
    want = (out.detach().float() * mask).sum()
    assert loss.dtype == torch.float32 and count.dtype == torch.int32
    assert torch.allclose(loss.detach(), want, rtol=1e-6, atol=1e-5)  # fp32 sum of the same values
    assert int(count) == int(mask.sum())
    assert list(report) == [key] and report[key].dtype == torch.float32
    assert torch.allclose(report[key], torch.stack([want, mask.sum()]), rtol=1e-6, atol=1e-5)
    loss /= torch.clamp(count, min=1)  # what the schedule does next, in place: the report keeps the sum
    assert torch.allclose(report[key][0], want, rtol=1e-6, atol=1e-5)
    loss.backward()
    assert torch.equal(out.grad.float() == 0, mask == 0)  # masked tokens get no gradient


def test_rerun_check_rejects_nan_and_passes_finite(monkeypatch):
    if not torch.cuda.is_available():  # the rerun state machine names the CUDA device in its message
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    out = torch.ones(2, 5)
    mask = torch.ones(2, 5)
    assert float(masked_lm_loss(mask, out, rerun_check=True)[0]) == 10.0
    out[0, 1] = float("nan")
    masked_lm_loss(mask, out)  # unchecked: the caller's own numerics check (msa-train) sees it
    with pytest.raises(RuntimeError, match="NaN in local forward loss"):
        masked_lm_loss(mask, out, rerun_check=True)


class TokenModel(torch.nn.Module):
    """Per-token cross entropy of a position-wise model (no attention: a token's loss does not
    depend on which CP rank holds it), with the GPTModel call signature."""

    def __init__(self, config, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        from megatron.core.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.calls = []

    def set_input_tensor(self, tensor):  # the schedule's pipeline hook (one stage here: unused)
        pass

    def forward(self, tokens, position_ids, attention_mask, labels=None, loss_mask=None):
        self.calls.append((attention_mask, loss_mask))
        logits = self.out(self.emb(tokens) + 0.01 * position_ids[..., None].float())
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def _step_under_cp(rank: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed
    from msa_megatron.training.step import forward_step, global_mean_loss, local_batch

    init_distributed(ParallelLayout(cp=2))
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, context_parallel_size=2)
    model = TokenModel(config)
    g = torch.Generator().manual_seed(7)  # the same full batches on both ranks
    full = []
    for _ in range(2):
        tokens = torch.randint(0, 11, (2, 17), generator=g)
        mask = (torch.rand(2, 16, generator=g) > 0.4).float()
        full.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                     "position_ids": torch.arange(16).expand(2, -1)})
    local = [local_batch(b, clone=True) for b in full]
    reports = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(next(it), m), data_iterator=iter(local), model=[model],
        num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False)
    logged = global_mean_loss(reports, torch.device("cpu"))
    grads = [p.grad.clone() for p in model.parameters()]
    # reference: the full-sequence token mean (logged) and this rank's mean of micro-batch token means (grads)
    model.zero_grad()
    with torch.no_grad():
        full_sum = sum(float((model(b["tokens"], b["position_ids"], None, labels=b["labels"]) * b["loss_mask"]).sum())
                       for b in full)
    full_count = sum(float(b["loss_mask"].sum()) for b in full)
    ref = sum((model(b["tokens"], b["position_ids"], None, labels=b["labels"]) * b["loss_mask"]).sum()
              / b["loss_mask"].sum().clamp(min=1) for b in local) / 2
    ref.backward()
    grad_err = max(float((a - p.grad).abs().max()) for a, p in zip(grads, model.parameters()))
    seen_masks = [m is not None for _, m in model.calls[:2]]
    return dict(logged=logged, want=full_sum / full_count, grad_err=grad_err, local_len=local[0]["tokens"].shape[1],
                passed_loss_mask=all(seen_masks))


@pytest.mark.slow
def test_step_through_megatron_schedule_with_cp():
    results = run_distributed(_step_under_cp, 2)
    for r in results:
        assert r["local_len"] == 8  # Megatron's CP split: half the sequence per rank
        assert math.isclose(r["logged"], r["want"], rel_tol=1e-6), r  # token mean over the full sequences
        assert r["grad_err"] < 1e-6, r
        assert r["passed_loss_mask"]
    assert results[0]["logged"] == results[1]["logged"]


def test_callers_use_the_shared_step():
    """No caller keeps a loss function of its own (the three copies this module replaced)."""
    files = {"msa_megatron/training/loop.py": ("_loss_func", "loss_func"),
             "scripts/pretrain_gpt_msa.py": ("loss_func",), "scripts/multigpu_validate.py": ("loss_func",)}
    for rel, banned in files.items():
        tree = ast.parse((ROOT / rel).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert not defined & set(banned), f"{rel} defines {defined & set(banned)}"
        imported = {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {".step", "msa_megatron.training.step"} & imported, f"{rel} does not import the shared step"

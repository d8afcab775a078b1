"""Registration through Megatron-Core's stock experimental-variant builder, and a GPTModel
with MoE (4 experts, top-2, shared expert, router aux loss) under EP=2: forward/backward,
the KL is present, gradient isolation over the whole model, a distributed-optimizer step.

One spawned 2-process gloo run (TP=1, EP=2, DP=2)."""

from __future__ import annotations

import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV


def _config():
    from mcore_helpers import moe_overrides, msa_settings, tiny_config

    return tiny_config(msa_settings(first_dense_layers=1), num_layers=3, expert_model_parallel_size=2,
                       moe_layer_freq=[0, 1, 1], **moe_overrides(num_experts=4))


def _check_registration(config):
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec as stock_block_spec,
    )
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from msa_megatron.megatron import MSASelfAttention, is_registered, register

    assert config.experimental_attention_variant == "msa"
    assert not is_registered()
    try:  # unpatched Megatron-Core: the experimental builder asserts Transformer Engine
        stock_block_spec(config)
    except AssertionError as exc:
        assert "transformer engine" in str(exc).lower()
    else:
        raise AssertionError("stock builder accepted 'msa' before register()")
    register()
    register()  # idempotent
    block = stock_block_spec(config)
    attention = [spec.submodules.self_attention.module for spec in block.layer_specs]
    assert attention == [SelfAttention, MSASelfAttention, MSASelfAttention], attention
    mlps = [getattr(spec.submodules.mlp, "func", None) for spec in block.layer_specs]
    assert mlps[1] is MoELayer and mlps[2] is MoELayer and mlps[0] is not MoELayer, mlps


def _is_index(name: str) -> bool:
    return ".indexer." in name


def _backward(wrapped, model, loss, finalize):
    wrapped.zero_grad_buffer()
    loss.backward()
    finalize([wrapped])
    return {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}


def _run_b(rank):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from msa_megatron.megatron import collect_msa_metrics
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from mcore_helpers import batch, ddp, gpt, quiet, start

    quiet()
    start(tp=1, ep=2, seed=3)
    config = _config()
    _check_registration(config)

    model = gpt(config)
    assert sum(_is_index(n) for n, _ in model.named_parameters()) == 8  # 4 tensors x 2 MSA layers
    wrapped = ddp(config, model, distributed_optimizer=True)
    tokens, pos, labels = batch(seed=rank)  # different data per data-parallel rank

    def forward():
        collect_msa_metrics()
        return wrapped(tokens, pos, None, labels=labels).mean()

    # Full loss: KL present on both MSA layers, reduced over the 2 ranks.
    MSAKLAutoScaler.set_loss_scale(torch.tensor(1.0))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    loss = forward()
    metrics = collect_msa_metrics(reset=False)
    assert {"indexer_kl/layer_1", "indexer_kl/layer_2"} <= set(metrics) and "indexer_kl/layer_0" not in metrics
    assert metrics["indexer_kl"] > 0 and metrics["main_entropy"] > 0
    full = _backward(wrapped, model, loss, finalize_model_grads)
    for n, g in full.items():
        if _is_index(n):
            assert g.abs().sum() > 0, f"KL gradient missing on {n}"

    # LM loss (+ MoE aux loss) only: no index parameter may move.
    MSAKLAutoScaler.set_loss_scale(torch.tensor(0.0))
    lm = _backward(wrapped, model, forward(), finalize_model_grads)
    assert all(torch.count_nonzero(g) == 0 for n, g in lm.items() if _is_index(n)), "LM loss reached the index branch"
    moved = [n for n, g in lm.items() if not _is_index(n) and torch.count_nonzero(g) > 0]
    assert any("router" in n for n in moved) and any("experts" in n for n in moved) and any("embedding" in n for n in moved)

    # KL only (LM and MoE aux losses scaled to zero): only index parameters may move.
    MSAKLAutoScaler.set_loss_scale(torch.tensor(1.0))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    kl = _backward(wrapped, model, forward() * 0.0, finalize_model_grads)
    leaked = [n for n, g in kl.items() if not _is_index(n) and torch.count_nonzero(g) > 0]
    assert not leaked, f"KL reached non-index parameters: {leaked[:5]}"
    assert all(torch.count_nonzero(g) > 0 for n, g in kl.items() if _is_index(n))

    # A distributed-optimizer step keeps the index parameters identical on every rank.
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0,
                                                 use_distributed_optimizer=True), [wrapped])
    opt.zero_grad()
    _backward(wrapped, model, forward(), finalize_model_grads)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    for n, p in model.named_parameters():
        if _is_index(n):
            copies = [torch.empty_like(p) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(copies, p.detach())
            assert all(torch.equal(copies[0], c) for c in copies), f"{n} differs across ranks after the step"
    collect_msa_metrics()
    return {k: round(v, 6) for k, v in metrics.items()}


def test_registration_and_gpt_moe_expert_parallel():
    results = run_distributed(_run_b, 2, env=ENV, timeout=600)
    assert results[0] == results[1], "metrics are reduced over all ranks, so every rank reports the same"

"""The MoE expert-bias fix: pinned to upstream ``MLP.forward``; without it a local-spec MoE
layer with biases at TP=1 / EP=1 fails in forward (the upstream bug, reproduced), with it
forward and backward run and give the same output as upstream's arithmetic."""

from __future__ import annotations

import inspect

import pytest
import torch

from msa_megatron.patches import mcore_019_moe_bias_inplace as patch
from msa_megatron.patches import source_sha256


def test_upstream_mlp_forward_is_the_pinned_one():
    patch.remove()
    forward = patch.upstream_forward()
    assert source_sha256(forward) == patch.PINNED_SHA256, "upstream MLP.forward changed: re-check the patch"
    assert inspect.getsource(forward).count(patch.BUGGY) == 1


def test_refuses_a_changed_source(monkeypatch):
    patch.remove()
    monkeypatch.setattr(patch, "PINNED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="upstream source of .*MLP.forward changed"):
        patch.apply()
    assert not patch.is_applied()


def _moe_bias_layer(rank):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(), seed=4)
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                            moe_ffn_hidden_size=32, moe_token_dispatcher_type="allgather", add_bias_linear=True,
                            params_dtype=torch.float32, transformer_impl="local")
    layer = get_moe_module_spec(use_te=False, num_experts=4)(config=cfg)
    x = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():  # upstream arithmetic (the in-place add is legal without autograd)
        expected, _ = layer(x)
    try:
        layer(x.clone().requires_grad_(True))
    except RuntimeError as exc:
        upstream_error = str(exc)
    else:
        upstream_error = None

    assert patch.apply() is True and patch.apply() is False
    xg = x.clone().requires_grad_(True)
    out, _ = layer(xg)
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert xg.grad is not None and all(p.grad is not None for p in layer.experts.parameters())
    return upstream_error


def test_fix_for_moe_expert_bias_at_tp1():
    from tests.dist_harness import run_distributed

    (upstream_error,) = run_distributed(_moe_bias_layer, 1)
    assert upstream_error is not None, "upstream no longer fails: the patch may be obsolete"
    assert "is a view and is being modified inplace" in upstream_error

"""The Transformer Engine spec's structure and checkpoint keys, without Transformer Engine.

Megatron-Core defines its TE module names even when TE is absent (stand-in objects), so the
TE ModuleSpecs of an MSA model can be built and inspected on CPU: which module each layer gets
(TE linears and norms, TE dense attention for dense layers and inside MSA's core attention,
fused norm+linear where the layer allows it) and which checkpoint key map it carries.

The key test builds the TE layout with local stand-ins that have TE's parameter names
(``TELayerNormColumnParallelLinear``: ``weight`` + ``layer_norm_weight``; ``TENorm``,
``TELinear``: ``weight``) and checks that its dist-checkpoint keys equal the local spec's, and
that a checkpoint saved in one layout loads into the other. That TE's real modules have these
names (plus ``_extra_state``, FP8 metadata) is what ``scripts/gpu_te_check.py`` verifies on a GPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.dist_harness import run_distributed
from mcore_helpers import ENV


def _config(moe: bool = True, normalization: str = "RMSNorm"):
    from mcore_helpers import moe_overrides, msa_settings, tiny_config

    extra = dict(moe_layer_freq=[0, 0, 1], **moe_overrides(num_experts=4)) if moe else {}
    # layer 0: dense attention + dense MLP; 1: MSA + dense MLP; 2: MSA + MoE (if moe)
    return tiny_config(msa_settings(first_dense_layers=1), num_layers=3, normalization=normalization, **extra)


def _mlp_submodules(mlp_spec):
    assert isinstance(mlp_spec, functools.partial), mlp_spec
    return mlp_spec.keywords["submodules"]


def test_te_spec_modules_per_layer():
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from msa_megatron.megatron import MSASelfAttention
    from msa_megatron.megatron.attention import MSACoreAttention, MSAIndexer
    from msa_megatron.megatron.specs import msa_layer_specs, te_available

    dense, msa_dense_mlp, msa_moe = (s.submodules for s in msa_layer_specs(_config(), TESpecProvider()))

    # dense attention: TE's fused norm + QKV, TE's dense core attention, nothing unfused
    attn = dense.self_attention
    assert attn.module is SelfAttention and attn.metainfo["fuse_input_layernorm"] is True
    assert attn.submodules.linear_qkv is te_ext.TELayerNormColumnParallelLinear
    assert attn.submodules.core_attention is te_ext.TEDotProductAttention
    assert attn.submodules.linear_proj is te_ext.TERowParallelLinear
    assert dense.input_layernorm is IdentityOp and dense.pre_mlp_layernorm is IdentityOp
    fc = _mlp_submodules(dense.mlp)
    assert fc.linear_fc1 is te_ext.TELayerNormColumnParallelLinear and fc.linear_fc2 is te_ext.TERowParallelLinear
    assert dense.sharded_state_dict_keys_map == {}

    # MSA attention: unfused TE norm (the index branch reads the normalised input), TE QKV /
    # output linears, MSA's core attention holding TE's dense attention for 'dense' mode,
    # replicated TE linears + TE norms in the index branch
    for layer in (msa_dense_mlp, msa_moe):
        attn = layer.self_attention
        assert attn.module is MSASelfAttention and attn.metainfo["fuse_input_layernorm"] is False
        assert layer.input_layernorm is te_ext.TENorm
        assert attn.submodules.linear_qkv is te_ext.TEColumnParallelLinear
        assert attn.submodules.linear_proj is te_ext.TERowParallelLinear
        core = attn.submodules.core_attention
        assert core.module is MSACoreAttention and core.submodules.dense_attention is te_ext.TEDotProductAttention
        idx = attn.submodules.indexer
        assert idx.module is MSAIndexer
        assert idx.submodules.index_q is te_ext.TELinear and idx.submodules.index_k is te_ext.TELinear
        # Megatron picks TENorm for q/k-style norms from TE 1.9 on (Apex's FusedLayerNorm before,
        # and when TE is absent: its version then reads 0.0.0)
        qk_norm = te_ext.TENorm if te_available() else FusedLayerNorm
        assert idx.submodules.index_q_norm is qk_norm and idx.submodules.index_k_norm is qk_norm

    fc = _mlp_submodules(msa_dense_mlp.mlp)
    assert msa_dense_mlp.pre_mlp_layernorm is IdentityOp and fc.linear_fc1 is te_ext.TELayerNormColumnParallelLinear
    assert msa_dense_mlp.sharded_state_dict_keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}

    assert msa_moe.mlp.func is MoELayer and msa_moe.pre_mlp_layernorm is te_ext.TENorm
    # both unfused norms keep the local spec's (= fused) checkpoint names
    assert msa_moe.sharded_state_dict_keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def test_local_spec_modules_and_keys_map():
    from megatron.core.transformer.attention import SelfAttention

    from msa_megatron.megatron import MSASelfAttention
    from msa_megatron.megatron.dense_attention import SDPADotProductAttention
    from msa_megatron.megatron.layers import SequenceParallelTorchNorm
    from msa_megatron.megatron.specs import LOCAL_KEYS_MAP, MSALocalSpecProvider, msa_layer_specs

    layers = [s.submodules for s in msa_layer_specs(_config(), MSALocalSpecProvider())]
    assert [layer.self_attention.module for layer in layers] == [SelfAttention, MSASelfAttention, MSASelfAttention]
    assert layers[0].self_attention.submodules.core_attention is SDPADotProductAttention
    assert layers[1].self_attention.submodules.core_attention.submodules.dense_attention is SDPADotProductAttention
    for layer in layers:
        assert layer.input_layernorm is SequenceParallelTorchNorm and layer.pre_mlp_layernorm is SequenceParallelTorchNorm
        assert layer.sharded_state_dict_keys_map == LOCAL_KEYS_MAP


def test_use_te_without_te_is_one_clear_error():
    from msa_megatron.megatron.specs import select_backend, te_available

    if te_available():
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(RuntimeError, match="use_te=True but Transformer Engine is not installed"):
        select_backend(_config(), use_te=True)


# ----------------------------------------------------------------------------- keys (spawned)
def _stand_in_backend():
    """The TE backend's choices (fused norm+linear where possible), built from local modules
    that carry TE's parameter names."""
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from msa_megatron.megatron.specs import MSALocalSpecProvider

    class FP8MetaStandIn(torch.nn.Module):
        """Like TE's per-module FP8 metadata: a checkpoint entry (`_extra_state`) with no weights."""

        def get_extra_state(self):
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            self.loaded = state

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """Stand-in for TELayerNormColumnParallelLinear: norm weight ``layer_norm_weight``
        (+ ``layer_norm_bias`` for LayerNorm), then the column-parallel linear."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.rms = config.normalization == "RMSNorm"
            self.eps = config.layernorm_epsilon
            self.fp8_meta = FP8MetaStandIn()  # an `_extra_state` entry the local spec does not have
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            if not self.rms:
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))

        def forward(self, x, *args, **kwargs):
            if self.rms:
                x = torch.nn.functional.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
            else:
                x = torch.nn.functional.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias,
                                                   self.eps)
            return super().forward(x, *args, **kwargs)

    class StandInTE(MSALocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return LayerNormColumnParallelLinear

    return StandInTE()


def _key_cases(rank: int, tmp: str):
    import torch

    import msa_megatron.megatron.specs as specs
    from mcore_helpers import batch, gpt, quiet, start
    from msa_megatron.megatron import load_model_checkpoint, save_model_checkpoint

    quiet()
    start(seed=5)
    out = {}
    local_select = specs.select_backend

    def build(te_layout: bool, cfg):
        if te_layout:
            specs.select_backend = lambda config, use_te=None: _stand_in_backend()
        try:
            return gpt(cfg)
        finally:
            specs.select_backend = local_select

    def keys(model, extra_state=False):  # the checkpoint keys (after each layer's key map), not the module names
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedBase

        return sorted(v.key for v in nested_values(model.sharded_state_dict())
                      if isinstance(v, ShardedBase) and v.key.endswith("_extra_state") == extra_state)

    def loss(model):
        tokens, pos, labels = batch(seed=3)
        with torch.no_grad():
            return model(tokens, pos, None, labels=labels).float().mean().item()

    for norm in ("RMSNorm", "LayerNorm"):
        cfg = _config(moe=True, normalization=norm)
        local, te = build(False, cfg), build(True, cfg)
        assert any("layer_norm_weight" in n for n, _ in te.named_parameters())  # the fused stand-in is used
        out[f"{norm}_local_keys"], out[f"{norm}_te_keys"] = keys(local), keys(te)
        out[f"{norm}_te_extra_keys"], out[f"{norm}_local_extra_keys"] = keys(te, True), keys(local, True)
        # save in one layout, load in the other: same weights, same loss
        save_model_checkpoint(local, f"{tmp}/{norm}_local")
        load_model_checkpoint(te, f"{tmp}/{norm}_local")
        out[f"{norm}_loss_local"], out[f"{norm}_loss_te_from_local"] = loss(local), loss(te)
        if norm == "RMSNorm":  # msa-train's init_from of a local checkpoint into the TE layout
            from msa_megatron.training.checkpoint import CheckpointManager
            from tests.training.test_config import cfg_of

            te2 = build(True, cfg)
            CheckpointManager(cfg_of(f"run_dir={tmp}/init_run")).load_weights(Path(f"{tmp}/{norm}_local"), [te2])
            out["init_from_loss"] = loss(te2)
            # Megatron-LM's stock TE spec saves a MoE layer's pre-MLP norm as pre_mlp_layernorm.weight:
            # a model built with that name (keys map without the pre-MLP entry) loads into ours
            saved_map = dict(specs.LOCAL_KEYS_MAP)
            specs.LOCAL_KEYS_MAP.pop("pre_mlp_layernorm.")
            try:
                upstream = build(False, cfg)
            finally:
                specs.LOCAL_KEYS_MAP.update(saved_map)
            out["upstream_keys"] = [k for k in keys(upstream) if "pre_mlp_layernorm" in k]
            save_model_checkpoint(upstream, f"{tmp}/upstream")
            ours, te3 = build(False, cfg), build(True, cfg)
            load_model_checkpoint(ours, f"{tmp}/upstream")
            CheckpointManager(cfg_of(f"run_dir={tmp}/init_run2")).load_weights(Path(f"{tmp}/upstream"), [te3])
            out["upstream_losses"] = [loss(upstream), loss(ours), loss(te3)]
        fresh = build(False, cfg)
        save_model_checkpoint(te, f"{tmp}/{norm}_te")
        load_model_checkpoint(fresh, f"{tmp}/{norm}_te")
        out[f"{norm}_local_from_te_equal"] = all(
            torch.equal(a, b) for a, b in zip(local.state_dict().values(), fresh.state_dict().values())
            if torch.is_tensor(a))
    return out


def test_te_layout_has_the_local_checkpoint_keys_and_loads_both_ways(tmp_path):
    from msa_megatron.megatron.specs import te_available

    if te_available():
        # with TE importable, Megatron takes TE code paths that need CUDA; the GPU driver checks the real modules
        pytest.skip("Transformer Engine is installed: scripts/gpu_te_check.py checks the real modules")
    res = run_distributed(_key_cases, 1, str(tmp_path), env=ENV, timeout=240)[0]
    for norm in ("RMSNorm", "LayerNorm"):
        local, te = res[f"{norm}_local_keys"], res[f"{norm}_te_keys"]
        assert local == te, (norm, sorted(set(local) ^ set(te)))
        assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in local  # the MoE layer's pre-MLP norm
        assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in local  # an MSA layer's input norm
        assert abs(res[f"{norm}_loss_local"] - res[f"{norm}_loss_te_from_local"]) < 1e-5, res
        # the TE layout's extra checkpoint entries are only the FP8-metadata stand-ins: loads skip them
        te_only = sorted(set(res[f"{norm}_te_extra_keys"]) - set(res[f"{norm}_local_extra_keys"]))
        assert te_only and all(k.endswith(".fp8_meta._extra_state") for k in te_only), te_only
        assert res[f"{norm}_local_from_te_equal"], norm
    assert abs(res["init_from_loss"] - res["RMSNorm_loss_local"]) < 1e-5, res
    assert "decoder.layers.2.pre_mlp_layernorm.weight" in res["upstream_keys"], res["upstream_keys"]
    up, ours, te = res["upstream_losses"]
    assert abs(ours - up) < 1e-5 and abs(te - up) < 1e-5, res["upstream_losses"]

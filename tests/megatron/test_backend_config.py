"""MSATransformerConfig: one source of truth, validated against the model; bad settings
fail with one error naming the field and the allowed values. In-process (no spawn)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from msa_megatron import MSAConfig, MSAConfigError

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            params_dtype=torch.float32)


def make(msa, **overrides):
    from msa_megatron.megatron.model import make_transformer_config

    values = dict(BASE)
    values.update(overrides)
    return make_transformer_config(msa, **values)


def test_msa_config_selects_the_variant_and_hooks():
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from msa_megatron.megatron.transformer_config import MSATransformerConfig

    cfg = make(MSAConfig(block_size=16, topk=2, index_dim=16, first_dense_layers=3))
    assert isinstance(cfg, MSATransformerConfig)
    # TransformerConfig types the field Literal['gated_delta_net', 'dsa'] but does not check it.
    assert cfg.experimental_attention_variant == "msa"
    assert cfg.experimental_attention_variant_loss_scale_func == MSAKLAutoScaler.set_loss_scale
    assert cfg.msa.num_index_heads == 2 and cfg.msa_layer_indices == [3]
    assert cfg.transformer_impl == "local" and cfg.attention_dropout == 0.0
    assert cfg.hetereogenous_dist_checkpoint
    replaced = dataclasses.replace(cfg, hidden_size=128)  # replace keeps msa and re-validates
    assert replaced.msa == cfg.msa and replaced.experimental_attention_variant == "msa"


def test_flat_values_and_dense():
    cfg = make({"block_size": 32, "topk": 4, "index_dim": 32, "mode": "msa_warmup"})
    assert cfg.msa == MSAConfig(block_size=32, topk=4, index_dim=32, mode="msa_warmup", num_index_heads=2)
    dense = make(None)
    assert dense.msa is None and dense.experimental_attention_variant is None
    assert dense.experimental_attention_variant_loss_scale_func is None and dense.msa_layer_indices == []


@pytest.mark.parametrize(
    "msa_values, overrides, field, allowed",
    [
        ({"block_size": 24}, {}, "block_size", "a positive multiple of 16"),
        ({"block_size": 0}, {}, "block_size", "a positive multiple of 16"),
        ({"topk": 0}, {}, "topk", "an integer >= 1"),
        ({"num_index_heads": 4}, {}, "num_index_heads", "2 (one index head per KV group) or null"),
        ({"mode": "sparse"}, {}, "mode", "one of dense, msa_warmup, msa"),
        ({"msa_layers": [1, 5]}, {}, "msa_layers", "layer indices in [0, 3]"),
        ({"first_dense_layers": 6}, {}, "first_dense_layers", "an integer in [0, 4]"),
        ({}, {"tensor_model_parallel_size": 4, "num_query_groups": 2, "num_attention_heads": 8},
         "num_index_heads", "a multiple of the tensor-parallel size 4"),
        ({"unknown_key": 1}, {}, "unknown_key", "an existing field"),
    ],
)
def test_invalid_msa_settings_name_the_field(msa_values, overrides, field, allowed):
    with pytest.raises(MSAConfigError) as info:
        make(msa_values, **overrides)
    assert info.value.field_name == field
    assert allowed in str(info.value)
    assert str(info.value).startswith(f"msa.{field}=")


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"attention_dropout": 0.1}, "attention_dropout", "0.0"),
        ({"multi_latent_attention": True}, "multi_latent_attention", "False"),
        ({"experimental_attention_variant": "dsa"}, "experimental_attention_variant", "None or 'msa'"),
    ],
)
def test_model_settings_msa_cannot_run(overrides, field, allowed):
    with pytest.raises((ValueError, AssertionError)) as info:
        make({"block_size": 16, "topk": 2, "index_dim": 16}, **overrides)
    assert field in str(info.value) and allowed in str(info.value)


def test_variant_without_msa_settings():
    with pytest.raises(MSAConfigError, match=r"msa\.msa=None .* an MSAConfig when experimental_attention_variant='msa'"):
        make(None, experimental_attention_variant="msa")


def test_set_attention_mode_rejects_unknown_modes():
    from msa_megatron.megatron import set_attention_mode

    with pytest.raises(MSAConfigError, match=r"msa\.mode='fast' is invalid: allowed values are one of dense, msa_warmup, msa"):
        set_attention_mode(torch.nn.Linear(2, 2), "fast")


def test_set_kl_coeff_replaces_each_layers_msa_config():
    """The run-time KL coefficient (attention.kl_schedule) reaches every MSA core attention,
    other MSA fields kept; a bad value fails MSAConfig's check. Bare core attentions: no
    model build needed."""
    from msa_megatron.megatron import MSACoreAttention, set_kl_coeff

    cores = []
    for topk in (2, 3):
        core = MSACoreAttention.__new__(MSACoreAttention)
        torch.nn.Module.__init__(core)
        core.msa = MSAConfig(topk=topk)
        cores.append(core)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), *cores)
    assert set_kl_coeff(model, 0.25) == 2
    assert [(c.msa.kl_coeff, c.msa.topk) for c in cores] == [(0.25, 2), (0.25, 3)]
    assert set_kl_coeff([torch.nn.Linear(2, 2)], 0.5) == 0  # no MSA layer on this stage: legal
    with pytest.raises(MSAConfigError, match="kl_coeff"):
        set_kl_coeff(model, -1.0)


def test_metric_names_and_means_without_distributed():
    from msa_megatron.megatron.metrics import TRACKER, collect_msa_metrics

    collect_msa_metrics()
    t = torch.tensor
    TRACKER.record(3, 5, t(0.5), t(2.0), t(3.0))
    TRACKER.record(3, 5, t(1.5), t(4.0), t(5.0), recall=t(0.8))
    TRACKER.record(4, 5, t(1.0), t(1.0), t(1.0))
    TRACKER.record(1, 5, t(2.0))  # msa.track_entropy=false: KL only
    m = collect_msa_metrics()
    assert m == pytest.approx({
        "indexer_kl/layer_3": 1.0, "index_entropy/layer_3": 3.0, "main_entropy/layer_3": 4.0, "recall/layer_3": 0.8,
        "indexer_kl/layer_4": 1.0, "index_entropy/layer_4": 1.0, "main_entropy/layer_4": 1.0,
        "indexer_kl/layer_1": 2.0,
        "indexer_kl": 4.0 / 3.0, "index_entropy": 2.0, "main_entropy": 2.5, "recall": 0.8,
    })
    assert collect_msa_metrics() == {}

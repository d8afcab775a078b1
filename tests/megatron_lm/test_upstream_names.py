"""The flat names of the upstream Megatron-LM proposal (PR #5336: msa_block_size,
msa_num_selected_blocks, msa_indexer_head_dim, msa_loss_coeff, msa_warmup) load here, both as
Megatron-LM flags and as TransformerConfig keyword arguments, and land in the one MSAConfig;
disagreeing spellings of one setting are one error naming both. In-process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlm_helpers import BASE_ARGV, MSA_ARGV, megatron_parser, parse
from msa_megatron import MSAConfig
from msa_megatron.upstream_names import ALIASES, fold_upstream

UPSTREAM_KWARGS = dict(msa_block_size=64, msa_num_selected_blocks=4, msa_indexer_head_dim=32, msa_loss_coeff=0.5,
                       msa_warmup=True)
EXPECTED = dict(block_size=64, topk=4, index_dim=32, kl_coeff=0.5, mode="msa_warmup")
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             params_dtype=torch.float32, attention_dropout=0.0)


def test_the_alias_table_is_the_upstream_list():
    assert [(a.name, a.field) for a in ALIASES] == [
        ("msa_block_size", "block_size"), ("msa_num_selected_blocks", "topk"), ("msa_indexer_head_dim", "index_dim"),
        ("msa_loss_coeff", "kl_coeff"), ("msa_warmup", "mode")]
    fields = {f.name for f in dataclasses.fields(MSAConfig)}
    assert all(a.field in fields for a in ALIASES)


@pytest.mark.parametrize("ours, upstream, result", [
    ({}, {"msa_warmup": False}, {"mode": "msa"}),
    ({"mode": "dense"}, {"msa_warmup": False}, {"mode": "dense"}),  # not warmup: agrees with dense
    ({"mode": "msa_warmup"}, {"msa_warmup": True}, {"mode": "msa_warmup"}),
    ({"topk": 8}, {"msa_num_selected_blocks": 8, "msa_loss_coeff": None}, {"topk": 8}),
])
def test_fold(ours, upstream, result):
    assert fold_upstream(ours, upstream) == result


# ----------------------------------------------------------------------------- TransformerConfig kwargs
def test_upstream_kwargs_build_the_msa_config():
    from msa_megatron.megatron import MSATransformerConfig

    cfg = MSATransformerConfig(experimental_attention_variant="msa", **UPSTREAM_KWARGS, **MODEL)
    assert cfg.msa == MSAConfig(num_index_heads=2, **EXPECTED)
    assert cfg.msa_layer_indices == [0, 1, 2, 3]
    assert all(getattr(cfg, name) is None for name in UPSTREAM_KWARGS)  # folded: msa is the one source
    assert dataclasses.replace(cfg, hidden_size=128).msa == cfg.msa
    # with a nested msa too: agreeing values are fine, the rest comes from msa
    both = MSATransformerConfig(experimental_attention_variant="msa", msa={"topk": 4, "first_dense_layers": 1},
                                msa_num_selected_blocks=4, **MODEL)
    assert both.msa.topk == 4 and both.msa_layer_indices == [1, 2, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(msa={"topk": 8}, msa_num_selected_blocks=4),
     "msa_num_selected_blocks=4 conflicts with msa.topk=8: both set MSAConfig.topk"),
    (dict(msa={"mode": "dense"}, msa_warmup=True), "msa_warmup=True conflicts with msa.mode='dense'"),
    (dict(msa_num_selected_blocks=0), r"msa_num_selected_blocks=0 is invalid \(MSAConfig.topk\): allowed values are "
                                      "an integer >= 1"),
    (dict(msa_warmup="yes"), "msa.mode='yes' is invalid: allowed values are true or false for msa_warmup"),
])
def test_upstream_kwargs_errors(kwargs, message):
    from msa_megatron.megatron import MSATransformerConfig

    with pytest.raises(ValueError, match=message):
        MSATransformerConfig(experimental_attention_variant="msa", **kwargs, **MODEL)


def test_upstream_kwargs_need_the_msa_variant():
    from msa_megatron.megatron import MSATransformerConfig

    with pytest.raises(ValueError, match="msa_block_size=64 set with experimental_attention_variant=None: allowed "
                                         "value is 'msa'"):
        MSATransformerConfig(msa_block_size=64, **MODEL)


# ----------------------------------------------------------------------------- Megatron-LM flags
def test_upstream_flags_reach_the_config_the_layers_read(monkeypatch):
    from megatron.training.argument_utils import core_transformer_config_from_args

    from msa_megatron.megatron import MSATransformerConfig

    assert "--msa-num-selected-blocks" in megatron_parser().format_help()
    args = parse(BASE_ARGV + MSA_ARGV + ["--msa-block-size", "64", "--msa-num-selected-blocks", "4",
                                         "--msa-indexer-head-dim", "32", "--msa-loss-coeff", "0.5", "--msa-warmup",
                                         "--msa-warmup-iters", "3"], monkeypatch)
    assert args.msa == MSAConfig(**EXPECTED).to_dict() and args.msa_warmup_iters == 3
    config = core_transformer_config_from_args(args, config_class=MSATransformerConfig)
    assert config.msa == MSAConfig(num_index_heads=2, **EXPECTED)


@pytest.mark.parametrize("extra, message", [
    (["--msa-topk", "8", "--msa-num-selected-blocks", "4"],
     "--msa-num-selected-blocks=4 conflicts with --msa-topk=8: both set MSAConfig.topk"),
    (["--msa-mode", "dense", "--msa-warmup"], "--msa-warmup=True conflicts with --msa-mode='dense'"),
    (["--msa-loss-coeff", "-2"], r"--msa-loss-coeff=-2.0 is invalid \(MSAConfig.kl_coeff\): allowed values are a "
                                 "finite float >= 0"),
])
def test_upstream_flag_errors_name_the_flags(monkeypatch, extra, message):
    with pytest.raises(ValueError, match=message):
        parse(BASE_ARGV + MSA_ARGV + extra, monkeypatch)


def test_upstream_flags_without_the_variant_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="--msa-num-selected-blocks=4 is invalid: allowed values are unset unless "
                                         "--experimental-attention-variant msa"):
        parse(BASE_ARGV + ["--attention-dropout", "0.0", "--msa-num-selected-blocks", "4"], monkeypatch)

"""Build Megatron-Core GPT models, dense or MSA, from one config type.

``make_transformer_config(msa, **kwargs)`` gives an :class:`MSATransformerConfig` (``msa``
None = dense); ``build_gpt_model(config, ...)`` gives a ``GPTModel`` for one pipeline stage
(or virtual stage), dense MLP or MoE, local or TE backend. Dense and MSA models built here
have identical module trees except for the attention of MSA layers, so dense checkpoints
load into MSA models (see :mod:`msa_megatron.megatron.convert`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Union

from megatron.core.models.gpt import GPTModel

from ..config import MSAConfig
from .kl_loss import MSAKLAutoScaler
from .registry import get_decoder_block_spec
from .specs import te_available
from .transformer_config import MSA_VARIANT, MSATransformerConfig

log = logging.getLogger("msa_megatron.megatron")


def make_transformer_config(msa: Optional[Union[MSAConfig, Mapping[str, Any]]], **transformer_config_kwargs) -> MSATransformerConfig:
    """MSATransformerConfig from an MSAConfig (or its fields as a mapping, or None for dense)
    and TransformerConfig keyword arguments.

    Defaults that differ from TransformerConfig's: ``transformer_impl='local'`` (the backend
    that runs everywhere; build_gpt_model(use_te=True) switches it) and
    ``attention_dropout=0.0`` (MSA has no attention dropout; dense baselines match)."""
    transformer_config_kwargs.setdefault("transformer_impl", "local")
    transformer_config_kwargs.setdefault("attention_dropout", 0.0)
    return MSATransformerConfig(msa=msa, **transformer_config_kwargs)


def dense_config_of(config: MSATransformerConfig, **overrides) -> MSATransformerConfig:
    """The dense twin of an MSA config (same model, ``msa=None``)."""
    changes = dict(msa=None, experimental_attention_variant=None, hetereogenous_dist_checkpoint=False)
    if config.experimental_attention_variant_loss_scale_func is MSAKLAutoScaler.set_loss_scale:
        changes["experimental_attention_variant_loss_scale_func"] = None
    changes.update(overrides)
    return dataclasses.replace(config, **changes)


def build_gpt_model(
    config,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: bool = False,
    **gpt_kwargs,
) -> GPTModel:
    """GPTModel for this pipeline stage with dense or MSA attention (``config.msa``), dense
    MLP or MoE (``config.num_moe_experts``), on the local backend or Transformer Engine.

    ``gpt_kwargs`` go to GPTModel (``position_embedding_type`` defaults to 'rope').
    ``config.transformer_impl`` is set to match ``use_te``."""
    impl = "transformer_engine" if use_te else "local"
    if use_te and not te_available():
        raise RuntimeError("build_gpt_model(use_te=True) needs Transformer Engine (pip install "
                           "transformer-engine[pytorch]); use use_te=False for the local backend")
    if config.transformer_impl != impl:
        log.info("build_gpt_model: setting transformer_impl=%r (use_te=%s)", impl, use_te)
        config.transformer_impl = impl
    if getattr(config, "experimental_attention_variant", None) == MSA_VARIANT and getattr(config, "msa", None) is None:
        raise TypeError("experimental_attention_variant='msa' needs an MSATransformerConfig with msa set "
                        "(make_transformer_config(msa=MSAConfig(...), ...))")
    block_spec = get_decoder_block_spec(config, use_te=use_te, vp_stage=vp_stage)
    gpt_kwargs.setdefault("position_embedding_type", "rope")
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **gpt_kwargs,
    )
    apply_rope_scaling(model, config)
    return model


def apply_rope_scaling(model: GPTModel, config) -> None:
    """Llama 3.x RoPE scaling (``config.rope_llama3_scaling``): the model's RoPE inverse
    frequencies go through Megatron's ``RotaryEmbedding._apply_scaling`` with all four
    parameters (GPTModel's own ``rope_scaling`` flag passes only the factor and fixes the
    others at Llama 3.1's 1 / 4 / 8192). The MSA index branch uses the same RoPE."""
    spec = getattr(config, "rope_llama3_scaling", None)
    if not spec:
        return
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or not hasattr(rope, "_apply_scaling") or getattr(model, "rotary_scaling", False):
        raise ValueError("rope_llama3_scaling needs position_embedding_type='rope' (Megatron's RotaryEmbedding) "
                         "without GPTModel's rope_scaling flag: allowed combination is rope + rope_llama3_scaling only")
    rope.inv_freq = rope._apply_scaling(rope.inv_freq, **{k: spec[k] for k in spec})


__all__ = ["apply_rope_scaling", "build_gpt_model", "dense_config_of", "make_transformer_config"]

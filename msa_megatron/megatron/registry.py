"""``register()``: make Megatron-Core accept ``experimental_attention_variant='msa'``, and
:func:`get_decoder_block_spec`, the block spec every model builder of this package uses.

Applies the version-pinned patches in ``msa_megatron/patches/`` (idempotent): the MSA registration in
Megatron-Core's experimental-variant spec builders, and the fix for local-spec MoE experts
with biases at TP=1 that MSA's MoE models would otherwise hit. After it, Megatron-Core's
``get_transformer_block_with_experimental_attention_variant_spec(config)`` (what
Megatron-LM's GPT builder calls) builds MSA layers for an :class:`MSATransformerConfig`.

Import direction (tests/test_import_graph.py): registry -> patches -> specs, registry -> specs;
specs never imports the registry or the patches.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("msa_megatron.megatron")
_registered = False


def register() -> None:
    """Register MSA with Megatron-Core (safe to call more than once)."""
    global _registered
    if _registered:
        return
    from ..patches import mcore_019_moe_bias_inplace, mcore_019_msa_registration

    applied = [name for name, patch in (("msa_registration", mcore_019_msa_registration),
                                        ("moe_bias_inplace", mcore_019_moe_bias_inplace)) if patch.apply()]
    _registered = True
    if applied:
        log.warning("MSA: registered with Megatron-Core (patches applied: %s)", ", ".join(applied))


def is_registered() -> bool:
    return _registered


def get_decoder_block_spec(config, use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                           pp_rank: Optional[int] = None):
    """Decoder block spec (``TransformerBlockSubmodules``) of this pipeline stage, dense or MSA.

    MSA configs go through Megatron-Core's experimental-variant builder (after register());
    dense configs on TE use Megatron's stock GPT block spec; dense configs on the local
    backend use :func:`~msa_megatron.megatron.specs.msa_layer_specs` (same modules as the
    stock local spec, plus sequence-parallel support). Lives here, not in specs.py, because
    it needs :func:`register`, whose patch builds on specs.py."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from .specs import _is_local, local_layer_ids, msa_layer_specs, select_backend
    from .transformer_config import MSA_VARIANT

    if getattr(config, "experimental_attention_variant", None) == MSA_VARIANT:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        register()
        return get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage=vp_stage,
                                                                               pp_rank=pp_rank)
    backend = select_backend(config, use_te)
    if not _is_local(backend):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=config.normalization,
                                          qk_l2_norm=config.qk_l2_norm, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = msa_layer_specs(config, backend)
    return TransformerBlockSubmodules(
        layer_specs=[specs[i] for i in local_layer_ids(config, vp_stage, pp_rank)],
        layer_norm=backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False),
    )


__all__ = ["get_decoder_block_spec", "is_registered", "register"]

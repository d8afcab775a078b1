"""``register()``: make Megatron-Core accept ``experimental_attention_variant='msa'``.

Applies the version-pinned patches in ``msa_megatron/patches/`` (idempotent): the MSA registration in
Megatron-Core's experimental-variant spec builders, and the fix for local-spec MoE experts
with biases at TP=1 that MSA's MoE models would otherwise hit. After it, Megatron-Core's
``get_transformer_block_with_experimental_attention_variant_spec(config)`` (what
Megatron-LM's GPT builder calls) builds MSA layers for an :class:`MSATransformerConfig`.
"""

from __future__ import annotations

import logging

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


__all__ = ["is_registered", "register"]

"""Fused dense core attention for the local (non-TE) backend: torch SDPA at CP = 1.

Megatron's local :class:`DotProductAttention` materialises the ``[b, heads, s, s]`` scores
(16 x 32K x 32K fp32 = 64 GiB at 32K tokens), so without Transformer Engine a dense layer
cannot train at the context lengths MSA is for. :class:`SDPADotProductAttention` is the same
module (same constructor, same (empty) state dict, so checkpoints are unchanged) whose CP = 1
forward is ``torch.nn.functional.scaled_dot_product_attention``: flash / cuDNN / memory-efficient
kernels on CUDA, O(s) memory. Under context parallelism it is exactly the inherited
:class:`~msa_megatron.megatron.cp_dense_attention.CPDotProductAttention` path.

What runs is logged once per (device, dtype). Settings SDPA cannot express (a sliding window
from ``config.window_size``, ``softmax_type`` other than 'vanilla') run Megatron's unfused
attention and say so once; unsupported inputs (attention_bias, cross attention) are refused
with one clear error. Packed sequences (``packed_seq_params``, THD or msa_megatron's sbhd form)
take the inherited document path (:meth:`CPDotProductAttention.packed_forward`): SDPA would need
an [s, s] document mask, so torch varlen flash (THD on CUDA) or the MSA op's dense mode with
``doc_start`` runs instead, logged once (docs/packed.md section 4).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from .cp_dense_attention import CPDotProductAttention

log = logging.getLogger("msa_megatron.megatron")
_announced: set = set()

#: Mask types the SDPA path accepts (others are refused at build time).
SUPPORTED_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary)


def _once(tag: str, level: int, message: str, *args) -> None:
    if tag not in _announced:
        _announced.add(tag)
        log.log(level, message, *args)


def fused_kernels_eligible(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, attn_mask: Optional[Tensor],
                           dropout_p: float) -> str:
    """Which fused SDPA kernels accept these inputs on CUDA (for the one-time log line); on CPU
    SDPA has its own fused (flash) CPU kernel. Best effort: the query API differs across torch
    versions, and it only feeds a log line."""
    if q.device.type != "cuda":
        return "cpu kernel"
    try:
        from torch.backends import cuda as bc

        try:
            params = bc.SDPAParams(q, k, v, attn_mask, dropout_p, is_causal, False)
        except TypeError:  # torch < 2.5: no enable_gqa argument
            params = bc.SDPAParams(q, k, v, attn_mask, dropout_p, is_causal)
        names = []
        for name, can, enabled in (("flash", bc.can_use_flash_attention, bc.flash_sdp_enabled),
                                   ("cudnn", getattr(bc, "can_use_cudnn_attention", None),
                                    getattr(bc, "cudnn_sdp_enabled", None)),
                                   ("efficient", bc.can_use_efficient_attention, bc.mem_efficient_sdp_enabled)):
            if can is not None and enabled is not None and enabled() and can(params, False):
                names.append(name)
        return ", ".join(names) if names else "NONE (math backend: materialises S x S)"
    except Exception as exc:  # noqa: BLE001 - logging aid only
        return f"unknown ({type(exc).__name__})"


class SDPADotProductAttention(CPDotProductAttention):
    """Megatron's local core attention on torch SDPA (CP = 1); the CP path under context parallelism.

    Same numerics as :class:`DotProductAttention` (softmax scale incl. query-key layer
    scaling, GQA, attention dropout under the same RNG tracker) without the S x S scores."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        if attention_type != "self":
            raise ValueError(f"attention_type={attention_type!r} is not supported by the SDPA core attention: "
                             "allowed value is 'self'")
        if attn_mask_type not in SUPPORTED_MASK_TYPES:
            raise ValueError(f"attn_mask_type={attn_mask_type} is not supported by the SDPA core attention: allowed "
                             f"values are {', '.join(t.name for t in SUPPORTED_MASK_TYPES)}")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.unfused_reason = None
        if windowed:
            self.unfused_reason = f"window_size={config.window_size}"
        elif config.softmax_type != "vanilla":
            self.unfused_reason = f"softmax_type={config.softmax_type!r}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        if self.cp_size > 1 or packed_seq_params is not None:  # CP, or documents: the inherited paths
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by the SDPA core attention (local backend)")
        if self.unfused_reason is not None:
            _once(f"unfused-{self.unfused_reason}", logging.WARNING,
                  "dense attention: %s cannot run on torch SDPA; Megatron's unfused DotProductAttention runs instead "
                  "(materialises the S x S scores)", self.unfused_reason)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type)

        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, hq, d = query.shape
        sk, g = key.shape[0], key.shape[2]
        is_causal, sdpa_mask = False, None
        if mask_type == AttnMaskType.causal:
            if attention_mask is not None:
                _once("causal-mask-ignored", logging.WARNING,
                      "dense attention (SDPA): attn_mask_type=causal applies its own causal mask and ignores "
                      "attention_mask (as TE and Megatron's fused causal softmax do)")
            if sq == sk:
                is_causal = sq > 1
            elif sq != 1:  # sq == 1: one decoding step sees every cached key, as in DotProductAttention
                raise ValueError(f"causal SDPA attention needs as many queries as keys (or one query); got {sq} queries "
                                 f"and {sk} keys")
        elif mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary):
            if attention_mask is None:
                raise ValueError(f"attn_mask_type={mask_type.name} needs an attention_mask (bool, True = masked out); "
                                 "got None")
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask dtype {attention_mask.dtype} is not supported by the SDPA core "
                                 "attention: allowed dtype is torch.bool (True = masked out)")
            sdpa_mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.no_mask:
            if attention_mask is not None:
                raise ValueError("attn_mask_type=no_mask with an attention_mask: pass attn_mask_type=padding or "
                                 "arbitrary to apply it")
        else:
            raise ValueError(f"attn_mask_type={mask_type} is not supported by the SDPA core attention: allowed values "
                             f"are {', '.join(t.name for t in SUPPORTED_MASK_TYPES)}")

        q = query.permute(1, 2, 0, 3)  # [b, hq, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, g, sk, d]
        v = value.permute(1, 2, 0, 3)
        if hq != g:  # GQA: expand K/V to the query heads (a copy of the small K/V; every SDPA kernel accepts it)
            k = k.repeat_interleave(hq // g, dim=1)
            v = v.repeat_interleave(hq // g, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        tag = f"sdpa-{query.device.type}-{query.dtype}"
        if tag not in _announced:
            _announced.add(tag)
            log.info("dense attention: torch SDPA on %s %s (%s, GQA %d:%d, head dim %d); fused kernels eligible: %s",
                        query.device.type, str(query.dtype).replace("torch.", ""),
                        "causal" if is_causal else mask_type.name, hq, g, d,
                        fused_kernels_eligible(q, k, v, is_causal, sdpa_mask, dropout_p))

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=self.cp_softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # the RNG stream DotProductAttention's dropout uses
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


__all__ = ["SDPADotProductAttention", "SUPPORTED_MASK_TYPES", "fused_kernels_eligible"]

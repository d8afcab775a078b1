"""Dense core attention that also runs under context parallelism (the local backend).

Megatron's ``DotProductAttention`` refuses CP > 1; :class:`CPDotProductAttention` is the
same module at CP = 1 and, at CP > 1, the MSA op's dense mode on K/V all-gathered by the
production CP seam (:mod:`msa_megatron.megatron.context_parallel`). Used for the dense
layers of MSA models, MSA layers in 'dense' mode, and as the base class of
:class:`~msa_megatron.megatron.dense_attention.SDPADotProductAttention`.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

from torch import Tensor

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import MSAConfig
from ..ops import msa_attention
from .context_parallel import gather_kv_for_cp
from .packed import cu_seqlens_of, dense_with_documents, document_starts, packed_format

log = logging.getLogger("msa_megatron.megatron")
_WARNED = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


class CPDotProductAttention(DotProductAttention):
    """Megatron's local core attention that also runs under context parallelism.

    CP = 1: exactly :class:`DotProductAttention` (same constructor, same forward). CP > 1
    (where DotProductAttention refuses to build): K/V are all-gathered over the CP group in
    global order and the MSA op's dense mode runs this rank's queries at their global
    positions; the backward reduce-scatters dK/dV to their owners. Exact causal attention,
    so it equals CP = 1 up to summation order. With ``packed_seq_params`` (any CP size):
    causal attention inside each document (:meth:`packed_forward`). For the dense layers of
    MSA models (and MSA layers in 'dense' mode) on the local backend; Transformer Engine
    brings its own CP."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None
        cp_size = cp_group.size() if cp_group is not None else config.context_parallel_size
        base_config = config
        if cp_size > 1:
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            refused = {
                "attention_dropout": (dropout, 0.0),
                "softmax_type": (config.softmax_type, "vanilla"),
                "window_size": (config.window_size, None),
                "attn_mask_type": (attn_mask_type, AttnMaskType.causal),
                "attention_type": (attention_type, "self"),
            }
            for name, (value, allowed) in refused.items():
                if value != allowed:
                    raise ValueError(f"{name}={value!r} is not supported by the local core attention under context "
                                     f"parallelism (context_parallel_size={cp_size}): allowed value is {allowed!r} "
                                     "(or use Transformer Engine)")
            if cp_group is None:
                raise ValueError("CPDotProductAttention under context parallelism needs pg_collection.cp")
            base_config = copy.copy(config)  # DotProductAttention asserts CP == 1 at build time
            base_config.context_parallel_size = 1
        super().__init__(base_config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        self.cp_group, self.cp_size = cp_group, cp_size
        # DotProductAttention divides its scale by the layer number and multiplies it back in
        # the softmax with apply_query_key_layer_scaling: the op takes the effective scale.
        self.cp_softmax_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)
        msa = getattr(config, "msa", None)
        self.op_config = msa if isinstance(msa, MSAConfig) else MSAConfig()  # dispatch only: dense mode

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            return self.packed_forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
        if self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("the local core attention under context parallelism does not support "
                                      "attention_bias (use Transformer Engine)")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"the local core attention under context parallelism is causal; got {attn_mask_type}")
        if attention_mask is not None:
            _warn_once("cp-mask", "local core attention under CP applies its own causal mask and ignores "
                                  "attention_mask (as TE's causal attention does)")
        sq, b = query.shape[:2]
        q = query.transpose(0, 1).contiguous()
        k_full, v_full, _, q_pos = gather_kv_for_cp(key.transpose(0, 1).contiguous(),
                                                    value.transpose(0, 1).contiguous(), None, self.cp_group)
        out, _ = msa_attention(q, k_full, v_full, None, None, self.op_config, q_pos=q_pos, mode="dense",
                               softmax_scale=self.cp_softmax_scale)
        return out.transpose(0, 1).reshape(sq, b, -1)

    def packed_forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                       attn_mask_type: Optional[AttnMaskType], attention_bias: Optional[Tensor],
                       packed_seq_params) -> Tensor:
        """Causal attention inside each document of ``packed_seq_params`` (THD ``[t, heads, d]``
        or msa_megatron's sbhd form, docs/packed.md section 4), at any CP size: torch varlen
        flash for a THD row on CUDA, else the MSA op's dense mode with ``doc_start``."""
        fmt = packed_format(packed_seq_params)
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout:
            raise ValueError(f"attention_dropout={dropout} with packed_seq_params is not supported by the local core "
                             "attention: allowed value is 0.0")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias with packed_seq_params is not supported by the local core "
                                      "attention: allowed value is None")
        if self.attn_mask_type != AttnMaskType.causal or attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"attn_mask_type={attn_mask_type or self.attn_mask_type} with packed_seq_params: allowed "
                             "value is causal (documents are causal inside)")
        if self.config.window_size is not None or self.config.softmax_type != "vanilla":
            raise ValueError(f"window_size={self.config.window_size!r} / softmax_type={self.config.softmax_type!r} with "
                             "packed_seq_params: allowed values are None / 'vanilla'")
        if attention_mask is not None:
            _warn_once("packed-mask", "local core attention with packed_seq_params ignores attention_mask: documents "
                                      "come from cu_seqlens")
        thd = fmt == "thd"
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b = query.shape[:2]
        q = query.transpose(0, 1).contiguous()
        k = key.transpose(0, 1).contiguous()
        v = value.transpose(0, 1).contiguous()
        q_pos = None
        if self.cp_size > 1:
            k, v, _, q_pos = gather_kv_for_cp(k, v, None, self.cp_group)
        doc_start = document_starts(packed_seq_params, b, k.shape[1], q_pos, self.cp_size, q.device)
        out = dense_with_documents(q, k, v, doc_start, self.cp_softmax_scale, self.op_config, q_pos=q_pos,
                                   thd_cu=cu_seqlens_of(packed_seq_params) if thd else None)
        return out.transpose(0, 1).reshape(sq, b, -1)


def cp_capable_core_attention(spec):
    """Megatron's local DotProductAttention (a class or a ModuleSpec of it) -> the CP-capable
    :class:`CPDotProductAttention`; anything else (TE's attention, which has its own CP) is
    returned unchanged."""
    if spec is DotProductAttention:
        return CPDotProductAttention
    if isinstance(spec, ModuleSpec) and spec.module is DotProductAttention:
        return ModuleSpec(module=CPDotProductAttention, params=spec.params, submodules=spec.submodules)
    return spec


__all__ = ["CPDotProductAttention", "cp_capable_core_attention"]

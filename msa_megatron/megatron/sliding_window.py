"""Sliding-window causal attention as a Megatron-Core core attention: the paper's
FLOP-matched baseline for MSA (issue 10).

:class:`SlidingWindowAttention` takes Megatron's ``[s, b, heads, d]`` q/k/v and attends each
query to the keys at positions ``t - window + 1 .. t``. One implementation on every
device: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean band mask
(cached per length and device); which path runs is logged once, nothing falls back.
Packed documents (``packed_seq_params``, docs/packed.md section 4): the band intersected with
each query's document (a [b, 1, s, s] mask, the size class of the band mask itself).

:func:`build_swa_gpt_model` builds the dense model of :func:`~msa_megatron.megatron.model.build_gpt_model`
with this core attention in the chosen layers (the layers MSA would use, so the first dense
layers of an MSA model stay dense in the baseline too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from .packed import document_starts, packed_format

log = logging.getLogger("msa_megatron.megatron")
_announced: set = set()


def band_mask(seq_len: int, window: int, device) -> Tensor:
    """[s, s] bool, True where key j is visible to query t: t - window < j <= t."""
    t = torch.arange(seq_len, device=device)
    diff = t[:, None] - t[None, :]
    return (diff >= 0) & (diff < window)


class SlidingWindowAttention(MegatronModule):
    """Causal GQA attention over the last ``window`` keys (the query's own position included)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, window: int = 0):
        super().__init__(config=config)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window={window!r} is invalid: allowed values are integers >= 1")
        if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"sliding-window attention is causal self-attention; got attention_type={attention_type!r}, "
                             f"attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout} is invalid for sliding-window attention: allowed value is 0.0")
        if config.context_parallel_size > 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size} is invalid for sliding-window "
                             "attention: allowed value is 1")
        self.window = window
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self._masks: Dict[Tuple[int, str], Tensor] = {}

    def _mask(self, s: int, device) -> Tensor:
        key = (s, str(device))
        if key not in self._masks:
            self._masks[key] = band_mask(s, self.window, device)
        return self._masks[key]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("sliding-window attention does not support attention_bias: allowed value is None")
        thd = packed_format(packed_seq_params) == "thd"
        if thd:  # [t, heads, d]: one packed row
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b, hq, d = query.shape
        g = key.shape[2]
        if key.shape[0] != sq:
            raise ValueError(f"sliding-window attention is self-attention: {sq} queries vs {key.shape[0]} keys")
        tag = f"swa-{query.device.type}"
        if tag not in _announced:
            _announced.add(tag)
            log.info("sliding-window attention: window %d via torch SDPA with a band mask on %s (%s)",
                     self.window, query.device.type, query.dtype)
        q = query.permute(1, 2, 0, 3)  # [b, hq, s, d]
        k = key.permute(1, 2, 0, 3).repeat_interleave(hq // g, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(hq // g, dim=1)
        mask = self._mask(sq, query.device)
        if packed_seq_params is not None:  # the window intersected with the query's document
            doc_start = document_starts(packed_seq_params, b, sq, None, 1, query.device)  # [b, s]
            keys = torch.arange(sq, device=query.device)
            mask = (mask[None] & (keys[None, None, :] >= doc_start[:, :, None]))[:, None]  # [b, 1, s, s]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


def with_sliding_window(layer_spec: ModuleSpec, window: int) -> ModuleSpec:
    """A copy of a TransformerLayer spec whose self-attention core is sliding-window."""
    attn = layer_spec.submodules.self_attention
    core = ModuleSpec(module=SlidingWindowAttention, params={"window": int(window)})
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn))


def build_swa_gpt_model(config, window: int, swa_layers: Iterable[int], vocab_size: int, max_sequence_length: int,
                        pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                        use_te: bool = False, **gpt_kwargs) -> GPTModel:
    """Dense GPTModel (local backend) with sliding-window attention in the 0-based global
    layers ``swa_layers`` and full causal attention elsewhere."""
    from .registry import get_decoder_block_spec
    from .specs import local_layer_ids

    if use_te:
        raise ValueError("use_te=True is invalid for sliding-window attention: allowed value is False (local backend)")
    if getattr(config, "msa", None) is not None:
        raise ValueError("sliding-window models are dense: pass a config with msa=None")
    config.transformer_impl = "local"
    block = get_decoder_block_spec(config, use_te=False, vp_stage=vp_stage)
    swa = set(swa_layers)
    ids = local_layer_ids(config, vp_stage)
    block.layer_specs = [with_sliding_window(spec, window) if i in swa else spec for spec, i in zip(block.layer_specs, ids)]
    gpt_kwargs.setdefault("position_embedding_type", "rope")
    from .model import apply_rope_scaling

    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
                     vp_stage=vp_stage, **gpt_kwargs)
    apply_rope_scaling(model, config)
    return model


__all__ = ["SlidingWindowAttention", "band_mask", "build_swa_gpt_model", "with_sliding_window"]

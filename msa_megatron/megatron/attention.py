"""MSA self-attention for Megatron-Core: Megatron's SelfAttention plus MSA's index branch.

Structure (built from a ModuleSpec, see :mod:`msa_megatron.megatron.specs`)::

    MSASelfAttention (subclass of megatron SelfAttention)
      linear_qkv, linear_proj, q/k_layernorm   Megatron's own, TP-sharded by head
      indexer: MSAIndexer                      index_q: hidden -> n_kv x di, index_k: hidden -> di,
                                               no bias, per-head RMSNorm(di), the model's (partial) RoPE
      core_attention: MSACoreAttention         [sq, b, heads, d] -> msa_megatron.ops.msa_attention
        dense_attention                        Megatron's core attention, used in 'dense' mode

MSASelfAttention.forward computes the index branch from the *detached* hidden states
(stop-gradient: the KL trains only the index branch), hands iq/ik to the core attention and
delegates everything else (QKV projection, RoPE, output projection) to Megatron's forward.

Tensor-parallel layout of the index branch: both index projections and their norms are
replicated on every TP rank. Each rank computes all index heads from its input and keeps
the heads of its own KV groups (MSA requires n_kv % tp == 0; MSAConfig.validate_for_model
checks it); the shared index key is used whole. Gradients end up identical on all TP ranks:

* without sequence parallelism the index outputs pass through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), so each
  rank's weight gradient is the sum of every rank's KL contribution;
* with sequence parallelism the projections and norms run on the local sequence shard and
  ``gather_from_sequence_parallel_region`` (backward: reduce-scatter) assembles the sequence;
  the parameters are marked ``sequence_parallel`` so ``finalize_model_grads`` sums them over TP.

Selection then needs no communication: the KV groups of a rank are complete on that rank.

Context parallelism (issue 8, docs/context_parallel.md): :meth:`MSACoreAttention.context_parallel_inputs`
all-gathers K/V/ik over the module's CP group in global order
(:func:`~msa_megatron.megatron.context_parallel.gather_kv_for_cp`) and the op runs the local
queries at their global positions. Dense attention under CP on the local backend (Megatron's
DotProductAttention refuses CP) is :class:`~msa_megatron.megatron.cp_dense_attention.CPDotProductAttention`
(its own module; re-exported here): the op's dense mode on the gathered K/V. With CP = 1 every path is the one used before CP existed.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from ..ops import naive
from ..config import ATTENTION_MODES, MSAConfig, MSAConfigError
from ..ops import msa_attention, resolve_backend
from ..ops.decode_naive import msa_decode_naive
from ..patches import mcore_019_index_grad_norm_group as index_grad_norm_group
from .context_parallel import gather_kv_and_select_for_cp, gather_kv_for_cp, zigzag_positions
from .cp_dense_attention import CPDotProductAttention, cp_capable_core_attention  # noqa: F401 (re-exported)
from .kl_loss import attach_kl_loss
from .metrics import TRACKER
from .packed import check_layout, document_starts, packed_format

log = logging.getLogger("msa_megatron.megatron")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _msa_config_of(config) -> MSAConfig:
    msa = getattr(config, "msa", None)
    if not isinstance(msa, MSAConfig):
        raise TypeError(
            "MSA layers need an MSATransformerConfig with msa=MSAConfig(...) "
            f"(got {type(config).__name__} with msa={msa!r})"
        )
    return msa


def check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise MSAConfigError("mode", mode, "one of " + ", ".join(ATTENTION_MODES))
    return mode


# ----------------------------------------------------------------------------- index branch
@dataclass
class MSAIndexerSubmodules:
    """index_q / index_k: replicated linears (IndexLinear or TELinear(duplicated));
    index_q_norm / index_k_norm: norm builders (RMSNorm over the index dim)."""

    index_q: Any = None
    index_k: Any = None
    index_q_norm: Any = None
    index_k_norm: Any = None


class MSAIndexer(MegatronModule):
    """Index queries (one head per KV group) and the shared index key, from detached input."""

    def __init__(self, config, submodules: MSAIndexerSubmodules, pg_collection):
        super().__init__(config=config)
        msa = _msa_config_of(config)
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.num_heads = msa.num_index_heads
        self.index_dim = msa.index_dim
        self.index_rope = msa.index_rope
        self.stop_gradient = msa.index_stop_gradient
        if self.num_heads % tp_size != 0:  # validated by the config; guards direct construction
            raise MSAConfigError("num_index_heads", self.num_heads, f"a multiple of the TP size {tp_size}")
        self.local_heads = self.num_heads // tp_size
        self.head_offset = tp_rank * self.local_heads
        linear_kwargs = dict(
            config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
            skip_weight_param_allocation=False, parallel_mode="duplicated", is_expert=False,
        )
        self.index_q = build_module(submodules.index_q, config.hidden_size, self.num_heads * self.index_dim,
                                    tp_comm_buffer_name="msa_index_q", **linear_kwargs)
        self.index_k = build_module(submodules.index_k, config.hidden_size, self.index_dim,
                                    tp_comm_buffer_name="msa_index_k", **linear_kwargs)
        norm_config = copy.copy(config)  # the index norms are RMSNorm whatever the model uses
        norm_config.normalization = "RMSNorm"
        self.index_q_norm = build_module(submodules.index_q_norm, config=norm_config, hidden_size=self.index_dim,
                                         eps=config.layernorm_epsilon)
        self.index_k_norm = build_module(submodules.index_k_norm, config=norm_config, hidden_size=self.index_dim,
                                         eps=config.layernorm_epsilon)
        if msa.index_grad_clip == "separate":  # clipped by their own norm: the KL never scales the backbone's step
            index_grad_norm_group.tag(self.parameters())

    def forward(self, hidden_states: Tensor, rotary_pos_emb=None, mscale: float = 1.0,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """hidden_states [s(/tp under SP), b, h] -> iq [s, b, local groups, di], ik [s, b, di].
        ``cu_seqlens`` (THD packed rows, b = 1): RoPE per document, as Megatron's attention
        applies it to the main branch's q/k."""
        # stop-gradient: the KL never reaches the backbone (off only for the fidelity ablation)
        x = hidden_states.detach() if self.stop_gradient else hidden_states
        s, b = x.shape[:2]
        g, di = self.num_heads, self.index_dim
        iq, _ = self.index_q(x)
        ik, _ = self.index_k(x)
        iq = self.index_q_norm(iq.view(s, b, g, di))
        ik = self.index_k_norm(ik.view(s, b, 1, di))
        both = torch.cat([iq, ik], dim=2)  # one collective for both
        if self.config.sequence_parallel:
            both = gather_from_sequence_parallel_region(both, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            both = copy_to_tensor_model_parallel_region(both, group=self.tp_group)
        iq = both[:, :, self.head_offset:self.head_offset + self.local_heads]
        ik = both[:, :, g:]
        if self.index_rope and rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
            for emb in (q_emb, k_emb):
                if emb is not None and emb.shape[-1] > di:
                    raise MSAConfigError(
                        "index_dim", di, f"an integer >= the RoPE dimension {emb.shape[-1]} of the model "
                        "(the index branch applies the model's partial RoPE), or set msa.index_rope=false"
                    )
            cp_group = self.pg_collection.cp

            def rope(x: Tensor, emb: Tensor) -> Tensor:
                if cu_seqlens is None:
                    return apply_rotary_pos_emb(x, emb, config=self.config, mscale=mscale, cp_group=cp_group)
                # THD: [t, 1, heads, di] -> Megatron's THD apply on [t, heads, di] (per-document positions)
                return apply_rotary_pos_emb(x.squeeze(1), emb, config=self.config, cu_seqlens=cu_seqlens,
                                            mscale=mscale, cp_group=cp_group).unsqueeze(1)

            if q_emb is not None:
                iq = rope(iq, q_emb)
            if k_emb is not None:
                ik = rope(ik, k_emb)
        return iq, ik.squeeze(2)


# ----------------------------------------------------------------------------- core attention
@dataclass
class MSACoreAttentionSubmodules:
    """dense_attention: Megatron's core attention (DotProductAttention / TEDotProductAttention),
    run in 'dense' mode so that a converted model reproduces its dense parent exactly."""

    dense_attention: Any = None


class MSACoreAttention(MegatronModule):
    """Megatron core-attention interface over the MSA op.

    Receives q [sq, b, hq, d], k/v [sk, b, g, d] (RoPE applied, local heads of this TP rank)
    and the index inputs, returns [sq, b, hq * d]. In msa modes it records the layer's
    statistics and attaches ``kl_coeff * KL`` to the backward of its output."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 cp_comm_type: Optional[str] = None, softmax_scale: Optional[float] = None,
                 pg_collection=None, submodules: Optional[MSACoreAttentionSubmodules] = None):
        super().__init__(config=config)
        self.msa = _msa_config_of(config)
        if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"MSA is causal self-attention; got attention_type={attention_type!r}, "
                             f"attn_mask_type={attn_mask_type}")
        self.layer_number = layer_number
        self.layer_index = layer_number - 1  # 0-based global index used in metric names
        self.mode = check_mode(self.msa.mode)
        self.sample_recall = False
        #: A list: every forward in mode msa / msa_warmup appends {"layer_index", "block_size",
        #: "block_idx" [b, g, sq, K]} (modes.set_selection_capture; the passkey probe's needle
        #: diagnostic). None (default): nothing is kept.
        self.capture_selection: Optional[list] = None
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size()
        self.cp_group = pg_collection.cp
        self.cp_size = self.cp_group.size()
        self.cp_select_first = False  # select-first overlap under CP (modes.set_cp_select_overlap)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if submodules is None or submodules.dense_attention is None:
            raise ValueError("MSACoreAttention needs submodules.dense_attention (Megatron's core attention)")
        dense_spec = submodules.dense_attention
        if self.cp_size > 1:  # 'dense' mode under CP: Megatron's local attention cannot, its CP twin can
            dense_spec = cp_capable_core_attention(dense_spec)
        self.dense_attention = build_module(
            dense_spec, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type=attention_type, cp_comm_type=cp_comm_type, softmax_scale=softmax_scale,
            pg_collection=pg_collection,
        )
        self._index_inputs: Optional[Tuple[Tensor, Tensor]] = None
        self._inference_offset: Optional[int] = None  # KV-cache inference: position of the first new token

    # -- index inputs handed over by MSASelfAttention
    def set_index_inputs(self, iq: Tensor, ik: Tensor) -> None:
        self._index_inputs = (iq, ik)

    def clear_index_inputs(self) -> None:
        self._index_inputs = None
        self._inference_offset = None

    def set_inference_offset(self, offset: int) -> None:
        """The next forward is a KV-cache step: its queries sit at positions offset.. and
        key/value/index_key hold the whole cache (positions 0..offset + sq - 1)."""
        self._inference_offset = int(offset)

    def pending_index_kwargs(self) -> Dict[str, Tensor]:
        """The index inputs as keyword tensors, for Megatron's checkpointed core attention."""
        if self._index_inputs is None:
            return {}
        return {"index_query": self._index_inputs[0], "index_key": self._index_inputs[1]}

    # -- seam for context parallelism (issue 8)
    def context_parallel_inputs(self, k: Tensor, v: Tensor, ik: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Keys the op attends over and the global positions of the local queries.

        k, v [b, s_local, g, d], ik [b, s_local, di] are this rank's chunk. Under CP this must
        return K/V/ik gathered over the CP group in global token order and ``q_pos`` [sq] (int64)
        with the global positions of this rank's queries (the contract of
        ``msa_megatron.megatron.context_parallel.gather_kv_for_cp``); without CP the chunk is
        the whole sequence and ``q_pos=None`` means positions 0..s-1."""
        if self.cp_size == 1:
            return k, v, ik, None
        return gather_kv_for_cp(k, v, ik, self.cp_group)

    def kl_weight(self, batch: int, local_queries: int) -> float:
        """Factor on this rank's mean KL so that gradients match the global objective.

        Each TP rank holds 1/tp of the groups and the TP backward sums their gradients, hence
        1/tp; CP ranks are summed by DP x CP gradient averaging with the schedule's CP factor,
        hence 1/cp. With per-token loss the schedules normalise by the token count, so the KL is
        summed over this rank's query tokens instead of averaged."""
        w = self.msa.kl_coeff / self.tp_size
        if self.config.calculate_per_token_loss:
            return w * batch * local_queries
        return w / self.cp_size

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None, index_query: Optional[Tensor] = None,
                index_key: Optional[Tensor] = None) -> Tensor:
        if self.mode == "dense":
            return self.dense_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                        attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        thd = packed_format(packed_seq_params) == "thd"
        if packed_seq_params is not None and self._inference_offset is not None:
            raise NotImplementedError("MSA KV-cache inference does not support packed_seq_params: allowed value is None")
        if attention_bias is not None:
            raise NotImplementedError("MSA layers do not support attention_bias")
        if self._inference_offset is not None and self.capture_selection is not None:
            _warn_once("capture_inference", "selection capture is on, but KV-cache inference steps capture nothing "
                                            "(only full-sequence forwards do)")
        if self._inference_offset is not None and self.mode == "msa_warmup":
            # warmup's main branch is dense: the layer decodes as Megatron's dense attention
            return self.dense_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                        attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        # KV-cache steps after the prefill come with no_mask (Megatron's convention): the
        # positions of the queries make them causal here.
        if attn_mask_type not in (None, AttnMaskType.causal) and not (
                self._inference_offset is not None and attn_mask_type == AttnMaskType.no_mask):
            raise ValueError(f"MSA is causal; got attn_mask_type={attn_mask_type}")
        if attention_mask is not None:
            _warn_once("mask", "MSA layers apply their own causal mask and ignore attention_mask (as TE's causal "
                               "attention does); documents come from packed_seq_params (docs/packed.md)")
        if index_query is None:
            if self._index_inputs is None:
                raise RuntimeError("MSACoreAttention called without index inputs: MSASelfAttention provides them")
            index_query, index_key = self._index_inputs
        if self._inference_offset is not None:
            return self.inference_forward(query, key, value, index_query, index_key, self._inference_offset)
        if thd:  # Megatron hands THD as [t, heads, d]: one packed row (b = 1)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b = query.shape[:2]
        q = query.transpose(0, 1).contiguous()
        k = key.transpose(0, 1).contiguous()
        v = value.transpose(0, 1).contiguous()
        iq = index_query.transpose(0, 1).contiguous()
        ik = index_key.transpose(0, 1).contiguous()
        op_kw = dict(mode=self.mode, softmax_scale=self.softmax_scale, compute_recall=self.sample_recall)
        if self.cp_size > 1 and self.cp_select_first:
            doc_start = None
            if packed_seq_params is not None:  # the selection needs the documents before the gather
                s_local = k.shape[1]
                doc_start = document_starts(packed_seq_params, b, s_local * self.cp_size,
                                            zigzag_positions(s_local, self.cp_size, self.cp_group.rank(), q.device),
                                            self.cp_size, q.device)
            k, v, ik, q_pos, block_idx = gather_kv_and_select_for_cp(k, v, iq, ik, self.msa, self.cp_group,
                                                                     doc_start=doc_start)
            op_kw["block_idx"] = block_idx
        else:
            k, v, ik, q_pos = self.context_parallel_inputs(k, v, ik)
            doc_start = document_starts(packed_seq_params, b, k.shape[1], q_pos, self.cp_size, q.device)
        out, aux = msa_attention(q, k, v, iq, ik, self.msa, q_pos=q_pos, doc_start=doc_start, **op_kw)
        out = out.transpose(0, 1).reshape(sq, b, -1)
        # Record statistics once per micro-batch: skip the no-grad first pass of activation
        # recomputation (training mode with grad disabled); the recompute records instead.
        grad_on = torch.is_grad_enabled()
        if self.capture_selection is not None and (grad_on or not self.training):
            self._capture(aux.block_idx, thd)
        if grad_on or not self.training:
            entropy = self.msa.track_entropy
            TRACKER.record(self.layer_index, self.config.num_layers, aux.kl,
                           aux.stats["index_entropy"] if entropy else None,
                           aux.stats["main_entropy"] if entropy else None, aux.stats.get("recall"))
        if self.training and grad_on and aux.kl is not None and aux.kl.requires_grad:
            out = attach_kl_loss(out, aux.kl * self.kl_weight(b, sq))
        return out

    def _capture(self, block_idx: Tensor, thd: bool) -> None:
        """Append this forward's selection to ``capture_selection``. Only the whole sequence
        on one rank (CP = 1, not THD-packed) has query index = position, which the needle
        diagnostic relies on; otherwise nothing is captured, said once."""
        if self.cp_size > 1 or thd:
            why = f"context parallelism (cp={self.cp_size})" if self.cp_size > 1 else "THD-packed sequences"
            _warn_once("capture_layout", f"selection capture is on, but MSA layers capture nothing under {why}: "
                                         "the needle diagnostic needs cp=1 and unpacked batches")
            return
        self.capture_selection.append({"layer_index": self.layer_index, "block_size": self.msa.block_size,
                                       "block_idx": block_idx.detach()})

    def inference_forward(self, query: Tensor, key: Tensor, value: Tensor, index_query: Tensor, index_key: Tensor,
                          offset: int) -> Tensor:
        """One KV-cache step in mode msa (docs/decoding.md). query [sq, b, hq, d] at positions
        offset..offset+sq-1; key/value [offset+sq, b, g, d] and index_key [offset+sq, b, di]: the
        whole cache. One new token per sequence after a prefill: the decode op (Triton kernel on
        CUDA, ops/decode_naive.py elsewhere); otherwise (prefill, chunked prefill) the MSA op
        at those positions without the KL. No statistics are recorded."""
        sq, b = query.shape[:2]
        sk = key.shape[0]
        if sk != offset + sq or index_key.shape[0] != sk:
            raise RuntimeError(f"KV-cache step: {sq} queries at offset {offset} need {offset + sq} cached keys and index "
                               f"keys; got {sk} and {index_key.shape[0]}")
        backend = _inference_backend(self.msa, query.device)
        with torch.no_grad():
            if sq == 1 and offset > 0:
                out = msa_decode(query[0], key, value, index_query[0], index_key, sk, self.msa,
                                 softmax_scale=self.softmax_scale, backend=backend)[0]
                return out.reshape(1, b, -1)
            q = query.transpose(0, 1).contiguous()
            k = key.transpose(0, 1).contiguous()
            v = value.transpose(0, 1).contiguous()
            iq = index_query.transpose(0, 1).contiguous()
            ik = index_key.transpose(0, 1).contiguous()
            q_pos = torch.arange(offset, sk, device=q.device)
            if backend == "triton":
                from ..ops.triton_op import msa_attention_triton

                out, _ = msa_attention_triton(q, k, v, iq, ik, self.msa, q_pos=q_pos, mode="msa",
                                              softmax_scale=self.softmax_scale, compute_kl=False)
            else:
                block_idx = naive.select(iq, ik, self.msa, q_pos)
                out, _ = naive.sparse_attention(q, k, v, block_idx, self.msa.block_size, q_pos, self.softmax_scale)
        return out.transpose(0, 1).reshape(sq, b, -1)


def _inference_backend(cfg: MSAConfig, device: torch.device) -> str:
    """'triton' or 'reference' for a KV-cache step (the op's own rule: msa.backend, CUDA).
    A seam: the interpreter tests route the Megatron path through the kernels on CPU."""
    return resolve_backend(cfg, device)


def msa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, iq: Tensor, ik_cache: Tensor, seq_lens, cfg: MSAConfig,
               softmax_scale: Optional[float] = None, backend: Optional[str] = None):
    """One decode step over Megatron's sequence-first caches: (out [b, hq, d], lse [b, hq],
    block_idx [b, g, K]); see :mod:`msa_megatron.ops.decode_naive` for the layout.
    ``backend`` None: per msa.backend and the device (Triton kernel on CUDA)."""
    backend = backend or resolve_backend(cfg, q.device)
    if backend == "triton":
        from ..ops.triton_decode import msa_decode_triton

        return msa_decode_triton(q, k_cache, v_cache, iq, ik_cache, seq_lens, cfg, softmax_scale=softmax_scale)
    return msa_decode_naive(q, k_cache, v_cache, iq, ik_cache, seq_lens, cfg, softmax_scale=softmax_scale)


# ----------------------------------------------------------------------------- self attention
@dataclass
class MSASelfAttentionSubmodules(SelfAttentionSubmodules):
    indexer: Any = None


class MSASelfAttention(SelfAttention):
    """Megatron SelfAttention whose core attention is MSA, plus the index branch."""

    def __init__(self, config, submodules: MSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, **kwargs):
        msa = _msa_config_of(config)
        if not msa.is_msa_layer(layer_number - 1):
            raise ValueError(f"layer {layer_number - 1} is not an MSA layer per msa.msa_layers/first_dense_layers; "
                             "the spec builder gives it dense attention")
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, **kwargs)
        if not isinstance(self.core_attention, MSACoreAttention):
            raise TypeError(f"MSASelfAttention needs MSACoreAttention as core_attention, got "
                            f"{type(self.core_attention).__name__}")
        if submodules.indexer is None:
            raise ValueError("MSASelfAttention needs submodules.indexer")
        self.indexer = build_module(submodules.indexer, config=config, pg_collection=self.pg_collection)

    @property
    def mode(self) -> str:
        return self.core_attention.mode

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        context = inference_context if inference_context is not None else inference_params
        if self.mode != "dense":
            if packed_seq_params is not None and context is not None:
                raise NotImplementedError("MSA KV-cache inference does not support packed_seq_params: allowed value "
                                          "is None")
            check_layout(packed_seq_params, self.core_attention.cp_size)
            rope = rotary_pos_emb
            if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
                rope = None  # this layer skips RoPE in the main branch, so does its index branch
            if context is not None:
                self._check_inference_context(context)
            if context is not None and self.mode == "msa_warmup":
                self.core_attention.set_inference_offset(context.sequence_len_offset)  # dense main branch
            elif context is not None:
                start = context.sequence_len_offset
                end = start + hidden_states.shape[0]
                iq, ik = self.indexer(hidden_states, _rope_slice(rope, start, end),
                                      mscale=getattr(self, "_yarn_concentration_factor", 1.0))
                self.core_attention.set_index_inputs(iq, self._index_key_cache(context, ik, start, end))
                self.core_attention.set_inference_offset(start)
            else:
                iq, ik = self.indexer(hidden_states, rope, mscale=getattr(self, "_yarn_concentration_factor", 1.0),
                                      cu_seqlens=_thd_rope_cu_seqlens(packed_seq_params))
                self.core_attention.set_index_inputs(iq, ik)
        try:
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states, inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                inference_params=inference_params,
            )
        finally:
            self.core_attention.clear_index_inputs()

    # -- KV-cache inference (docs/decoding.md)
    def _check_inference_context(self, context) -> None:
        """MSA decoding runs with Megatron's static inference context only (one length for
        the whole batch, contiguous per-layer caches); anything else is one clear error."""
        if not context.is_static_batching():
            raise NotImplementedError(
                f"MSA layers in mode {self.mode!r} support Megatron-Core's StaticInferenceContext only, not "
                f"{type(context).__name__} (paged KV blocks have no index-key cache yet); use StaticInferenceContext "
                "or set_attention_mode(model, 'dense')")
        if self.config.flash_decode:
            raise NotImplementedError(f"MSA layers in mode {self.mode!r} do not support flash_decode=True (Megatron's "
                                      "flash-decode path bypasses the core attention); set flash_decode=False")
        if self.core_attention.cp_size > 1:
            raise NotImplementedError(f"MSA KV-cache inference does not support context parallelism "
                                      f"(context_parallel_size={self.core_attention.cp_size}); use 1")

    def _index_key_cache(self, context, ik: Tensor, start: int, end: int) -> Tensor:
        """Append this step's index keys ik [sq, b, di] to the layer's index-key cache and
        return the cache of this batch up to ``end`` [end, b, di]. The cache sits in
        ``context.key_value_memory_dict`` under ("msa_index_key", layer_number) as a pair
        (cache [max_seq, max_batch, di], an empty [0, max_batch] stand-in), so Megatron's
        swap_key_value_dict (beam search) reorders it with the K/V caches."""
        key = ("msa_index_key", self.layer_number)
        if key not in context.key_value_memory_dict:
            memory = torch.empty(context.max_sequence_length, context.max_batch_size, ik.shape[-1],
                                 dtype=ik.dtype, device=ik.device)
            context.key_value_memory_dict[key] = (memory, memory.new_empty(0, context.max_batch_size))
        memory = context.key_value_memory_dict[key][0]
        b0 = context.batch_size_offset
        b1 = b0 + ik.shape[1]
        if end > memory.shape[0] or b1 > memory.shape[1]:
            raise ValueError(f"KV-cache step past the inference context: positions up to {end}, batch up to {b1}; "
                             f"max_sequence_length={memory.shape[0]}, max_batch_size={memory.shape[1]}")
        memory[start:end, b0:b1] = ik
        return memory[:end, b0:b1]

    def _checkpointed_attention_forward(self, *args, core_attention_extra_kwargs=None, **kwargs):
        # Recomputed core attention must see iq/ik as checkpoint inputs, not the cleared stash.
        extra = dict(core_attention_extra_kwargs or {})
        extra.update(self.core_attention.pending_index_kwargs())
        return super()._checkpointed_attention_forward(*args, core_attention_extra_kwargs=extra, **kwargs)


def _thd_rope_cu_seqlens(packed_seq_params) -> Optional[Tensor]:
    """The cu_seqlens Megatron's attention applies RoPE with in THD (the padded ones when set),
    so that the index branch uses exactly the main branch's per-document positions."""
    if packed_format(packed_seq_params) != "thd":
        return None
    p = packed_seq_params
    return p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q


def _rope_slice(rope, start: int, end: int):
    """Rotary embedding(s) [max_seq, 1, 1, rot] of positions start..end-1 (Megatron hands the
    attention the whole context's table in inference and slices it in the K/V update)."""
    if rope is None:
        return None
    if isinstance(rope, tuple):
        return tuple(None if r is None else r[start:end] for r in rope)
    return rope[start:end]


__all__ = [
    "CPDotProductAttention", "MSACoreAttention", "MSACoreAttentionSubmodules", "MSAIndexer", "MSAIndexerSubmodules",
    "MSASelfAttention", "MSASelfAttentionSubmodules", "check_mode", "cp_capable_core_attention", "msa_decode",
]

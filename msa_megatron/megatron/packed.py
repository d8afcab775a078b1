"""Packed sequences (documents) in the Megatron backend: ``PackedSeqParams`` -> ``doc_start``.

docs/packed.md has the spec (section 1) and this layer's design (section 4). Every core
attention of the backend (MSA in every mode, the SDPA / CP dense attention, sliding window)
turns Megatron's ``packed_seq_params`` into one tensor, ``doc_start [b, sq]`` (the global
position of the first token of each local query's document), and hands it to the op.

Two layouts are accepted (anything else is one error naming the field):

* ``qkv_format='thd'`` (Megatron's packed format, CP = 1): tensors ``[t, heads, d]``, one
  row of ``t`` tokens, documents from ``cu_seqlens_q_padded`` when set (then per-document
  padding sits at the end of its document) else ``cu_seqlens_q``; tokens at or after
  ``cu[-1]`` form one trailing document. Megatron applies RoPE per document.
* ``qkv_format='sbhd'`` with ``cu_seqlens_q`` (msa_megatron's form for context parallelism,
  pipelines with micro-batches > 1): tensors keep ``[s, b, heads, d]``, ``cu_seqlens`` count
  over the ``b`` rows of ``S`` tokens laid end to end (row r covers ``r*S .. (r+1)*S - 1``);
  a document never crosses a row (it is cut at the row start). RoPE uses global positions,
  which gives the same scores as per-document positions up to rounding (RoPE is relative
  and only same-document pairs are scored). Under CP the rows are cut by msa_megatron's
  sequence-level zigzag (``context_parallel.zigzag_positions``), so documents may cross CP
  chunks; the local queries' ``doc_start`` comes from their global positions.

Refused with one line each: ``cu_seqlens_q != cu_seqlens_kv`` (self-attention only), THD
under context parallelism (Megatron's THD CP layout splits *each document* over the ranks,
TE's per-document split, which the MSA CP seam does not implement), hybrid CP
(``local_cp_size``).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import naive as reference
from ..config import MSAConfig
from ..ops import msa_attention, resolve_backend

log = logging.getLogger("msa_megatron.megatron")
_announced: set = set()

#: packed_seq_params.qkv_format values the backend accepts.
PACKED_FORMATS = ("thd", "sbhd")


def _once(key: str, message: str, *args) -> None:
    if key not in _announced:
        _announced.add(key)
        log.info(message, *args)


def packed_format(packed_seq_params) -> Optional[str]:
    """'thd', 'sbhd' or None (no packed_seq_params); any other qkv_format is an error."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", None)
    if fmt not in PACKED_FORMATS:
        raise ValueError(f"packed_seq_params.qkv_format={fmt!r} is not supported by msa_megatron's core attention: "
                         f"allowed values are {', '.join(repr(f) for f in PACKED_FORMATS)}")
    return fmt


def check_layout(packed_seq_params, cp_size: int) -> None:
    """THD under context parallelism is Megatron's per-document CP split: one clear error
    (called before anything else touches the tensors, e.g. the index branch's RoPE)."""
    if packed_format(packed_seq_params) == "thd" and cp_size > 1:
        raise ValueError(
            f"packed_seq_params.qkv_format='thd' with context_parallel_size={cp_size} is not supported: Megatron's "
            "THD layout under CP splits each document over the ranks (TE's per-document split); msa_megatron "
            "cuts the sequence by its zigzag: use qkv_format='sbhd' with cu_seqlens over the rows, or CP = 1")


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a.to(b.device, torch.long), b.long())))


def cu_seqlens_of(packed_seq_params) -> Tensor:
    """The document boundaries [n_docs + 1] (int64): the padded cu_seqlens when given, else
    cu_seqlens_q; checked equal to the key side (self-attention)."""
    p = packed_seq_params
    if not _same(p.cu_seqlens_q, p.cu_seqlens_kv):
        raise ValueError("packed_seq_params.cu_seqlens_q != cu_seqlens_kv: msa_megatron's core attention is "
                         "self-attention over one packing; allowed: cu_seqlens_kv equal to cu_seqlens_q (or None)"
                         if p.cu_seqlens_kv is not None else
                         "packed_seq_params.cu_seqlens_kv is None while cu_seqlens_q is set: allowed: equal tensors")
    if not _same(getattr(p, "cu_seqlens_q_padded", None), getattr(p, "cu_seqlens_kv_padded", None)):
        raise ValueError("packed_seq_params.cu_seqlens_q_padded != cu_seqlens_kv_padded: allowed: equal tensors (or "
                         "both None)")
    cu = p.cu_seqlens_q_padded if getattr(p, "cu_seqlens_q_padded", None) is not None else p.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None: allowed values are int tensors [n_docs + 1] "
                         "starting at 0")
    return cu.flatten().long()


def document_starts(packed_seq_params, batch: int, seq_len: int, q_pos: Optional[Tensor], cp_size: int,
                    device: torch.device) -> Optional[Tensor]:
    """doc_start [batch, sq] (int64, global key coordinates) of the local queries, or None.

    ``seq_len``: keys per row (after the CP gather: the whole sequence); ``q_pos``: global
    positions of the local queries ([sq]; None = 0..seq_len-1)."""
    fmt = packed_format(packed_seq_params)
    if fmt is None:
        return None
    # Every layer of a micro-batch asks with the same arguments: compute once per PackedSeqParams
    # (the checks sync with the device). Only for default positions: under CP q_pos is a tensor.
    key = (fmt, batch, seq_len, cp_size, str(device)) if q_pos is None else None
    cache = packed_seq_params.__dict__.setdefault("_msa_doc_start", {})
    if key is not None and key in cache:
        return cache[key]
    ds = _document_starts(packed_seq_params, fmt, batch, seq_len, q_pos, cp_size, device)
    if key is not None:
        cache[key] = ds
    return ds


def _document_starts(packed_seq_params, fmt: str, batch: int, seq_len: int, q_pos: Optional[Tensor], cp_size: int,
                     device: torch.device) -> Tensor:
    if getattr(packed_seq_params, "local_cp_size", None) not in (None, 1):
        raise ValueError(f"packed_seq_params.local_cp_size={packed_seq_params.local_cp_size} (hybrid context "
                         "parallelism) is not supported by msa_megatron's core attention: allowed value is None")
    cu = cu_seqlens_of(packed_seq_params).to(device)
    pos = torch.arange(seq_len, device=device) if q_pos is None else q_pos.to(device, torch.long)
    if fmt == "thd":
        check_layout(packed_seq_params, cp_size)
        if batch != 1:
            raise ValueError(f"packed_seq_params.qkv_format='thd' needs one packed row; got batch {batch}")
        if int(cu[-1]) > seq_len:
            raise ValueError(f"packed_seq_params cu_seqlens end at {int(cu[-1])} > the {seq_len} packed tokens")
        return reference.doc_start_from_cu_seqlens(cu, pos)[None]
    if int(cu[-1]) > batch * seq_len:
        raise ValueError(f"packed_seq_params (qkv_format='sbhd') cu_seqlens end at {int(cu[-1])} > batch x sequence "
                         f"= {batch} x {seq_len} tokens")
    rows = torch.arange(batch, device=device)[:, None] * seq_len
    ds = reference.doc_start_from_cu_seqlens(cu, (rows + pos[None]).flatten()).view(batch, -1) - rows
    return ds.clamp_min(0)  # a document never crosses a row: rows are separate sequences


def varlen_flash():
    """torch's varlen flash attention (``torch.nn.attention.varlen.varlen_attn``) or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_causal(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float) -> Tensor:
    """q [t, hq, d], k/v [t, g, d] -> [t, hq, d]: causal attention inside each document."""
    import inspect

    fn = varlen_flash()
    params = inspect.signature(fn).parameters
    hq, g = q.shape[1], k.shape[1]
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale * math.sqrt(q.shape[-1]) - 1.0) > 1e-12:  # torch 2.10: no scale argument, 1/sqrt(d) built in
        q = q * (scale * math.sqrt(q.shape[-1]))
    if "is_causal" in params:  # torch 2.10; later versions: window_size (left, right)
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # (left, right): causal
    if hq != g:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // g, dim=1)
            v = v.repeat_interleave(hq // g, dim=1)
    cu32 = cu.to(device=q.device, dtype=torch.int32).contiguous()
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu32, cu32, max_len, max_len, **kw)


def varlen_eligible(q: Tensor, cu: Optional[Tensor], q_pos: Optional[Tensor]) -> Tuple[bool, str]:
    """(usable, reason) for torch varlen flash on a THD row: CUDA, fp16/bf16, default positions,
    cu_seqlens covering every token (no trailing tokens outside the packing)."""
    if cu is None or q_pos is not None:
        return False, "not a THD row at default positions (CP or a query subset)"
    if q.device.type != "cuda":
        return False, f"tensors on {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {q.dtype} (varlen flash takes fp16/bf16)"
    if varlen_flash() is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if int(cu[-1]) != q.shape[1]:
        return False, "cu_seqlens do not cover every token"
    return True, "torch.nn.attention.varlen.varlen_attn (flash, causal per document)"


def dense_with_documents(q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor, scale: float, cfg: MSAConfig,
                         q_pos: Optional[Tensor] = None, thd_cu: Optional[Tensor] = None) -> Tensor:
    """Dense causal attention with the document mask, q [b, sq, hq, d], k/v [b, sk, g, d] ->
    out [b, sq, hq, d]. torch varlen flash for a THD row on CUDA when available; otherwise
    the MSA op's dense mode with ``doc_start`` (Triton kernel with every visible same-document
    block selected on CUDA, the chunked reference elsewhere). What runs is logged once."""
    ok, reason = varlen_eligible(q, thd_cu, q_pos)
    if ok:
        _once(f"varlen-{q.dtype}", "dense attention with packed documents: %s", reason)
        return _varlen_causal(q[0], k[0], v[0], thd_cu, scale)[None]
    backend = resolve_backend(cfg, q.device)
    what = ("the MSA Triton dense kernel with every visible same-document block" if backend == "triton"
            else "the pure-PyTorch reference (chunked, document mask)")
    _once(f"docs-op-{backend}-{q.device.type}", "dense attention with packed documents: %s (varlen flash not used: %s)",
          what, reason)
    out, _ = msa_attention(q, k, v, None, None, cfg, q_pos=q_pos, mode="dense", softmax_scale=scale,
                           doc_start=doc_start)
    return out


__all__ = ["PACKED_FORMATS", "check_layout", "cu_seqlens_of", "dense_with_documents", "document_starts",
           "packed_format", "varlen_eligible", "varlen_flash"]

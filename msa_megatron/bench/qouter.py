"""The query-outer forward of the sparse main branch: a benchmark baseline, not a production path.

One program = one query position x the G heads of one KV group, streaming its own K selected
blocks (``BN`` keys per step). Only G rows per MMA tile (16 at G = 16) and 2 x K key/value
tile loads per position: the reason the production kernels are KV-outer
(``msa_megatron/ops/triton_sparse_attn.py``, docs/kernels_main.md). Kept here for the
``msa-main-qouter`` bench row and as a second, plan-free implementation to compare with.

Knobs come from the one main-branch config family (``KernelConfig.q_warps`` / ``q_stages`` /
``q_block_n``; ``fwd_impl="q"`` selects this kernel in :func:`qouter_attention_fwd` callers);
the backward of :func:`qouter_attention` is the production KV-outer backward.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import triton_sparse_attn as T
from ..ops.tuning import KernelConfig

LOG2E = T.LOG2E


@triton.jit
def _fwd_q_kernel(
    Q, K, V, QPOS, BIDX, OUT, LSE, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh, stride_dsb,
    sq, sk, n_groups, G, D, qk_scale,
    KSEL: tl.constexpr, NSUB: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    RP: tl.constexpr, DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr = False,
):
    """Query-outer forward: one program = one query position x the G heads of one group,
    online softmax over its selected blocks."""
    t = tl.program_id(0)
    bg = tl.program_id(1)
    bi = bg // n_groups
    gi = bg % n_groups
    h = tl.arange(0, RP)
    hmask = h < G
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    qpos = tl.load(QPOS + t)
    if HAS_DOC:  # packed documents: keys before the query's document start are invisible
        dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t)
    q_rows = bi.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt + (gi * G + h).to(tl.int64) * stride_qh
    qt = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
    m = tl.full([RP], float("-inf"), tl.float32)
    l = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, DP], tl.float32)
    sel_base = (bg.to(tl.int64) * sq + t) * KSEL
    for s in range(KSEL):
        blk = tl.load(BIDX + sel_base + s)
        if blk >= 0:
            for n in range(NSUB):
                kstart = blk * BLOCK + n * BN
                go = kstart <= qpos
                if HAS_DOC:
                    go = go & (kstart + BN > dlo)
                if go:
                    kpos = kstart + tl.arange(0, BN)
                    kvalid = (kpos <= qpos) & (kpos < sk)
                    if HAS_DOC:
                        kvalid = kvalid & (kpos >= dlo)
                    kv_off = bi.to(tl.int64) * stride_kb + kpos.to(tl.int64)[:, None] * stride_kt + gi * stride_kh
                    kmask = kvalid[:, None] & dmask[None, :]
                    kt = tl.load(K + kv_off + offs_d[None, :], mask=kmask, other=0.0)
                    if UPCAST:
                        kt = kt.to(tl.float32)
                    vt = tl.load(V + kv_off + offs_d[None, :], mask=kmask, other=0.0)
                    if UPCAST:
                        vt = vt.to(tl.float32)
                    sc = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
                    sc = tl.where(kvalid[None, :], sc, float("-inf"))
                    m_new = tl.maximum(m, tl.max(sc, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m - m_safe)
                    p = tl.exp2(sc - m_safe[:, None])
                    l = l * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
                    m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_rows = bi.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + (gi * G + h).to(tl.int64) * stride_oh
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])
    hq = n_groups * G
    tl.store(LSE + (bi.to(tl.int64) * hq + gi * G + h) * sq + t, lse, mask=hmask)


def qouter_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[KernelConfig] = None, doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(out [b, sq, hq, d] in q's dtype, lse [b, hq, sq] fp32), the contract of
    ``triton_sparse_attn.sparse_attention_fwd`` (rows with no visible key: out 0, lse -inf)."""
    cfg = config or T.default_config()
    b, sq, hq, d, sk, g, K = T._check_inputs(q, k, v, block_idx, block_size)
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = T._positions(q_pos, sq, sk, q.device)
    docs = T._docs(doc_start, b, sq, pos)
    out = T._alloc((b, sq, hq, d), q.dtype, q.device)
    lse = T._alloc((b, hq, sq), torch.float32, q.device)
    if sq == 0:
        return out, lse
    block_idx = block_idx.contiguous()
    bn = T._block_n(block_size, cfg.q_block_n)
    _fwd_q_kernel[(sq, b * g)](
        q, k, v, pos, block_idx, out, lse, docs.ptr,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), docs.stride_b,
        sq, sk, g, G, d, scale * LOG2E,
        KSEL=K, NSUB=block_size // bn, BLOCK=block_size, BN=bn, RP=max(16, T._next_pow2(G)), DP=T._next_pow2(d),
        DOT_PREC=T._dot_prec(q.dtype), UPCAST=T._upcast(q), HAS_DOC=docs.on,
        num_warps=cfg.q_warps, num_stages=cfg.q_stages,
    )
    return out, lse


class QOuterAttentionFn(torch.autograd.Function):
    """Query-outer forward, KV-outer backward (``triton_sparse_attn.sparse_attention_bwd``)."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, q_pos, softmax_scale, config, deterministic, doc_start=None):
        cfg = config or T.default_config()
        out, lse = qouter_attention_fwd(q, k, v, block_idx, block_size, q_pos, softmax_scale, config=cfg,
                                        doc_start=doc_start)
        ctx.save_for_backward(q, k, v, out, lse, block_idx.contiguous(),
                              q_pos if q_pos is not None else torch.empty(0))
        ctx.has_pos, ctx.block_size, ctx.scale, ctx.det, ctx.doc_start = (
            q_pos is not None, block_size, softmax_scale, deterministic, doc_start)
        ctx.cfg = replace(cfg, fwd_impl="kv")
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, block_idx, q_pos = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = T.sparse_attention_bwd(
            dout, q, k, v, out, lse, block_idx, ctx.block_size, q_pos if ctx.has_pos else None, ctx.scale,
            deterministic=ctx.det, config=ctx.cfg, doc_start=ctx.doc_start)
        return dq, dk, dv, None, None, None, None, None, None, None


def qouter_attention(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[KernelConfig] = None, deterministic: bool = True, doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Autograd-aware: query-outer forward + the production backward; (out, lse)."""
    return QOuterAttentionFn.apply(q, k, v, block_idx, block_size, q_pos, softmax_scale, config, deterministic,
                                   doc_start)


__all__ = ["QOuterAttentionFn", "qouter_attention", "qouter_attention_fwd"]

"""Pure-PyTorch reference of MiniMax Sparse Attention (arXiv 2606.13392).

This module is the ground truth: every Triton kernel and every parallel layout
(TP, SP, CP) is tested against it. It sits beside the kernels (``msa_megatron/ops/naive.py``,
as flash-linear-attention's ``naive.py`` files) but needs only torch and ``config``, so
base modules (``recall``, ``selection_stats``) may import it (tests/test_import_graph.py). It favours clarity over speed, but stays
memory-bounded: work is done in chunks of queries, and chunks are recomputed in the
backward (activation checkpointing), so a 32K-token sequence runs on a CPU without
materialising an [s, s] matrix for all heads.

Layout and notation (used by every function here and by the kernels):
    b  batch, sq queries, sk keys, hq query heads, g KV groups (= KV heads = index
    heads), G = hq // g query heads per group, d head dim, di index dim, B block size,
    K top-k blocks, nb = ceil(sk / B) key blocks.
    q       [b, sq, hq, d]     main-branch queries (RoPE applied)
    k, v    [b, sk, g, d]      main-branch keys / values
    iq      [b, sq, g, di]     index queries, one head per KV group (normed + RoPE)
    ik      [b, sk, di]        shared index key head (normed + RoPE)
    q_pos   [sq] int64         global position of each query; keys sit at 0..sk-1.
                               Default: the last sq positions (sq == sk: 0..sq-1).
                               Context parallelism passes its load-balanced positions.
    block_idx [b, g, sq, K] int32  selected key blocks, ascending, unused slots -1.
    doc_start [b, sq] int64    optional (packed documents): position of the first token of
                               each query's document; keys before it are invisible to the
                               query. None = one document per sequence (plain causal).
                               Build it with :func:`doc_start_from_cu_seqlens` or
                               :func:`doc_start_from_doc_ids`; docs/packed.md has the spec.

Selection rule (deterministic): the query's own block and the ``local_blocks - 1``
blocks before it and the first ``init_blocks`` blocks are always kept; the other
slots go to the visible blocks with the largest block score (max of the raw index
scores q_idx . k_idx over the block's keys at positions <= the query), ties broken
towards the lower block index. Future blocks are never selected; with K or fewer
visible blocks all of them are kept. Ranking uses raw scores: softmax is monotone.

Documents (``doc_start``): a key j is visible to query t iff doc_start[t] <= j <= q_pos[t].
Block scores are maxima over visible keys only (a block straddling a boundary counts its
same-document part), blocks without a visible key are never selected (forced or not), and
``init_blocks`` counts from the block holding the document's first token. Main branch,
KL teacher and student, dense mode and selection recall all use exactly the visible tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..config import MSAConfig
from .common import check_shapes, default_q_pos, positions  # noqa: F401  (default_q_pos: public here too)

# the kernels and this reference share their input checks (ops/common.py); the old private names stay
_check_shapes, _positions = check_shapes, positions

#: Elements (fp32) one chunk may hold in its largest intermediate; bounds memory.
CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- helpers
def _acc(x: Tensor) -> Tensor:
    """Accumulation precision: fp32 for 16-bit inputs, the input's own for fp32/fp64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _doc_bounds(doc_start: Optional[Tensor], b: int, sq: int, q_pos: Tensor) -> Optional[Tensor]:
    """doc_start as int64 [b, sq] (a [sq] tensor is shared by the batch), checked against
    q_pos: 0 <= doc_start <= q_pos (a query's document begins at or before the query)."""
    if doc_start is None:
        return None
    if doc_start.dtype.is_floating_point or doc_start.dtype == torch.bool:
        raise ValueError(f"doc_start must hold integers, got {doc_start.dtype}")
    ds = doc_start.to(device=q_pos.device, dtype=torch.long)
    if ds.dim() == 1:
        ds = ds.unsqueeze(0).expand(b, -1)
    if tuple(ds.shape) != (b, sq):
        raise ValueError(f"doc_start must have shape [{b}, {sq}] or [{sq}], got {tuple(doc_start.shape)}")
    if sq and (bool((ds < 0).any()) or bool((ds > q_pos[None, :]).any())):
        raise ValueError("doc_start must satisfy 0 <= doc_start[b, t] <= q_pos[t] (its document starts at or before the query)")
    return ds


def doc_start_from_cu_seqlens(cu_seqlens: Tensor, positions) -> Tensor:
    """Document start of each position of a packed (THD) sequence: cu_seqlens [n_docs + 1]
    (Megatron's PackedSeqParams.cu_seqlens_q, starting at 0, non-decreasing) -> [len(positions)]
    int64. ``positions``: an int (all positions 0..n-1) or a tensor of positions (a CP rank's
    queries). Positions at or beyond cu_seqlens[-1] (padding) form one trailing document."""
    cu = cu_seqlens.to(dtype=torch.long).flatten()
    if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing; got {cu.tolist()[:8]}...")
    pos = torch.arange(positions, device=cu.device) if isinstance(positions, int) else positions.to(cu.device, torch.long)
    doc = torch.searchsorted(cu, pos, right=True) - 1  # last boundary <= p
    return cu[doc.clamp(0, cu.numel() - 1)]


def doc_start_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """[b, s] document ids of the tokens of each packed row (a new document wherever the id
    changes) -> doc_start [b, s] int64. E.g. ids = cumsum of an EOD flag shifted by one."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [b, s]; got shape {tuple(doc_ids.shape)}")
    b, s = doc_ids.shape
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = torch.arange(s, device=doc_ids.device).expand(b, s)
    return torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values


def doc_start_from_position_ids(position_ids: Tensor) -> Tensor:
    """[b, s] position ids that restart at 0 with every document (Megatron's GPTDataset with
    ``reset_position_ids=True``) -> doc_start [b, s] = t - position_ids[t] (int64)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s]; got shape {tuple(position_ids.shape)}")
    t = torch.arange(position_ids.shape[1], device=position_ids.device)
    ds = t[None, :] - position_ids.to(torch.long)
    if bool((ds < 0).any()) or bool((ds[:, 1:] < ds[:, :-1]).any()):
        raise ValueError("position_ids must restart at 0 per document and count up by 1 inside it")
    return ds


def _invisible(key_pos: Tensor, qp: Tensor, ds: Optional[Tensor]) -> Tensor:
    """Masked keys [c, sk] (no documents) or [b, c, sk]: future keys and, with documents,
    keys before the query's document start."""
    future = key_pos > qp[:, None]
    if ds is None:
        return future
    return future[None] | (key_pos < ds[..., None])


def _bg_mask(mask: Tensor) -> Tensor:
    """[c, sk] or [b, c, sk] -> broadcastable against [b, g, c, sk]."""
    return mask if mask.dim() == 2 else mask[:, None]


def _bgz_mask(mask: Tensor) -> Tensor:
    """[c, sk] or [b, c, sk] -> broadcastable against [b, g, G, c, sk]."""
    return mask if mask.dim() == 2 else mask[:, None, None]


def _opt(t: Optional[Tensor], slicer):
    return (t, slicer if t is not None else None)


def _chunk_size(per_query_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, per_query_elements))


def _map_query_chunks(fn: Callable, sq: int, chunk: int, *tensors_and_slicers) -> list:
    """Run ``fn`` over query chunks, checkpointed when autograd records, so the backward
    holds one chunk's intermediates at a time."""
    outs = []
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        args = [slicer(t, start, stop) if slicer is not None else t for t, slicer in tensors_and_slicers]
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            outs.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            outs.append(fn(*args))
    return outs


def _seq_slice(t: Tensor, a: int, b: int) -> Tensor:  # [b, s, ...] -> rows a:b
    return t[:, a:b]


def _pos_slice(t: Tensor, a: int, b: int) -> Tensor:  # [s] or [b, g, s, ...] along s
    return t[a:b] if t.dim() == 1 else t[:, :, a:b]


def _split_heads(q: Tensor, g: int) -> Tensor:
    """[b, s, hq, d] -> [b, g, G, s, d] (fp32): query heads grouped by their KV head."""
    b, s, hq, d = q.shape
    return _acc(q).view(b, s, g, hq // g, d).permute(0, 2, 3, 1, 4)


def _merge_heads(o: Tensor) -> Tensor:
    """[b, g, G, s, d] -> [b, s, g*G, d]."""
    b, g, G, s, d = o.shape
    return o.permute(0, 3, 1, 2, 4).reshape(b, s, g * G, d)


def _xlogx(p: Tensor) -> Tensor:
    return torch.xlogy(p, p)


# ----------------------------------------------------------------------------- index branch (projections)
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    xf = _acc(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _acc(weight)
    return y.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: Tensor, freqs: Optional[Tensor]) -> Tensor:
    """Non-interleaved RoPE on the first ``freqs.shape[-1]`` dims of x [b, s, h, d].

    ``freqs`` [s, rot_dim] holds the angles (Megatron's layout: the half-size frequency
    vector repeated twice); the remaining dims pass through (partial RoPE).
    """
    if freqs is None:
        return x
    rot = freqs.shape[-1]
    f = _acc(freqs).view(1, freqs.shape[0], 1, rot)
    xr, xp = _acc(x[..., :rot]), x[..., rot:]
    xr = xr * f.cos() + rotate_half(xr) * f.sin()
    return torch.cat((xr.to(x.dtype), xp), dim=-1)


def rope_angles(positions: Tensor, rot_dim: int, base: float = 10000.0) -> Tensor:
    """Angles [s, rot_dim] for the given positions (Megatron's RotaryEmbedding layout)."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=positions.device) / rot_dim))
    ang = positions.float()[:, None] * inv[None, :]
    return torch.cat((ang, ang), dim=-1)


def index_projections(
    hidden: Tensor,
    w_index_q: Tensor,
    w_index_k: Tensor,
    q_norm_weight: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    num_index_heads: int,
    rope_freqs: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor]:
    """Index branch inputs from hidden states [b, s, hidden] (already detached by the caller).

    index_q: hidden -> num_index_heads x di, index_k: hidden -> di (one shared head),
    no bias, each followed by a per-head RMSNorm and the model's partial RoPE.
    Returns iq [b, s, g, di], ik [b, s, di].
    """
    b, s, _ = hidden.shape
    di = w_index_k.shape[0]
    iq = F.linear(hidden, w_index_q).view(b, s, num_index_heads, di)
    ik = F.linear(hidden, w_index_k).view(b, s, 1, di)
    iq = apply_partial_rope(rms_norm(iq, q_norm_weight, eps), rope_freqs)
    ik = apply_partial_rope(rms_norm(ik, k_norm_weight, eps), rope_freqs)
    return iq, ik.squeeze(2)


# ----------------------------------------------------------------------------- selection
def index_block_scores(iq: Tensor, ik: Tensor, block_size: int, q_pos: Optional[Tensor] = None, *,
                       doc_start: Optional[Tensor] = None) -> Tensor:
    """Block scores [b, g, sq, nb] (fp32): the max raw index score q_idx . k_idx over the
    keys of each block visible to the query (key position <= query position and, with
    ``doc_start``, >= the query's document start); -inf for blocks with no visible key.
    Never holds more than a chunk of the [sq, sk] scores."""
    b, sq, g, di = iq.shape
    sk = ik.shape[1]
    nb = math.ceil(sk / block_size)
    pad = nb * block_size - sk
    q_pos = positions(q_pos, sq, sk, iq.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    key_pos = torch.arange(sk, device=iq.device)
    ikf = _acc(ik)

    def chunk_fn(iq_c: Tensor, qp: Tensor, ds: Optional[Tensor] = None) -> Tensor:
        s = torch.einsum("bqgd,bkd->bgqk", _acc(iq_c), ikf)
        s = s.masked_fill(_bg_mask(_invisible(key_pos, qp, ds)), float("-inf"))
        if pad:
            s = F.pad(s, (0, pad), value=float("-inf"))
        return s.view(b, g, -1, nb, block_size).amax(-1)

    with torch.no_grad():
        parts = _map_query_chunks(
            chunk_fn, sq, _chunk_size(b * g * sk), (iq, _seq_slice), (q_pos, _pos_slice), _opt(doc_start, _seq_slice)
        )
    return torch.cat(parts, dim=2) if parts else iq.new_zeros(b, g, 0, nb, dtype=torch.float32)


def visible_block_mask(q_pos: Tensor, nb: int, block_size: int, doc_start: Optional[Tensor] = None) -> Tensor:
    """[sq, nb] bool ([b, sq, nb] with ``doc_start``): blocks holding at least one key the
    query may see (not after its own block; not entirely before its document start)."""
    own = (q_pos // block_size)[:, None]
    blk = torch.arange(nb, device=q_pos.device)[None, :]
    vis = blk <= own
    if doc_start is None:
        return vis
    return vis[None] & (blk[None] >= (doc_start // block_size)[..., None])


def forced_block_mask(q_pos: Tensor, nb: int, cfg: MSAConfig, *, doc_start: Optional[Tensor] = None) -> Tensor:
    """[sq, nb] bool: blocks kept whatever their score (own + local, and init blocks).

    With ``doc_start`` [b, sq]: [b, sq, nb]; init blocks count from the block holding the
    document's first token, and a forced block with no visible key is not kept."""
    own = (q_pos // cfg.block_size)[:, None]
    blk = torch.arange(nb, device=q_pos.device)[None, :]
    local = (blk <= own) & (blk > own - cfg.local_blocks)
    if doc_start is None:
        init = (blk < cfg.init_blocks) & (blk <= own)
        return local | init
    first = (doc_start // cfg.block_size)[..., None]  # [b, sq, 1]
    init = (blk[None] >= first) & (blk[None] < first + cfg.init_blocks) & (blk <= own)[None]
    return (local[None] | init) & visible_block_mask(q_pos, nb, cfg.block_size, doc_start)


def select_blocks(block_scores: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, sk: Optional[int] = None,
                  *, doc_start: Optional[Tensor] = None) -> Tensor:
    """Top-k block selection [b, g, sq, K] int32, ascending, -1 for unused slots.

    ``block_scores`` [b, g, sq, nb] from :func:`index_block_scores` (same ``doc_start``)."""
    b, g, sq, nb = block_scores.shape
    if sk is None:
        sk = nb * cfg.block_size
    q_pos = positions(q_pos, sq, sk, block_scores.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    K = cfg.topk
    visible = _bg_mask(visible_block_mask(q_pos, nb, cfg.block_size, doc_start))  # [sq, nb] / [b, 1, sq, nb]
    forced = _bg_mask(forced_block_mask(q_pos, nb, cfg, doc_start=doc_start))
    key = _acc(block_scores).masked_fill(~visible, float("-inf")).masked_fill(forced, float("inf"))
    # Stable descending sort: equal scores keep ascending block order -> lower index wins.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : min(K, nb)]
    chosen_visible = torch.gather(visible.expand(b, g, sq, nb), -1, order)
    sel = torch.where(chosen_visible, order, torch.full_like(order, nb))  # nb marks unused
    sel = torch.sort(sel, dim=-1).values
    sel = torch.where(sel == nb, torch.full_like(sel, -1), sel)
    if sel.shape[-1] < K:
        sel = F.pad(sel, (0, K - sel.shape[-1]), value=-1)
    return sel.to(torch.int32)


def select(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *,
           doc_start: Optional[Tensor] = None) -> Tensor:
    """Index branch end to end: raw scores -> block max -> top-k (int32 [b, g, sq, K])."""
    scores = index_block_scores(iq, ik, cfg.block_size, q_pos, doc_start=doc_start)
    return select_blocks(scores, cfg, q_pos, sk=ik.shape[1], doc_start=doc_start)


# ----------------------------------------------------------------------------- gathering the selected tokens
def selected_token_index(block_idx: Tensor, block_size: int, q_pos: Tensor, sk: int, *,
                         doc_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Token positions [b, g, sq, K*B] of the selected blocks and their validity
    (a real block, key <= query, key < sk, and key >= doc_start [b, sq] when given).
    Invalid slots point at token 0."""
    b, g, sq, K = block_idx.shape
    blk = block_idx.long()
    tok = (blk[..., None] * block_size + torch.arange(block_size, device=blk.device)).view(b, g, sq, K * block_size)
    valid = (blk >= 0).repeat_interleave(block_size, dim=-1) & (tok <= q_pos.view(1, 1, sq, 1)) & (tok < sk)
    if doc_start is not None:
        valid = valid & (tok >= doc_start.view(b, 1, sq, 1))
    return torch.where(valid, tok, torch.zeros_like(tok)), valid


def _gather_tokens(x: Tensor, tok: Tensor) -> Tensor:
    """x [b, sk, g, d] (per group) or [b, sk, d] (shared) gathered at tok [b, g, q, T] ->
    [b, g, q, T, d] (fp32)."""
    b, g, q, T = tok.shape
    if x.dim() == 3:
        x = x.unsqueeze(2).expand(-1, -1, g, -1)
    xg = _acc(x).permute(0, 2, 1, 3)  # [b, g, sk, d]
    idx = tok.reshape(b, g, q * T, 1).expand(-1, -1, -1, xg.shape[-1])
    return torch.gather(xg, 2, idx).view(b, g, q, T, xg.shape[-1])


# ----------------------------------------------------------------------------- main branch
def _softmax_stats(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Probabilities and log-sum-exp of masked (-inf) logits along the last dim."""
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]), lse


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    block_size: int,
    q_pos: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    *,
    doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Exact softmax attention of every query head over its group's selected tokens
    (intersected with causality and, with ``doc_start``, the query's document).
    Returns out [b, sq, hq, d] in q's dtype and lse [b, hq, sq] in the accumulation
    dtype (fp32; fp64 for fp64 inputs). Differentiable w.r.t. q, k, v."""
    hq, g = check_shapes(q, k, v)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_pos = positions(q_pos, sq, sk, q.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    T = block_idx.shape[-1] * block_size

    def chunk_fn(q_c: Tensor, k_: Tensor, v_: Tensor, blk_c: Tensor, qp: Tensor, ds=None) -> Tuple[Tensor, Tensor]:
        tok, valid = selected_token_index(blk_c, block_size, qp, sk, doc_start=ds)
        kg, vg = _gather_tokens(k_, tok), _gather_tokens(v_, tok)  # [b, g, c, T, d]
        logits = torch.einsum("bgzcd,bgctd->bgzct", _split_heads(q_c, g), kg) * scale
        logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
        p, lse = _softmax_stats(logits)
        o = torch.einsum("bgzct,bgctd->bgzcd", p, vg)
        return _merge_heads(o).to(q.dtype), lse.reshape(b, hq, -1)

    parts = _map_query_chunks(
        chunk_fn,
        sq,
        _chunk_size(b * g * T * (d + hq // g)),
        (q, _seq_slice),
        (k, None),
        (v, None),
        (block_idx, _pos_slice),
        (q_pos, _pos_slice),
        _opt(doc_start, _seq_slice),
    )
    return torch.cat([o for o, _ in parts], 1), torch.cat([l for _, l in parts], 2)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None, *,
    doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal GQA softmax attention over every key <= the query's position (and >= its
    document start with ``doc_start``: the document mask).
    Returns out [b, sq, hq, d] (q's dtype) and lse [b, hq, sq] fp32."""
    hq, g = check_shapes(q, k, v)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_pos = positions(q_pos, sq, sk, q.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    key_pos = torch.arange(sk, device=q.device)

    def chunk_fn(q_c: Tensor, k_: Tensor, v_: Tensor, qp: Tensor, ds=None) -> Tuple[Tensor, Tensor]:
        kf, vf = _acc(k_).permute(0, 2, 1, 3), _acc(v_).permute(0, 2, 1, 3)  # [b, g, sk, d]
        logits = torch.einsum("bgzcd,bgkd->bgzck", _split_heads(q_c, g), kf) * scale
        logits = logits.masked_fill(_bgz_mask(_invisible(key_pos, qp, ds)), float("-inf"))
        p, lse = _softmax_stats(logits)
        o = torch.einsum("bgzck,bgkd->bgzcd", p, vf)
        return _merge_heads(o).to(q.dtype), lse.reshape(b, hq, -1)

    parts = _map_query_chunks(
        chunk_fn, sq, _chunk_size(b * hq * sk), (q, _seq_slice), (k, None), (v, None), (q_pos, _pos_slice),
        _opt(doc_start, _seq_slice),
    )
    return torch.cat([o for o, _ in parts], 1), torch.cat([l for _, l in parts], 2)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal GQA attention over the last ``window`` keys (positions p-window+1 .. p): the
    FLOP-matched baseline the paper compares MSA against. Same returns (and ``doc_start``)
    as dense_attention."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid: allowed values are integers >= 1")
    hq, g = check_shapes(q, k, v)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_pos = positions(q_pos, sq, sk, q.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    key_pos = torch.arange(sk, device=q.device)

    def chunk_fn(q_c: Tensor, k_: Tensor, v_: Tensor, qp: Tensor, ds=None) -> Tuple[Tensor, Tensor]:
        kf, vf = _acc(k_).permute(0, 2, 1, 3), _acc(v_).permute(0, 2, 1, 3)
        logits = torch.einsum("bgzcd,bgkd->bgzck", _split_heads(q_c, g), kf) * scale
        outside = _invisible(key_pos, qp, ds) | (key_pos <= qp[:, None] - window)
        p, lse = _softmax_stats(logits.masked_fill(_bgz_mask(outside), float("-inf")))
        o = torch.einsum("bgzck,bgkd->bgzcd", p, vf)
        return _merge_heads(o).to(q.dtype), lse.reshape(b, hq, -1)

    parts = _map_query_chunks(
        chunk_fn, sq, _chunk_size(b * hq * sk), (q, _seq_slice), (k, None), (v, None), (q_pos, _pos_slice),
        _opt(doc_start, _seq_slice),
    )
    return torch.cat([o for o, _ in parts], 1), torch.cat([l for _, l in parts], 2)


# ----------------------------------------------------------------------------- KL distillation and statistics
@dataclass
class KLTerms:
    """Sums over (batch, group, query) rows; divide by ``rows`` for means."""

    kl: Tensor  # differentiable w.r.t. iq / ik only
    index_entropy: Tensor
    main_entropy: Tensor  # summed over heads too: divide by rows * G
    rows: int


def _kl_chunk(
    q_c: Tensor, k_: Tensor, iq_c: Tensor, ik_: Tensor, tok: Tensor, valid: Tensor, scale: float, iscale: float, g: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """KL(teacher || student) summed over a chunk's rows, plus entropy sums.

    teacher: mean over the group's heads of the main-branch softmax (computed from
    detached q, k); student: softmax(index scores * iscale) over the same tokens."""
    with torch.no_grad():
        kg = _gather_tokens(k_.detach(), tok)
        logits = torch.einsum("bgzcd,bgctd->bgzct", _split_heads(q_c.detach(), g), kg) * scale
        p_heads, _ = _softmax_stats(logits.masked_fill(~valid[:, :, None], float("-inf")))
        teacher = p_heads.mean(2)  # [b, g, c, T]
        main_entropy = -_xlogx(p_heads).sum()
    ikg = _gather_tokens(ik_, tok)  # [b, g, c, T, di]
    s = torch.einsum("bcgd,bgctd->bgct", _acc(iq_c), ikg) * iscale
    log_q = torch.log_softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    log_q = log_q.masked_fill(~valid, 0.0)
    kl = (_xlogx(teacher) - teacher * log_q).sum()
    index_entropy = -(log_q.exp() * log_q).masked_fill(~valid, 0.0).sum().detach()
    return kl, index_entropy, main_entropy


def _kl_terms(
    q: Tensor, k: Tensor, iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Tensor,
    token_fn: Callable[[int, int, Tensor, Optional[Tensor]], Tuple[Tensor, Tensor]], T: int,
    softmax_scale: Optional[float], doc_start: Optional[Tensor] = None,
) -> KLTerms:
    hq, g = check_shapes(q, k)
    b, sq, _, d = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    iscale = cfg.index_softmax_scale

    def chunk_fn(q_c, k_, iq_c, ik_, start: int, stop: int, qp, ds):
        tok, valid = token_fn(start, stop, qp, ds)
        return _kl_chunk(q_c, k_, iq_c, ik_, tok, valid, scale, iscale, g)

    chunk = _chunk_size(b * g * T * (d + cfg.index_dim + hq // g))
    acc_dtype = torch.promote_types(_acc(iq[:0]).dtype, _acc(q[:0]).dtype)
    kl = torch.zeros((), dtype=acc_dtype, device=q.device)
    ent_i = torch.zeros((), dtype=acc_dtype, device=q.device)
    ent_m = torch.zeros((), dtype=acc_dtype, device=q.device)
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        ds = doc_start[:, start:stop] if doc_start is not None else None
        args = (q[:, start:stop], k, iq[:, start:stop], ik, start, stop, q_pos[start:stop], ds)
        if torch.is_grad_enabled() and (iq.requires_grad or ik.requires_grad):
            c_kl, c_ei, c_em = checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            c_kl, c_ei, c_em = chunk_fn(*args)
        kl, ent_i, ent_m = kl + c_kl, ent_i + c_ei, ent_m + c_em
    return KLTerms(kl=kl, index_entropy=ent_i, main_entropy=ent_m, rows=b * g * sq)


def sparse_kl_terms(q, k, iq, ik, block_idx, cfg: MSAConfig, q_pos=None, softmax_scale=None, *,
                    doc_start=None) -> KLTerms:
    """Token-level KL over each query's selected (visible) tokens (the ``msa`` phase)."""
    sk = k.shape[1]
    q_pos = positions(q_pos, q.shape[1], sk, q.device)
    doc_start = _doc_bounds(doc_start, q.shape[0], q.shape[1], q_pos)

    def token_fn(a: int, b_: int, qp: Tensor, ds: Optional[Tensor]):
        return selected_token_index(block_idx[:, :, a:b_], cfg.block_size, qp, sk, doc_start=ds)

    return _kl_terms(q, k, iq, ik, cfg, q_pos, token_fn, block_idx.shape[-1] * cfg.block_size, softmax_scale,
                     doc_start)


def dense_kl_terms(q, k, iq, ik, cfg: MSAConfig, q_pos=None, softmax_scale=None, *, doc_start=None) -> KLTerms:
    """Token-level KL over all causal (same-document) tokens (the ``msa_warmup`` phase, dense teacher)."""
    b, sq = q.shape[:2]
    g, sk = k.shape[2], k.shape[1]
    q_pos = positions(q_pos, sq, sk, q.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    key_pos = torch.arange(sk, device=q.device)

    def token_fn(a: int, b_: int, qp: Tensor, ds: Optional[Tensor]):
        tok = key_pos.view(1, 1, 1, sk).expand(b, g, qp.shape[0], sk)
        valid = tok <= qp.view(1, 1, -1, 1)
        if ds is not None:
            valid = valid & (tok >= ds.view(b, 1, -1, 1))
        return tok, valid

    return _kl_terms(q, k, iq, ik, cfg, q_pos, token_fn, sk, softmax_scale, doc_start)


def sparse_kl_loss(q, k, iq, ik, block_idx, cfg: MSAConfig, q_pos=None, softmax_scale=None, *, doc_start=None) -> Tensor:
    """Mean KL(teacher || student) per (batch, index head, query); gradient reaches iq, ik only."""
    t = sparse_kl_terms(q, k, iq, ik, block_idx, cfg, q_pos, softmax_scale, doc_start=doc_start)
    return t.kl / t.rows


def dense_kl_loss(q, k, iq, ik, cfg: MSAConfig, q_pos=None, softmax_scale=None, *, doc_start=None) -> Tensor:
    """Mean KL over all causal (same-document) tokens (warmup); gradient reaches iq, ik only."""
    t = dense_kl_terms(q, k, iq, ik, cfg, q_pos, softmax_scale, doc_start=doc_start)
    return t.kl / t.rows


def selected_index_lse(iq: Tensor, ik: Tensor, block_idx: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None,
                       *, doc_start: Optional[Tensor] = None) -> Tensor:
    """Log-sum-exp [b, g, sq] (fp32) of the scaled index scores over the selected (visible)
    tokens: the normaliser of the student distribution, which the fused indexer returns."""
    b, sq, g, _ = iq.shape
    sk = ik.shape[1]
    q_pos = positions(q_pos, sq, sk, iq.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    with torch.no_grad():
        tok, valid = selected_token_index(block_idx, cfg.block_size, q_pos, sk, doc_start=doc_start)
        s = torch.einsum("bcgd,bgctd->bgct", _acc(iq), _gather_tokens(ik, tok)) * cfg.index_softmax_scale
        return torch.logsumexp(s.masked_fill(~valid, float("-inf")), dim=-1)


def selection_recall(q: Tensor, k: Tensor, block_idx: Tensor, block_size: int, q_pos: Optional[Tensor] = None,
                     softmax_scale: Optional[float] = None, *, doc_start: Optional[Tensor] = None) -> Tensor:
    """Mean fraction of the dense attention mass (head-mean over each group; document mask
    with ``doc_start``) that falls in the selected blocks. 1.0 at full budget. Needs a dense
    pass: call on sampled steps."""
    hq, g = check_shapes(q, k)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_pos = positions(q_pos, sq, sk, q.device)
    doc_start = _doc_bounds(doc_start, b, sq, q_pos)
    key_pos = torch.arange(sk, device=q.device)
    nb = math.ceil(sk / block_size)

    def chunk_fn(q_c, k_, blk_c, qp, ds=None):
        kf = _acc(k_).permute(0, 2, 1, 3)
        logits = torch.einsum("bgzcd,bgkd->bgzck", _split_heads(q_c, g), kf) * scale
        p, _ = _softmax_stats(logits.masked_fill(_bgz_mask(_invisible(key_pos, qp, ds)), float("-inf")))
        mass = F.pad(p.mean(2), (0, nb * block_size - sk)).view(b, g, -1, nb, block_size).sum(-1)
        blk = blk_c.long()
        kept = torch.gather(mass, -1, blk.clamp_min(0)).masked_fill(blk < 0, 0.0)
        return kept.sum(-1).sum()

    with torch.no_grad():
        parts = _map_query_chunks(
            chunk_fn, sq, _chunk_size(b * hq * sk), (q, _seq_slice), (k, None), (block_idx, _pos_slice), (q_pos, _pos_slice),
            _opt(doc_start, _seq_slice),
        )
    return torch.stack(parts).sum() / (b * g * sq)


# ----------------------------------------------------------------------------- public entry point
@dataclass
class MSAAux:
    """What the MSA op returns beside the attention output.

    ``kl`` is the mean token-level KL (times nothing: the caller applies kl_coeff); it is
    differentiable w.r.t. iq and ik only. Statistics are detached scalars (means)."""

    kl: Optional[Tensor] = None
    block_idx: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    stats: Dict[str, Tensor] = field(default_factory=dict)


def msa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    iq: Optional[Tensor],
    ik: Optional[Tensor],
    cfg: MSAConfig,
    q_pos: Optional[Tensor] = None,
    mode: Optional[str] = None,
    softmax_scale: Optional[float] = None,
    compute_recall: bool = False,
    block_idx: Optional[Tensor] = None,
    *,
    doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, MSAAux]:
    """The MSA op (the signature the kernels implement): (q, k, v, iq, ik, cfg) -> (out, aux).

    mode ``dense``: causal attention, no index branch. ``msa_warmup``: dense main branch,
    KL over all causal tokens. ``msa``: attention over the selected blocks, KL over the
    selected tokens. ``compute_recall`` adds ``stats['recall']``, the *selection recall* (the
    share of the dense attention mass the selected blocks keep; not the *associative recall*
    task of experiments/assoc_recall.py), a dense pass.
    ``block_idx``: a selection already computed by :func:`select` for these queries (lets
    context parallelism overlap the K/V gather with the index pass); None selects here.
    ``doc_start`` [b, sq] (or [sq]): packed documents, every mode masks keys before each
    query's document start (docs/packed.md); None: one document per sequence."""
    mode = mode or cfg.mode
    if mode not in ("dense", "msa_warmup", "msa"):
        raise ValueError(f"mode={mode!r} is invalid: allowed values are dense, msa_warmup, msa")
    check_shapes(q, k, v)
    sq, sk = q.shape[1], k.shape[1]
    q_pos = positions(q_pos, sq, sk, q.device)
    ds = _doc_bounds(doc_start, q.shape[0], sq, q_pos)
    aux = MSAAux()
    if mode == "dense" or iq is None:
        if mode != "dense":
            raise ValueError(f"mode {mode!r} needs the index branch inputs iq and ik")
        out, aux.lse = dense_attention(q, k, v, q_pos, softmax_scale, doc_start=ds)
        return out, aux
    if iq.shape[2] != k.shape[2]:
        raise ValueError(f"index heads ({iq.shape[2]}) must equal KV heads ({k.shape[2]}): one per GQA group")
    if iq.shape[-1] != cfg.index_dim or ik.shape[-1] != cfg.index_dim:
        raise ValueError(f"index dim of iq/ik ({iq.shape[-1]}/{ik.shape[-1]}) must equal msa.index_dim={cfg.index_dim}")
    if block_idx is not None:
        expected = (q.shape[0], k.shape[2], sq, cfg.topk)
        if tuple(block_idx.shape) != expected or block_idx.dtype != torch.int32:
            raise ValueError(f"block_idx must be int32 {expected}; got {block_idx.dtype} {tuple(block_idx.shape)}")
        aux.block_idx = block_idx
    else:
        aux.block_idx = select(iq.detach(), ik.detach(), cfg, q_pos, doc_start=ds)
    if mode == "msa":
        out, aux.lse = sparse_attention(q, k, v, aux.block_idx, cfg.block_size, q_pos, softmax_scale, doc_start=ds)
        terms = sparse_kl_terms(q, k, iq, ik, aux.block_idx, cfg, q_pos, softmax_scale, doc_start=ds)
    else:
        out, aux.lse = dense_attention(q, k, v, q_pos, softmax_scale, doc_start=ds)
        terms = dense_kl_terms(q, k, iq, ik, cfg, q_pos, softmax_scale, doc_start=ds)
    G = q.shape[2] // k.shape[2]
    aux.kl = terms.kl / terms.rows
    aux.stats["index_entropy"] = terms.index_entropy / terms.rows
    aux.stats["main_entropy"] = terms.main_entropy / (terms.rows * G)
    if compute_recall:
        aux.stats["recall"] = selection_recall(q.detach(), k.detach(), aux.block_idx, cfg.block_size, q_pos, softmax_scale,
                                               doc_start=ds)
    return out, aux


__all__: Sequence[str] = (
    "MSAAux", "KLTerms", "apply_partial_rope", "dense_attention", "dense_kl_loss", "dense_kl_terms",
    "doc_start_from_cu_seqlens", "doc_start_from_doc_ids", "doc_start_from_position_ids", "forced_block_mask", "visible_block_mask", "index_block_scores", "index_projections", "msa_attention", "rms_norm", "rope_angles",
    "select", "select_blocks", "selected_index_lse", "selected_token_index", "selection_recall",
    "sliding_window_attention", "sparse_attention", "sparse_kl_loss", "sparse_kl_terms",
)

"""One MSA decode step in pure PyTorch: the ground truth of the Triton decode kernel
(:mod:`msa_megatron.ops.triton_decode`) and of the Megatron-Core KV-cache path.

A decode step has one new query per sequence, sitting at the last cached position: the
new token's key/value and index key are already appended to the caches (Megatron appends
before its core attention runs). Everything is built from the full-sequence reference
(:mod:`msa_megatron.ops.naive`) applied to that one query, so selection ties, the forced
own/local/init blocks and the -1 padding follow exactly the same rules as training.

Layout (Megatron's static KV cache is sequence-first):
    q          [b, hq, d]          the new queries (RoPE applied)
    k_cache    [S, b, g, d]        cached keys (RoPE applied), S >= every sequence length
    v_cache    [S, b, g, d]
    iq         [b, g, di]          the new index queries (normed + RoPE)
    ik_cache   [S, b, di]          cached shared index keys (normed + RoPE)
    seq_lens   int or [b] ints     valid cached tokens per sequence, the new one included;
                                   the query's position is seq_lens - 1. Rows past a
                                   sequence's length are never read.
Returns out [b, hq, d] (q's dtype), lse [b, hq] (fp32; fp64 for fp64 inputs) and the
selection block_idx [b, g, K] int32 (ascending, -1 for unused slots).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import naive
from ..config import MSAConfig

SeqLens = Union[int, Tensor, List[int]]


def seq_lens_tensor(seq_lens: SeqLens, b: int, S: int, device) -> Tensor:
    """Per-sequence lengths [b] int64, checked against the cache size."""
    if isinstance(seq_lens, int):
        lens = torch.full((b,), seq_lens, dtype=torch.long, device=device)
    else:
        lens = torch.as_tensor(seq_lens, device=device).to(torch.long).reshape(-1)
    if lens.shape != (b,):
        raise ValueError(f"seq_lens must be an int or hold one length per sequence ({b}); got shape {tuple(lens.shape)}")
    if b and (int(lens.min()) < 1 or int(lens.max()) > S):
        raise ValueError(f"seq_lens must lie in [1, {S}] (the cache holds {S} positions); got {lens.tolist()}")
    return lens


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, iq: Optional[Tensor], ik_cache: Optional[Tensor]) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [b, hq, d] and k_cache [S, b, g, d]; got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    b, hq, d = q.shape
    S, bk, g, dk = k_cache.shape
    if bk != b or dk != d or hq % g != 0:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree: same batch and head dim, "
                         "query heads a multiple of KV heads")
    if iq is not None:
        if iq.shape[:2] != (b, g) or ik_cache is None or ik_cache.shape[:2] != (S, b) or ik_cache.shape[2] != iq.shape[2]:
            raise ValueError(f"iq must be [b={b}, g={g}, di] and ik_cache [S={S}, b={b}, di]; got "
                             f"{tuple(iq.shape)}, {None if ik_cache is None else tuple(ik_cache.shape)}")


def _groups(lens: Tensor) -> Dict[int, Tensor]:
    """Rows grouped by length: each group is one call of the full-sequence reference."""
    return {int(L): (lens == L).nonzero().flatten() for L in torch.unique(lens).tolist()}


def _rows(cache: Tensor, rows: Tensor, L: int) -> Tensor:
    """[S, b, ...] cache -> [r, L, ...] (the reference's batch-first layout)."""
    return cache[:L].index_select(1, rows).transpose(0, 1)


def decode_select_naive(iq: Tensor, ik_cache: Tensor, seq_lens: SeqLens, cfg: MSAConfig) -> Tensor:
    """Selection of one decode step: index scores over the cached index keys, block max,
    top-k with the forced blocks. block_idx [b, g, K] int32."""
    b, g, di = iq.shape
    S = ik_cache.shape[0]
    lens = seq_lens_tensor(seq_lens, b, S, iq.device)
    out = torch.full((b, g, cfg.topk), -1, dtype=torch.int32, device=iq.device)
    for L, rows in _groups(lens).items():
        pos = torch.tensor([L - 1], device=iq.device)
        sel = naive.select(iq.index_select(0, rows)[:, None], _rows(ik_cache, rows, L), cfg, pos)
        out[rows] = sel[:, :, 0]
    return out


def msa_decode_naive(q: Tensor, k_cache: Tensor, v_cache: Tensor, iq: Tensor, ik_cache: Tensor, seq_lens: SeqLens,
                     cfg: MSAConfig, softmax_scale: Optional[float] = None,
                     block_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One MSA decode step: (out [b, hq, d], lse [b, hq], block_idx [b, g, K]).
    ``block_idx`` given: skip the selection (reuse one computed elsewhere)."""
    _check(q, k_cache, v_cache, iq, ik_cache)
    b, hq, d = q.shape
    S, _, g, _ = k_cache.shape
    lens = seq_lens_tensor(seq_lens, b, S, q.device)
    if block_idx is None:
        block_idx = decode_select_naive(iq, ik_cache, lens, cfg)
    elif tuple(block_idx.shape) != (b, g, cfg.topk):
        raise ValueError(f"block_idx must be [{b}, {g}, {cfg.topk}]; got {tuple(block_idx.shape)}")
    out = torch.empty_like(q)
    lse = None
    for L, rows in _groups(lens).items():
        pos = torch.tensor([L - 1], device=q.device)
        o, l = naive.sparse_attention(q.index_select(0, rows)[:, None], _rows(k_cache, rows, L),
                                          _rows(v_cache, rows, L), block_idx.index_select(0, rows)[:, :, None],
                                          cfg.block_size, pos, softmax_scale)
        if lse is None:
            lse = torch.empty(b, hq, dtype=l.dtype, device=q.device)
        out[rows], lse[rows] = o[:, 0], l[:, :, 0]
    return out, lse, block_idx


def dense_decode_naive(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: SeqLens,
                       softmax_scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Dense decode step (every cached key): (out [b, hq, d], lse [b, hq])."""
    _check(q, k_cache, v_cache, None, None)
    b, hq, d = q.shape
    lens = seq_lens_tensor(seq_lens, b, k_cache.shape[0], q.device)
    out = torch.empty_like(q)
    lse = None
    for L, rows in _groups(lens).items():
        pos = torch.tensor([L - 1], device=q.device)
        o, l = naive.dense_attention(q.index_select(0, rows)[:, None], _rows(k_cache, rows, L),
                                         _rows(v_cache, rows, L), pos, softmax_scale)
        if lse is None:
            lse = torch.empty(b, hq, dtype=l.dtype, device=q.device)
        out[rows], lse[rows] = o[:, 0], l[:, :, 0]
    return out, lse


__all__ = ["decode_select_naive", "dense_decode_naive", "msa_decode_naive", "seq_lens_tensor"]

"""Triton MSA decode step: one new query per sequence over Megatron's KV cache.

Same contract as :func:`msa_megatron.ops.decode_naive.msa_decode_naive` (layouts there:
q [b, hq, d], k/v caches [S, b, g, d], iq [b, g, di], ik cache [S, b, di], seq_lens).
Four launches, all memory-bound at long context:

1. ``_index_block_max``: grid (batch, key-block ranges). Each program loads the row's g
   index queries once ([GP, di], padded to the MMA minimum 16 rows), streams its range of
   cached index-key blocks (each key tile read once for all g groups), S = iq @ ik^T on
   tensor cores, keys past the sequence masked, and writes the block max [b, g, nb]. This
   reads the index-key cache once: di values per token instead of dense attention's
   2 g d (1/8 of the bytes in the paper's layout), the source of MSA's decode speed-up.
2. ``_topk``: grid (batch, group). Iterative max over the block scores, K times: each
   round takes the best block strictly after the previous pick in the order (score desc,
   block index asc), the reference's stable-sort tie rule, as one max over int64 keys
   (monotone score bits, then BIG - index); forced blocks (own, local, init) score +inf. Picks are sorted ascending, unused slots -1: ``reference.select``'s output.
3. ``_attend_partial``: grid (batch x group, splits). GQA-packed: the group's G query heads
   are the MMA rows ([HP, d], HP = max(16, G)) and share its selection; each split runs an
   online softmax over its share of the selected blocks (split-K over blocks) and writes
   an unnormalised partial (acc, max, sum).
4. ``_combine``: grid (batch x group): merges the splits by their maxima -> out, LSE.

Dense decoding (the benchmark's "flash decoding" baseline and its correctness twin) is
the same steps 3-4 over every block (:func:`dense_decode_triton`).
fp32 inputs use IEEE fp32 dots (tests); bf16/fp16 use tensor cores with fp32 accumulation.
Under ``TRITON_INTERPRET=1`` (CPU tests) dot operands are upcast to fp32: triton 3.7's
interpreter computes 16-bit dots wrongly (see ops/triton_index.py).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import MSAConfig

LOG2E = 1.4426950408889634
_BIG = tl.constexpr(2**31 - 1)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _key_tile(block_size: int, most: int = 64) -> int:
    """Key tile width: the largest power of two dividing the block size, at most ``most``."""
    return min(block_size & (-block_size), most)


#: Key tile of the attention kernel: 32 rows keep it at ~220 registers with 4 warps and no
#: spills on sm_90 (64 spills; measured with ptxas, ``scripts/gpu_bench_decode.py --aot``).
ATTEND_BN = 32
#: Software-pipelining depth of the index-key stream (loads of the next key tiles in flight
#: while the current one is scored): the index kernel is the bandwidth-bound part.
INDEX_STAGES = 3


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _index_block_max(iq_ptr, ik_ptr, lens_ptr, bs_ptr,
                     s_iq_b, s_iq_g, s_ik_s, s_ik_b, s_bs_b, s_bs_g, BPP,
                     G: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, GP: tl.constexpr,
                     BLOCK: tl.constexpr, BN: tl.constexpr,
                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    L = tl.load(lens_ptr + b)
    nb = tl.cdiv(L, BLOCK)
    rg = tl.arange(0, GP)
    rd = tl.arange(0, DIP)
    dmask = rd < DI
    b64 = b.to(tl.int64)  # batch offsets exceed int32 for batch-first caches at 1M tokens
    iq = tl.load(iq_ptr + b64 * s_iq_b + rg[:, None] * s_iq_g + rd[None, :],
                 mask=(rg[:, None] < G) & dmask[None, :], other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    j0 = pid * BPP
    j1 = tl.minimum(j0 + BPP, nb)
    for j in range(j0, j1):
        m = tl.full([GP], float("-inf"), tl.float32)
        for sub in tl.static_range(BLOCK // BN):
            rk = j * BLOCK + sub * BN + tl.arange(0, BN)
            kmask = rk < L
            ik = tl.load(ik_ptr + rk[:, None].to(tl.int64) * s_ik_s + b64 * s_ik_b + rd[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                ik = ik.to(tl.float32)
            s = tl.dot(iq, tl.trans(ik), input_precision=DOT_PREC)
            s = tl.where(kmask[None, :], s, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        tl.store(bs_ptr + b * s_bs_b + rg * s_bs_g + j, m, mask=rg < G)


@triton.jit
def _order_keys(row, idx, nb, own, LOCAL: tl.constexpr, INIT: tl.constexpr):
    """Block scores as int64 keys whose signed order is (score desc, block index asc):
    the float's bits mapped to a monotone int32 in the high half, BIG - index in the low
    half. Forced blocks score +inf; blocks past nb get the smallest key."""
    valid = idx < nb
    s = tl.load(row + idx, mask=valid, other=float("-inf"))
    s = tl.where(((idx > own - LOCAL) | (idx < INIT)) & valid, float("inf"), s)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties +0.0, as in torch.sort
    bits = s.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (mono.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    return tl.where(valid, key, -9223372036854775807 - 1)


@triton.jit
def _topk(bs_ptr, lens_ptr, out_ptr, s_bs_b, s_bs_g, s_o_b, s_o_g,
          K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
          LOCAL: tl.constexpr, INIT: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    L = tl.load(lens_ptr + b)
    nb = tl.cdiv(L, BLOCK)
    own = nb - 1  # the query sits at L - 1: its block is the last one, every block is visible
    row = bs_ptr + b * s_bs_b + g * s_bs_g
    rk = tl.arange(0, KP)
    sel = tl.full([KP], _BIG, tl.int32)
    idx0 = tl.arange(0, CH)
    low = -9223372036854775807 - 1
    # each round picks the largest key strictly below the previous pick: one max per round
    prev = tl.max(tl.full([2], 9223372036854775807, tl.int64), axis=0)
    if ONE_CHUNK:  # every block score of the row fits one register tile: load it once
        key0 = _order_keys(row, idx0, nb, own, LOCAL, INIT)
    for t in range(K):
        best = tl.max(tl.full([2], low, tl.int64), axis=0)
        for c in range(0, nb, CH):
            if ONE_CHUNK:
                key = key0
            else:
                key = _order_keys(row, c + idx0, nb, own, LOCAL, INIT)
            best = tl.maximum(best, tl.max(tl.where(key < prev, key, low), axis=0))
        pick = tl.where(best == low, _BIG, 2147483647 - (best & 0xFFFFFFFF).to(tl.int32))
        sel = tl.where(rk == t, pick, sel)
        prev = best
    sel = tl.sort(sel)
    sel = tl.where(sel == _BIG, -1, sel)
    tl.store(out_ptr + b * s_o_b + g * s_o_g + rk, sel, mask=rk < K)


@triton.jit
def _attend_partial(q_ptr, k_ptr, v_ptr, bidx_ptr, lens_ptr, acc_ptr, ml_ptr, scale_log2,
                    s_q_b, s_q_h, s_k_s, s_k_b, s_k_g, s_v_s, s_v_b, s_v_g, s_i_b, s_i_g, K, SPS, NS,
                    NKV: tl.constexpr, GQ: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                    BLOCK: tl.constexpr, BN: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    bg = tl.program_id(0)
    sp = tl.program_id(1)
    b = bg // NKV
    g = bg % NKV
    b64 = b.to(tl.int64)  # batch offsets exceed int32 for batch-first caches at 1M tokens
    L = tl.load(lens_ptr + b)
    rh = tl.arange(0, HP)
    rd = tl.arange(0, DP)
    dmask = rd < D
    hmask = rh < GQ
    q = tl.load(q_ptr + b64 * s_q_b + (g * GQ + rh)[:, None] * s_q_h + rd[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([HP], float("-inf"), tl.float32)
    l = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, DP], tl.float32)
    kbase = k_ptr + b64 * s_k_b + g * s_k_g
    vbase = v_ptr + b64 * s_v_b + g * s_v_g
    s0 = sp * SPS
    s1 = tl.minimum(s0 + SPS, K)
    for slot in range(s0, s1):
        blk = tl.load(bidx_ptr + b * s_i_b + g * s_i_g + slot)
        if blk >= 0:
            for sub in tl.static_range(BLOCK // BN):
                r0 = blk * BLOCK + sub * BN
                rk = r0 + tl.arange(0, BN)
                kmask = rk < L
                # block pointers: 64-bit row offsets without a [BN, D] tensor of 64-bit addresses
                kp = tl.make_block_ptr(kbase, (L, D), (s_k_s, 1), (r0, 0), (BN, DP), (1, 0))
                vp = tl.make_block_ptr(vbase, (L, D), (s_v_s, 1), (r0, 0), (BN, DP), (1, 0))
                kt = tl.load(kp, boundary_check=(0, 1), padding_option="zero")
                vt = tl.load(vp, boundary_check=(0, 1), padding_option="zero")
                if UPCAST:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale_log2
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
                m = m_new
    part = bg * NS + sp
    tl.store(acc_ptr + part * HP * DP + rh[:, None] * DP + rd[None, :], acc)
    tl.store(ml_ptr + part * 2 * HP + rh, m)
    tl.store(ml_ptr + part * 2 * HP + HP + rh, l)


@triton.jit
def _combine(acc_ptr, ml_ptr, out_ptr, lse_ptr, s_o_b, s_o_h, s_l_b, NS,
             NKV: tl.constexpr, GQ: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    bg = tl.program_id(0)
    b = bg // NKV
    g = bg % NKV
    rh = tl.arange(0, HP)
    rd = tl.arange(0, DP)
    m = tl.full([HP], float("-inf"), tl.float32)
    l = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, DP], tl.float32)
    for sp in range(NS):
        part = bg * NS + sp
        ms = tl.load(ml_ptr + part * 2 * HP + rh)
        ls = tl.load(ml_ptr + part * 2 * HP + HP + rh)
        a = tl.load(acc_ptr + part * HP * DP + rh[:, None] * DP + rd[None, :])
        m_new = tl.maximum(m, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m - m_safe)
        w_new = tl.exp2(ms - m_safe)
        l = l * w_old + ls * w_new
        acc = acc * w_old[:, None] + a * w_new[:, None]
        m = m_new
    out = acc / l[:, None]
    lse = (m + tl.log2(l)) / 1.4426950408889634
    hmask = rh < GQ
    tl.store(out_ptr + b * s_o_b + (g * GQ + rh)[:, None] * s_o_h + rd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & (rd < D)[None, :])
    tl.store(lse_ptr + b * s_l_b + g * GQ + rh, lse, mask=hmask)


# ----------------------------------------------------------------------------- wrappers
def _lens(seq_lens: Union[int, Tensor], b: int, S: int, device) -> Tuple[Tensor, int]:
    """(lengths [b] int32 on device, the largest length). An int needs no device sync."""
    if isinstance(seq_lens, int):
        if not 1 <= seq_lens <= S:
            raise ValueError(f"seq_lens must lie in [1, {S}] (the cache holds {S} positions); got {seq_lens}")
        return torch.full((b,), seq_lens, dtype=torch.int32, device=device), seq_lens
    lens = torch.as_tensor(seq_lens, device=device).to(torch.int32).reshape(-1)
    if lens.shape != (b,):
        raise ValueError(f"seq_lens must be an int or hold one length per sequence ({b}); got shape {tuple(lens.shape)}")
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > S:
        raise ValueError(f"seq_lens must lie in [1, {S}] (the cache holds {S} positions); got {lens.tolist()}")
    return lens, hi


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [b, hq, d], k_cache/v_cache [S, b, g, d]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[1] != b or k_cache.shape[3] != d or hq % k_cache.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree: same batch and head dim, "
                         "query heads a multiple of KV heads")
    for t in (q, k_cache, v_cache):
        if t.dtype not in _DTYPES:
            raise ValueError(f"dtype {t.dtype} is not supported by the decode kernel: allowed float32, bfloat16, float16")
        if t.stride(-1) != 1:
            raise ValueError("the decode kernel needs the last (head) dim contiguous")
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"the Triton decode kernel needs CUDA tensors (got {t.device}); CPU runs only under "
                               "TRITON_INTERPRET=1 (use ops/decode_naive.py)")


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _interpreting() else "tf32"


def decode_select_triton(iq: Tensor, ik_cache: Tensor, seq_lens: Union[int, Tensor], cfg: MSAConfig,
                         blocks_per_program: Optional[int] = None, topk_chunk: int = 8192) -> Tensor:
    """Selection of one decode step: block_idx [b, g, K] int32, as decode_select_naive.
    ``blocks_per_program``: key blocks per scoring program (None: ~8 programs per SM);
    ``topk_chunk``: block scores per register tile of the top-k (a power of two; a row
    with more blocks is streamed K times)."""
    b, g, di = iq.shape
    S = ik_cache.shape[0]
    if ik_cache.shape[1] != b or ik_cache.shape[2] != di:
        raise ValueError(f"ik_cache must be [S, b={b}, di={di}]; got {tuple(ik_cache.shape)}")
    if iq.stride(-1) != 1 or ik_cache.stride(-1) != 1:
        raise ValueError("the decode kernel needs the last (index) dim of iq and ik_cache contiguous")
    lens, L_max = _lens(seq_lens, b, S, iq.device)
    B = cfg.block_size
    nb_max = math.ceil(L_max / B)
    bs = torch.empty(b, g, nb_max, dtype=torch.float32, device=iq.device)
    if blocks_per_program is None:  # ~8 programs per SM over the whole batch; one per row when interpreting
        blocks_per_program = nb_max if _interpreting() else max(1, math.ceil(nb_max * b / (8 * _num_sms(iq.device))))
    n_prog = math.ceil(nb_max / blocks_per_program)
    upcast = _interpreting()
    _index_block_max[(b, n_prog)](
        iq, ik_cache, lens, bs, iq.stride(0), iq.stride(1), ik_cache.stride(0), ik_cache.stride(1),
        bs.stride(0), bs.stride(1), blocks_per_program, G=g, DI=di, DIP=_pow2(di), GP=_pow2(g), BLOCK=B, BN=_key_tile(B),
        DOT_PREC=_dot_prec(iq.dtype), UPCAST=upcast, num_warps=4, num_stages=INDEX_STAGES)
    out = torch.empty(b, g, cfg.topk, dtype=torch.int32, device=iq.device)
    ch = min(topk_chunk, _pow2(nb_max))
    _topk[(b, g)](bs, lens, out, bs.stride(0), bs.stride(1), out.stride(0), out.stride(1),
                  K=cfg.topk, KP=_pow2(cfg.topk, 2), CH=ch, ONE_CHUNK=ch >= nb_max, BLOCK=B,
                  LOCAL=cfg.local_blocks, INIT=cfg.init_blocks, num_warps=8 if ch >= 4096 else 4)
    return out


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_idx: Tensor,
                            seq_lens: Union[int, Tensor], block_size: int, softmax_scale: Optional[float] = None,
                            blocks_per_split: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Attention of each new query over its group's selected blocks (block_idx [b, g, K],
    -1 = unused): (out [b, hq, d] in q's dtype, lse [b, hq] fp32). Split-K over blocks."""
    _check(q, k_cache, v_cache)
    b, hq, d = q.shape
    S, _, g, _ = k_cache.shape
    K = block_idx.shape[-1]
    if block_idx.shape != (b, g, K) or block_idx.dtype != torch.int32:
        raise ValueError(f"block_idx must be int32 [{b}, {g}, K]; got {block_idx.dtype} {tuple(block_idx.shape)}")
    lens, _ = _lens(seq_lens, b, S, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    GQ = hq // g
    HP, DP = _pow2(GQ), _pow2(d)
    if blocks_per_split is None:
        if _interpreting():
            blocks_per_split = K
        else:  # ~4 programs per SM, at most 256 splits per (row, group)
            target = max(1, (4 * _num_sms(q.device)) // max(1, b * g))
            blocks_per_split = max(1, math.ceil(K / min(target, 256)))
    ns = math.ceil(K / blocks_per_split)
    acc = torch.empty(b * g * ns, HP, DP, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * g * ns, 2, HP, dtype=torch.float32, device=q.device)
    block_idx = block_idx.contiguous()
    upcast = _interpreting()
    _attend_partial[(b * g, ns)](
        q, k_cache, v_cache, block_idx, lens, acc, ml, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_idx.stride(0), block_idx.stride(1),
        K, blocks_per_split, ns, NKV=g, GQ=GQ, HP=HP, D=d, DP=DP, BLOCK=block_size,
        BN=_key_tile(block_size, ATTEND_BN), DOT_PREC=_dot_prec(q.dtype), UPCAST=upcast, num_warps=4)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    _combine[(b * g,)](acc, ml, out, lse, out.stride(0), out.stride(1), lse.stride(0), ns,
                       NKV=g, GQ=GQ, HP=HP, D=d, DP=DP, num_warps=4)
    return out, lse


def msa_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, iq: Tensor, ik_cache: Tensor,
                      seq_lens: Union[int, Tensor], cfg: MSAConfig, softmax_scale: Optional[float] = None,
                      block_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One MSA decode step on the kernels: (out [b, hq, d], lse [b, hq], block_idx [b, g, K])."""
    _check(q, k_cache, v_cache)
    if iq.shape[:2] != (q.shape[0], k_cache.shape[2]):
        raise ValueError(f"iq must be [b={q.shape[0]}, g={k_cache.shape[2]}, di]; got {tuple(iq.shape)}")
    if block_idx is None:
        block_idx = decode_select_triton(iq, ik_cache, seq_lens, cfg)
    out, lse = decode_attention_triton(q, k_cache, v_cache, block_idx, seq_lens, cfg.block_size, softmax_scale)
    return out, lse, block_idx


def full_decode_selection(b: int, g: int, L_max: int, block_size: int, device) -> Tensor:
    """block_idx [b, g, nb] selecting every block of an L_max-token cache (dense decoding;
    shorter rows mask their missing keys by length)."""
    nb = math.ceil(L_max / block_size)
    return torch.arange(nb, dtype=torch.int32, device=device).expand(b, g, nb).contiguous()


def dense_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Union[int, Tensor],
                        block_size: int = 128, softmax_scale: Optional[float] = None,
                        blocks_per_split: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Flash-decoding over every cached key (split-K, GQA-packed): (out, lse)."""
    _check(q, k_cache, v_cache)
    _, L_max = _lens(seq_lens, q.shape[0], k_cache.shape[0], q.device)
    sel = full_decode_selection(q.shape[0], k_cache.shape[2], L_max, block_size, q.device)
    return decode_attention_triton(q, k_cache, v_cache, sel, seq_lens, block_size, softmax_scale, blocks_per_split)


__all__ = ["decode_attention_triton", "decode_select_triton", "dense_decode_triton", "full_decode_selection",
           "msa_decode_triton"]

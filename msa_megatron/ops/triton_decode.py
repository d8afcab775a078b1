"""Triton MSA decode step: one new query per sequence over Megatron's KV cache.

Same contract as :func:`msa_megatron.ops.decode_naive.msa_decode_naive` (layouts there:
q [b, hq, d], k/v caches [S, b, g, d], iq [b, g, di], ik cache [S, b, di], seq_lens).
Two launches (four before issue 22's follow-up: at batch 1 the step was launch-bound):

1. ``_index_block_max``: grid (batch, programs). Each program loads the row's g index
   queries once ([GP, di], padded to the MMA minimum 16 rows), streams its share of the
   row's cached index-key blocks (the share is computed in the kernel from the row's length,
   so a grid sized for the whole cache still spreads a short row over every program), S =
   iq @ ik^T on tensor cores, keys past the sequence masked, and writes the block max
   [b, g, nb]. This reads the index-key cache once: di values per token instead of dense
   attention's 2 g d (1/8 of the bytes in the paper's layout), the source of MSA's decode
   speed-up. The index-key cache may be fp8 (e4m3, opt-in): half the bytes again.
2. ``_select_attend``: grid (batch x group, splits). Each program runs the top-k rounds it
   needs (rank r = the r-th best block, in the order (score desc, block index asc): the
   reference's stable-sort tie rule, one max over int64 keys per round: monotone score bits,
   then BIG - index; forced blocks (own, local, init) score +inf), then attends its share of
   the picks (split-K over blocks): the group's G query heads are the MMA rows ([HP, d],
   HP = max(16, G)) and share the selection; online softmax, an unnormalised partial
   written out. The last split of a (row, group) to finish (an atomic counter, reset by
   that program, so the kernel is CUDA-graph safe) merges the partials by their maxima into
   out and LSE and writes the selection sorted ascending, -1 padded (``reference.select``).
   With a given selection (``decode_attention_triton``, dense decoding) the same kernel
   reads the picks instead of selecting.

``decode_select_triton`` (index kernel + the standalone ``_topk`` kernel) gives the
selection alone. Dense decoding (the benchmark's "flash decoding" baseline and its
correctness twin) is step 2 over every block (:func:`dense_decode_triton`).

CUDA graphs: pass ``seq_lens`` as a device tensor and ``max_len`` (an upper bound, e.g. the
cache size): no host synchronisation, grids sized by ``max_len``; :class:`GraphedStep`
captures a step and replays it with new inputs copied into its static buffers.

fp32 inputs use IEEE fp32 dots (tests); bf16/fp16 use tensor cores with fp32 accumulation.
Under ``TRITON_INTERPRET=1`` (CPU tests) dot operands are upcast to fp32: triton 3.7's
interpreter computes 16-bit dots wrongly (see ops/triton_index.py).
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple, Union

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
def _row_len(lens_ptr, b, L_ALL, PER_ROW: tl.constexpr):
    """The row's cached length: from the lengths tensor, or one length for every row (an
    int ``seq_lens`` needs no tensor, hence no extra launch)."""
    if PER_ROW:
        return tl.load(lens_ptr + b)
    else:
        return L_ALL


@triton.jit
def _index_block_max(iq_ptr, ik_ptr, lens_ptr, bs_ptr, L_ALL,
                     s_iq_b, s_iq_g, s_ik_s, s_ik_b, s_bs_b, s_bs_g,
                     G: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, GP: tl.constexpr,
                     BLOCK: tl.constexpr, BN: tl.constexpr, PER_ROW: tl.constexpr,
                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    L = _row_len(lens_ptr, b, L_ALL, PER_ROW)
    nb = tl.cdiv(L, BLOCK)
    bpp = tl.cdiv(nb, tl.num_programs(1))  # this row's blocks over every program of the row
    rg = tl.arange(0, GP)
    rd = tl.arange(0, DIP)
    dmask = rd < DI
    b64 = b.to(tl.int64)  # batch offsets exceed int32 for batch-first caches at 1M tokens
    iq = tl.load(iq_ptr + b64 * s_iq_b + rg[:, None] * s_iq_g + rd[None, :],
                 mask=(rg[:, None] < G) & dmask[None, :], other=0.0)
    if UPCAST:
        iq = iq.to(tl.float32)
    j0 = pid * bpp
    j1 = tl.minimum(j0 + bpp, nb)
    for j in range(j0, j1):
        m = tl.full([GP], float("-inf"), tl.float32)
        for sub in tl.static_range(BLOCK // BN):
            rk = j * BLOCK + sub * BN + tl.arange(0, BN)
            kmask = rk < L
            ik = tl.load(ik_ptr + rk[:, None].to(tl.int64) * s_ik_s + b64 * s_ik_b + rd[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0)
            ik = ik.to(iq.dtype)  # fp8 keys: widened in registers (no-op otherwise)
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
def _topk_rounds(row, nb, n_rounds, KP: tl.constexpr, CH: tl.constexpr, ONE_CHUNK: tl.constexpr,
                 LOCAL: tl.constexpr, INIT: tl.constexpr):
    """The first ``n_rounds`` picks of the row's top-k, in rank order: [KP] int32, BIG where
    no block is left (fewer blocks than rounds) or past n_rounds. Round t takes the largest
    key strictly below round t-1's: one max per round."""
    own = nb - 1  # the query sits at L - 1: its block is the last one, every block is visible
    rk = tl.arange(0, KP)
    sel = tl.full([KP], _BIG, tl.int32)
    idx0 = tl.arange(0, CH)
    low = -9223372036854775807 - 1
    prev = tl.max(tl.full([2], 9223372036854775807, tl.int64), axis=0)
    if ONE_CHUNK:  # every block score of the row fits one register tile: load it once
        key0 = _order_keys(row, idx0, nb, own, LOCAL, INIT)
    for t in range(n_rounds):
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
    return sel


@triton.jit
def _topk(bs_ptr, lens_ptr, out_ptr, L_ALL, s_bs_b, s_bs_g, s_o_b, s_o_g,
          K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
          LOCAL: tl.constexpr, INIT: tl.constexpr, PER_ROW: tl.constexpr):
    """Standalone selection (decode_select_triton): grid (batch, group); picks sorted
    ascending, unused slots -1."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    L = _row_len(lens_ptr, b, L_ALL, PER_ROW)
    nb = tl.cdiv(L, BLOCK)
    sel = _topk_rounds(bs_ptr + b * s_bs_b + g * s_bs_g, nb, K, KP, CH, ONE_CHUNK, LOCAL, INIT)
    sel = tl.sort(sel)
    sel = tl.where(sel == _BIG, -1, sel)
    rk = tl.arange(0, KP)
    tl.store(out_ptr + b * s_o_b + g * s_o_g + rk, sel, mask=rk < K)


@triton.jit
def _attend_block(q, kbase, vbase, blk, L, s_k_s, s_v_s, m, l, acc, scale_log2,
                  D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of (m, l, acc) with key block ``blk`` (rows past L masked)."""
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
    return m, l, acc


@triton.jit
def _select_attend(q_ptr, k_ptr, v_ptr, bs_ptr, bidx_ptr, lens_ptr, acc_ptr, ml_ptr, cnt_ptr, out_ptr, lse_ptr,
                   scale_log2, L_ALL,
                   s_q_b, s_q_h, s_k_s, s_k_b, s_k_g, s_v_s, s_v_b, s_v_g, s_bs_b, s_bs_g, s_i_b, s_i_g,
                   s_o_b, s_o_h, s_l_b, K, SPS, NS,
                   NKV: tl.constexpr, GQ: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   BLOCK: tl.constexpr, BN: tl.constexpr, SELECT: tl.constexpr, KP: tl.constexpr,
                   CH: tl.constexpr, ONE_CHUNK: tl.constexpr, LOCAL: tl.constexpr, INIT: tl.constexpr,
                   PER_ROW: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    bg = tl.program_id(0)
    sp = tl.program_id(1)
    b = bg // NKV
    g = bg % NKV
    b64 = b.to(tl.int64)  # batch offsets exceed int32 for batch-first caches at 1M tokens
    L = _row_len(lens_ptr, b, L_ALL, PER_ROW)
    s0 = sp * SPS
    s1 = tl.minimum(s0 + SPS, K)
    brow = bidx_ptr + b * s_i_b + g * s_i_g
    rk = tl.arange(0, KP)
    if SELECT:  # this split's ranks s0..s1-1 need rounds 0..s1-1 of the top-k
        sel = _topk_rounds(bs_ptr + b * s_bs_b + g * s_bs_g, tl.cdiv(L, BLOCK), s1, KP, CH, ONE_CHUNK,
                           LOCAL, INIT)
        tl.store(brow + rk, tl.where(sel == _BIG, -1, sel), mask=(rk >= s0) & (rk < s1))
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
    for slot in range(s0, s1):
        if SELECT:
            blk = tl.max(tl.where(rk == slot, sel, -1), axis=0)
            blk = tl.where(blk == _BIG, -1, blk)
        else:
            blk = tl.load(brow + slot)
        if blk >= 0:
            m, l, acc = _attend_block(q, kbase, vbase, blk, L, s_k_s, s_v_s, m, l, acc, scale_log2,
                                      D, DP, BLOCK, BN, DOT_PREC, UPCAST)
    part = bg * NS + sp
    tl.store(acc_ptr + part * HP * DP + rh[:, None] * DP + rd[None, :], acc)
    tl.store(ml_ptr + part * 2 * HP + rh, m)
    tl.store(ml_ptr + part * 2 * HP + HP + rh, l)
    # the last split of this (row, group) to arrive merges every split's partial
    tl.debug_barrier()  # every thread's stores precede the release below
    done = tl.atomic_add(cnt_ptr + bg, 1, sem="acq_rel", scope="gpu")
    if done == NS - 1:
        m = tl.full([HP], float("-inf"), tl.float32)
        l = tl.zeros([HP], tl.float32)
        acc = tl.zeros([HP, DP], tl.float32)
        for j in range(NS):
            pj = bg * NS + j
            ms = tl.load(ml_ptr + pj * 2 * HP + rh, cache_modifier=".cg")
            ls = tl.load(ml_ptr + pj * 2 * HP + HP + rh, cache_modifier=".cg")
            a = tl.load(acc_ptr + pj * HP * DP + rh[:, None] * DP + rd[None, :], cache_modifier=".cg")
            m_new = tl.maximum(m, ms)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            w_old = tl.exp2(m - m_safe)
            w_new = tl.exp2(ms - m_safe)
            l = l * w_old + ls * w_new
            acc = acc * w_old[:, None] + a * w_new[:, None]
            m = m_new
        out = acc / l[:, None]
        lse = (m + tl.log2(l)) / 1.4426950408889634
        tl.store(out_ptr + b64 * s_o_b + (g * GQ + rh)[:, None] * s_o_h + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + b * s_l_b + g * GQ + rh, lse, mask=hmask)
        if SELECT:  # the selection in the reference's form: ascending, -1 padded
            allp = tl.load(brow + rk, mask=rk < K, other=-1, cache_modifier=".cg")
            allp = tl.sort(tl.where(allp < 0, _BIG, allp))
            tl.store(brow + rk, tl.where(allp == _BIG, -1, allp), mask=rk < K)
        tl.atomic_xchg(cnt_ptr + bg, 0, sem="relaxed", scope="gpu")  # ready for the next call / graph replay


# ----------------------------------------------------------------------------- wrappers
IntOrTensor = Union[int, Tensor]


def _lens(seq_lens: IntOrTensor, b: int, S: int, device, max_len: Optional[int] = None) -> Tuple[Optional[Tensor], int, int]:
    """(lengths [b] int32 on device or None for one int length, that int (0 otherwise), the
    largest length or the bound ``max_len``). An int, or a tensor with ``max_len``, needs no
    device sync (CUDA graphs); a tensor without it is checked on the host."""
    if isinstance(seq_lens, int):
        if not 1 <= seq_lens <= S:
            raise ValueError(f"seq_lens must lie in [1, {S}] (the cache holds {S} positions); got {seq_lens}")
        return None, seq_lens, seq_lens
    lens = torch.as_tensor(seq_lens, device=device)
    if lens.dtype != torch.int32:
        lens = lens.to(torch.int32)
    lens = lens.reshape(-1)
    if lens.shape != (b,):
        raise ValueError(f"seq_lens must be an int or hold one length per sequence ({b}); got shape {tuple(lens.shape)}")
    if max_len is not None:
        if not 1 <= max_len <= S:
            raise ValueError(f"max_len must lie in [1, {S}] (the cache holds {S} positions); got {max_len}")
        return lens, 0, max_len
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > S:
        raise ValueError(f"seq_lens must lie in [1, {S}] (the cache holds {S} positions); got {lens.tolist()}")
    return lens, 0, hi


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


#: Index-key cache dtypes: the model's (fp32/bf16/fp16) or, opt-in, fp8 e4m3 (half of bf16's
#: bytes in the only pass over the whole context; widened to the queries' dtype in registers).
IK_FP8 = getattr(torch, "float8_e4m3fn", None)


def _check_index(iq: Tensor, ik_cache: Tensor) -> None:
    b, g, di = iq.shape
    if ik_cache.dim() != 3 or ik_cache.shape[1] != b or ik_cache.shape[2] != di:
        raise ValueError(f"ik_cache must be [S, b={b}, di={di}]; got {tuple(ik_cache.shape)}")
    if iq.stride(-1) != 1 or ik_cache.stride(-1) != 1:
        raise ValueError("the decode kernel needs the last (index) dim of iq and ik_cache contiguous")
    if iq.dtype not in _DTYPES:
        raise ValueError(f"iq dtype {iq.dtype} is not supported: allowed float32, bfloat16, float16")
    if ik_cache.dtype != iq.dtype and not (ik_cache.dtype == IK_FP8 and iq.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(f"ik_cache dtype {ik_cache.dtype} does not go with iq {iq.dtype}: allowed iq's dtype, or "
                         "float8_e4m3fn with bf16/fp16 queries")


def _index(iq: Tensor, ik_cache: Tensor, lens: Optional[Tensor], L_all: int, L_max: int, cfg: MSAConfig,
           blocks_per_program: Optional[int]) -> Tensor:
    b, g, di = iq.shape
    B = cfg.block_size
    nb_max = math.ceil(L_max / B)
    bs = torch.empty(b, g, nb_max, dtype=torch.float32, device=iq.device)
    if blocks_per_program is None:  # ~8 programs per SM over the whole batch; one per row when interpreting
        blocks_per_program = nb_max if _interpreting() else max(1, math.ceil(nb_max * b / (8 * _num_sms(iq.device))))
    n_prog = math.ceil(nb_max / blocks_per_program)
    _index_block_max[(b, n_prog)](
        iq, ik_cache, lens if lens is not None else bs, bs, L_all, iq.stride(0), iq.stride(1), ik_cache.stride(0),
        ik_cache.stride(1), bs.stride(0), bs.stride(1), G=g, DI=di, DIP=_pow2(di), GP=_pow2(g), BLOCK=B,
        BN=_key_tile(B), PER_ROW=lens is not None, DOT_PREC=_dot_prec(iq.dtype), UPCAST=_interpreting(),
        num_warps=4, num_stages=INDEX_STAGES)
    return bs


def index_block_max_triton(iq: Tensor, ik_cache: Tensor, seq_lens: IntOrTensor, cfg: MSAConfig,
                           max_len: Optional[int] = None, blocks_per_program: Optional[int] = None) -> Tensor:
    """Block max of the index scores [b, g, ceil(L_max / block)] fp32 (entries past a row's
    own block count are not written). ``blocks_per_program`` sizes the grid for L_max
    (None: ~8 programs per SM over the batch); a shorter row spreads over the same programs."""
    _check_index(iq, ik_cache)
    lens, L_all, L_max = _lens(seq_lens, iq.shape[0], ik_cache.shape[0], iq.device, max_len)
    return _index(iq, ik_cache, lens, L_all, L_max, cfg, blocks_per_program)


def decode_select_triton(iq: Tensor, ik_cache: Tensor, seq_lens: IntOrTensor, cfg: MSAConfig,
                         blocks_per_program: Optional[int] = None, topk_chunk: int = 8192,
                         max_len: Optional[int] = None) -> Tensor:
    """Selection of one decode step: block_idx [b, g, K] int32, as decode_select_naive
    (index kernel + standalone top-k kernel). ``topk_chunk``: block scores per register
    tile of the top-k (a power of two; a row with more blocks is streamed K times)."""
    _check_index(iq, ik_cache)
    b, g, _ = iq.shape
    lens, L_all, L_max = _lens(seq_lens, b, ik_cache.shape[0], iq.device, max_len)
    bs = _index(iq, ik_cache, lens, L_all, L_max, cfg, blocks_per_program)
    nb_max = bs.shape[2]
    out = torch.empty(b, g, cfg.topk, dtype=torch.int32, device=iq.device)
    ch = min(topk_chunk, _pow2(nb_max))
    _topk[(b, g)](bs, lens if lens is not None else out, out, L_all, bs.stride(0), bs.stride(1), out.stride(0),
                  out.stride(1), K=cfg.topk, KP=_pow2(cfg.topk, 2), CH=ch, ONE_CHUNK=ch >= nb_max, BLOCK=cfg.block_size,
                  LOCAL=cfg.local_blocks, INIT=cfg.init_blocks, PER_ROW=lens is not None,
                  num_warps=8 if ch >= 4096 else 4)
    return out


#: Block scores per register tile of the top-k inside ``_select_attend`` (8,192 blocks = 1M
#: tokens stay in registers: ptxas sm_90a, 8 warps, 194 registers, no spills; longer rows are
#: streamed from L2 once per round).
FUSED_TOPK_CHUNK = 8192
#: Counters of the last-split merge, per (device, stream): zero between calls (the merging
#: program resets its counter), so they are allocated once and reused.
_COUNTERS: Dict[Tuple[str, int], Tensor] = {}


def _counters(n: int, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():  # a graph allocates (and zeroes) its own, per replay
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (str(device), torch.cuda.current_stream(device).cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Optional[Tensor], L_all: int, K: int,
            block_size: int, softmax_scale: Optional[float], blocks_per_split: Optional[int],
            block_idx: Optional[Tensor] = None, bs: Optional[Tensor] = None,
            cfg: Optional[MSAConfig] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``_select_attend`` launch: selection from block scores ``bs`` (cfg's top-k) or the
    given ``block_idx``; (out, lse, block_idx)."""
    b, hq, d = q.shape
    S, _, g, _ = k_cache.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    GQ = hq // g
    HP, DP = _pow2(GQ), _pow2(d)
    select = block_idx is None
    if blocks_per_split is None:
        if _interpreting():
            blocks_per_split = K
        elif select:  # ~1 program per SM: every split repeats the top-k rounds up to its ranks
            target = max(1, _num_sms(q.device) // max(1, b * g))
            blocks_per_split = max(1, math.ceil(K / target))
        else:  # ~4 programs per SM, at most 256 splits per (row, group)
            target = max(1, (4 * _num_sms(q.device)) // max(1, b * g))
            blocks_per_split = max(1, math.ceil(K / min(target, 256)))
    ns = math.ceil(K / blocks_per_split)
    acc = torch.empty(b * g * ns, HP, DP, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * g * ns, 2, HP, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    if select:
        block_idx = torch.empty(b, g, K, dtype=torch.int32, device=q.device)
        nb_max = bs.shape[2]
        ch = min(FUSED_TOPK_CHUNK, _pow2(nb_max))
        one_chunk, local, init = ch >= nb_max, cfg.local_blocks, cfg.init_blocks
    else:
        block_idx = block_idx.contiguous()
        bs, ch, one_chunk, local, init = out, 16, True, 1, 0
    _select_attend[(b * g, ns)](
        q, k_cache, v_cache, bs, block_idx, lens if lens is not None else block_idx, acc, ml,
        _counters(b * g, q.device), out, lse, scale * LOG2E, L_all,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bs.stride(0), bs.stride(1),
        block_idx.stride(0), block_idx.stride(1), out.stride(0), out.stride(1), lse.stride(0), K, blocks_per_split, ns,
        NKV=g, GQ=GQ, HP=HP, D=d, DP=DP, BLOCK=block_size, BN=_key_tile(block_size, ATTEND_BN), SELECT=select,
        KP=_pow2(K, 2), CH=ch, ONE_CHUNK=one_chunk, LOCAL=local, INIT=init, PER_ROW=lens is not None,
        DOT_PREC=_dot_prec(q.dtype), UPCAST=_interpreting(),
        num_warps=8 if select and one_chunk and ch >= 4096 else 4)  # 4 warps would spill the 8K-key tile
    return out, lse, block_idx


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_idx: Tensor,
                            seq_lens: IntOrTensor, block_size: int, softmax_scale: Optional[float] = None,
                            blocks_per_split: Optional[int] = None, max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Attention of each new query over its group's selected blocks (block_idx [b, g, K],
    -1 = unused): (out [b, hq, d] in q's dtype, lse [b, hq] fp32). Split-K over blocks, one launch."""
    _check(q, k_cache, v_cache)
    b, _, _ = q.shape
    S, _, g, _ = k_cache.shape
    K = block_idx.shape[-1]
    if block_idx.shape != (b, g, K) or block_idx.dtype != torch.int32:
        raise ValueError(f"block_idx must be int32 [{b}, {g}, K]; got {block_idx.dtype} {tuple(block_idx.shape)}")
    lens, L_all, _ = _lens(seq_lens, b, S, q.device, max_len)
    out, lse, _ = _attend(q, k_cache, v_cache, lens, L_all, K, block_size, softmax_scale, blocks_per_split,
                          block_idx=block_idx)
    return out, lse


def select_attend_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_scores: Tensor, seq_lens: IntOrTensor,
                         cfg: MSAConfig, softmax_scale: Optional[float] = None, blocks_per_split: Optional[int] = None,
                         max_len: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Step 2 alone: top-k over ``block_scores`` (index_block_max_triton's) + attention +
    merge, one launch: (out, lse, block_idx)."""
    _check(q, k_cache, v_cache)
    lens, L_all, _ = _lens(seq_lens, q.shape[0], k_cache.shape[0], q.device, max_len)
    return _attend(q, k_cache, v_cache, lens, L_all, cfg.topk, cfg.block_size, softmax_scale, blocks_per_split,
                   bs=block_scores, cfg=cfg)


def msa_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, iq: Tensor, ik_cache: Tensor,
                      seq_lens: IntOrTensor, cfg: MSAConfig, softmax_scale: Optional[float] = None,
                      block_idx: Optional[Tensor] = None, max_len: Optional[int] = None,
                      blocks_per_program: Optional[int] = None,
                      blocks_per_split: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One MSA decode step on the kernels, two launches: (out [b, hq, d], lse [b, hq],
    block_idx [b, g, K]). ``seq_lens`` a device tensor with ``max_len`` (>= every length):
    no host sync, CUDA-graph capturable. ``block_idx`` given: attention only."""
    _check(q, k_cache, v_cache)
    if iq.shape[:2] != (q.shape[0], k_cache.shape[2]):
        raise ValueError(f"iq must be [b={q.shape[0]}, g={k_cache.shape[2]}, di]; got {tuple(iq.shape)}")
    if block_idx is not None:
        out, lse = decode_attention_triton(q, k_cache, v_cache, block_idx, seq_lens, cfg.block_size, softmax_scale,
                                           blocks_per_split, max_len)
        return out, lse, block_idx
    _check_index(iq, ik_cache)
    lens, L_all, L_max = _lens(seq_lens, q.shape[0], k_cache.shape[0], q.device, max_len)
    bs = _index(iq, ik_cache, lens, L_all, L_max, cfg, blocks_per_program)
    return _attend(q, k_cache, v_cache, lens, L_all, cfg.topk, cfg.block_size, softmax_scale, blocks_per_split,
                   bs=bs, cfg=cfg)


def full_decode_selection(b: int, g: int, L_max: int, block_size: int, device) -> Tensor:
    """block_idx [b, g, nb] selecting every block of an L_max-token cache (dense decoding;
    shorter rows mask their missing keys by length)."""
    nb = math.ceil(L_max / block_size)
    return torch.arange(nb, dtype=torch.int32, device=device).expand(b, g, nb).contiguous()


def dense_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: IntOrTensor,
                        block_size: int = 128, softmax_scale: Optional[float] = None,
                        blocks_per_split: Optional[int] = None, max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Flash-decoding over every cached key (split-K, GQA-packed): (out, lse)."""
    _check(q, k_cache, v_cache)
    _, _, L_max = _lens(seq_lens, q.shape[0], k_cache.shape[0], q.device, max_len)
    sel = full_decode_selection(q.shape[0], k_cache.shape[2], L_max, block_size, q.device)
    return decode_attention_triton(q, k_cache, v_cache, sel, seq_lens, block_size, softmax_scale, blocks_per_split,
                                   max_len)


# ----------------------------------------------------------------------------- CUDA graphs
class GraphedStep:
    """A decode step captured once as a CUDA graph and replayed: ``fn(*static)`` must take
    only device tensors whose storage stays put (the caches, and the step's inputs in
    ``static``); ``step(*values)`` copies new values into ``static`` and replays, returning
    the captured outputs (overwritten by the next replay). Lengths go in as a device tensor
    with ``max_len`` fixed in ``fn``, so a growing sequence needs no recapture. Two warm-up
    calls on a side stream compile the kernels first (no compilation inside a capture)."""

    def __init__(self, fn, *static: Tensor, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs a CUDA device (CUDA graphs); on CPU call the step directly")
        self.static = static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*static)

    def replay(self):
        self.graph.replay()
        return self.outputs

    def __call__(self, *values: Tensor):
        for dst, src in zip(self.static, values):
            if src is not None and src is not dst:
                dst.copy_(src, non_blocking=True)
        return self.replay()


__all__ = ["GraphedStep", "IK_FP8", "decode_attention_triton", "decode_select_triton", "dense_decode_triton",
           "full_decode_selection", "index_block_max_triton", "msa_decode_triton", "select_attend_triton"]

"""Triton kernels of the MSA index branch: fused exp-free top-k block selection, the
index log-sum-exp over the selected tokens, and the KL-distillation backward (sparse
and dense teacher) w.r.t. the index query / key.

Layouts are the reference's (see :mod:`msa_megatron.ops.naive`):

    q [b, sq, hq, d]   k [b, sk, g, d]   iq [b, sq, g, di]   ik [b, sk, di]
    q_pos [sq] int64 (global query positions; keys sit at 0..sk-1)
    block_idx [b, g, sq, K] int32, ascending, unused slots -1
    main_lse [b, hq, sq] fp32 (natural log, of softmax(q.k * softmax_scale))
    index_lse [b, g, sq] fp32 (natural log, of softmax(iq.ik * cfg.index_softmax_scale))

Public wrappers (called by ``ops/triton_op.py``):

* :func:`index_select` -> ``(block_idx, index_lse)``: the selection is bit-identical to
  ``naive.select`` up to fp32 near-ties (see the tie rule below); ``index_lse``
  matches ``naive.selected_index_lse`` on that selection.
* :func:`sparse_kl_backward` -> ``(kl, d_iq, d_ik[, stats])``: KL over the selected tokens
  (the ``msa`` phase), value and gradients in one pass, reusing the main LSE and index LSE;
  ``return_stats=True`` adds the index / main entropy means from the same pass.
* :func:`dense_kl_backward` -> ``(kl, d_iq, d_ik[, stats])``: KL over all causal tokens (the
  ``msa_warmup`` phase, dense teacher); runs its own exp pass for the dense index LSE.
* :func:`dense_main_lse`: the dense main-branch LSE from torch's flash attention op (CUDA)
  or the reference (CPU), for callers that have none.

Design (docs/kernels_index.md has the details):

* Selection: one program per tile of ``BLOCK_M`` flattened (query, group) rows of one
  batch (iq[b] viewed as [sq * g, di]: every tile covers all groups of its queries, so
  each shared index-key block is loaded once for all groups). The program streams the
  causally visible key blocks in ascending order, S = iq_tile @ ik_blk^T on tensor cores,
  keeps the row max per block (no exp: ranking by raw score), turns forced blocks into
  +inf, and pushes the block score into a per-row running top-k kept in registers:
  replace the current minimum only when strictly greater; among equal minima evict the
  highest block index. Since blocks arrive in ascending order this is exactly a top-k
  under the order (score desc, block index asc) -- the reference's stable-sort tie rule.
  The [s, s] score matrix never exists.
* Index LSE and KL backward: "KV-outer" over a reverse index (key block -> rows that
  selected it) built with one torch sort; each work item (block, <= CHUNK rows) computes
  its tiles with tensor cores, accumulates dL/d(ik_block) in registers (one atomic add
  per item) and adds dL/d(iq_row) with fp32 atomics.

Kernels take fp32, bf16 or fp16 inputs (fp32 dots run in IEEE fp32, for tests); they run
under ``TRITON_INTERPRET=1`` on CPU tensors for the CPU test-suite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import MSAConfig
from . import common as _common
from .csr import SelectionCSR, csr_for
from .tuning import IndexConfig, index_env_overrides

#: Fill kernel outputs with garbage (NaN / sentinel) before launching, so entries a kernel
#: fails to write are visible. Set by scripts/gpu_check_index.py and the tests (this module's
#: own switch; MSA_POISON_OUTPUTS=1 sets it for the process).
POISON_OUTPUTS = _common.POISON_OUTPUTS

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_BIG = 2**31 - 1
LOG2E = 1.4426950408889634


UnsupportedInputError = _common.UnsupportedInputError
_interpreting = _common.interpreting


# ----------------------------------------------------------------------------- launch configuration
#: The configuration every call starts from on CUDA (the interpreter uses its own tiles).
#: Replace it to change a default for the process, e.g.
#: ``triton_index.DEFAULT_INDEX_CONFIG = IndexConfig(fp8_prefill=True)``; ``MSA_INDEX_KERNEL``
#: (ops/tuning.py) still applies on top (benchmark sweeps).
DEFAULT_INDEX_CONFIG = IndexConfig()

#: The interpreter's tiles: its cost is per op, not per element -> fewer, larger tiles.
_INTERPRETER_TILES = dict(sel_block_m=64, sel_warps=4, sel_stages=1, items_block_q=64, items_chunk=128,
                          kl_warps=4, kl_stages=1, kl_block_n=128, lse_warps=4)


def _launch_config(device: torch.device) -> IndexConfig:
    """DEFAULT_INDEX_CONFIG + the environment overrides (read per call); off CUDA the
    interpreter's tiles, where only ``fp8_prefill`` may be overridden."""
    if device.type != "cuda":
        base = IndexConfig(**_INTERPRETER_TILES, fp8_prefill=DEFAULT_INDEX_CONFIG.fp8_prefill)
        return IndexConfig.from_spec(index_env_overrides(include_tiles=False), base, source=IndexConfig.ENV)
    return IndexConfig.from_spec(index_env_overrides(), DEFAULT_INDEX_CONFIG, source=IndexConfig.ENV)


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _sub_block(block_size: int) -> int:
    """Largest power of two dividing block_size, at most 128: the key tile width."""
    bn = block_size & (-block_size)
    return min(bn, 128)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _interpreting() else "tf32"


def _upcast() -> bool:
    """The interpreter (triton 3.7) gets bf16/fp16 tl.dot wrong: there the kernels upcast
    the dot operands to fp32, which equals the GPU's exact products + fp32 accumulation."""
    return _interpreting()


# ----------------------------------------------------------------------------- input checks
def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise UnsupportedInputError(f"all inputs must be on one device; got {t.device} and {dev}")
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and _interpreting():
        return
    raise UnsupportedInputError(
        f"Triton index kernels need CUDA tensors (got {dev.type}); CPU tensors run only under TRITON_INTERPRET=1"
    )


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise UnsupportedInputError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def _check_index_inputs(iq: Tensor, ik: Tensor, cfg: MSAConfig) -> Tuple[int, int, int, int, int]:
    if iq.dim() != 4:
        raise UnsupportedInputError(f"iq must be [b, sq, g, di]; got shape {tuple(iq.shape)}")
    if ik.dim() != 3:
        raise UnsupportedInputError(f"ik must be [b, sk, di] (one shared index key head); got shape {tuple(ik.shape)}")
    b, sq, g, di = iq.shape
    if ik.shape[0] != b or ik.shape[2] != di:
        raise UnsupportedInputError(f"ik {tuple(ik.shape)} does not match iq {tuple(iq.shape)} in batch / index dim")
    if di != cfg.index_dim:
        raise UnsupportedInputError(f"index dim {di} differs from cfg.index_dim={cfg.index_dim}")
    if di > 256:
        raise UnsupportedInputError(f"index dim {di} > 256 is not supported by the Triton index kernels")
    _check_dtype("iq", iq)
    _check_dtype("ik", ik)
    if iq.dtype != ik.dtype:
        raise UnsupportedInputError(f"iq ({iq.dtype}) and ik ({ik.dtype}) must share a dtype")
    _check_device(iq, ik)
    sk = ik.shape[1]
    if sk == 0:
        raise UnsupportedInputError("sk = 0 keys: nothing to select")
    return b, sq, g, di, sk


def _positions(q_pos: Optional[Tensor], sq: int, sk: int, device: torch.device) -> Tensor:
    """int64 [sq] query positions; the default is the last sq positions (as the reference).

    The range check needs a device sync: it runs on CPU and when MSA_CHECK_POSITIONS=1."""
    if q_pos is None:
        if sq > sk:
            raise UnsupportedInputError(f"sq={sq} > sk={sk} needs explicit q_pos")
        return torch.arange(sk - sq, sk, device=device, dtype=torch.int64)
    if q_pos.shape != (sq,):
        raise UnsupportedInputError(f"q_pos must have shape [{sq}], got {tuple(q_pos.shape)}")
    if q_pos.dtype.is_floating_point or q_pos.dtype == torch.bool:
        raise UnsupportedInputError(f"q_pos must hold integers, got {q_pos.dtype}")
    q_pos = q_pos.to(device=device, dtype=torch.int64).contiguous()
    if sq and (device.type == "cpu" or _common.check_positions_enabled()):
        lo, hi = int(q_pos.min()), int(q_pos.max())
        if lo < 0 or hi >= sk:
            raise UnsupportedInputError(f"q_pos must lie in [0, {sk - 1}] (keys cover positions 0..sk-1); got [{lo}, {hi}]")
    return q_pos


_Docs, _doc_start = _common.DocArgs, _common.doc_args


# ----------------------------------------------------------------------------- kernel 1: streaming top-k selection
# Bodies are written inline (no nested @triton.jit helpers in hot loops): the interpreter
# pays milliseconds per helper call, and the two loop phases (all keys visible / masked
# edge) are one source loop unrolled by ``tl.static_range(2)``, compiled twice.
@triton.jit
def _select_kernel(
    iq_ptr, ik_ptr, qpos_ptr, ds_ptr, out_ptr, best_ptr,
    sq, sk, NG,
    s_iq_b, s_iq_s, s_iq_g,
    s_ik_b, s_ik_s,
    s_o_b, s_o_g, s_o_s, s_ds_b,
    DI: tl.constexpr, DIP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, LAZY: tl.constexpr, SCORE_ONLY: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    """Rows = flattened (query t, group h) pairs of batch pid_b; one tile of BLOCK_M rows.

    Key blocks are streamed in ascending order in three ranges (phases): 0, the head
    [n_lo, f_lo) where some row's document starts (masked by doc start and causality;
    only with HAS_DOC), 1, the body [f_lo, f_hi) where every key is visible to every row
    (no mask), 2, the causal edge [f_hi, n_end) (masked by causality). Without documents
    phase 0 is not compiled and the kernel is the plain causal one."""
    num_m = tl.num_programs(0)
    pid_m = num_m - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    pid_b = tl.program_id(1).to(tl.int64)
    n_rows = sq * NG
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // NG
    h = rows % NG
    pos = tl.load(qpos_ptr + t, mask=row_ok, other=0).to(tl.int32)
    offs_d = tl.arange(0, DIP)
    iq_t = tl.load(
        iq_ptr + pid_b * s_iq_b + t[:, None].to(tl.int64) * s_iq_s + h[:, None] * s_iq_g + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < DI), other=0.0,
    )
    if UPCAST:
        iq_t = iq_t.to(tl.float32)
    ik_base = ik_ptr + pid_b * s_ik_b
    own = pos // BLOCK
    min_pos = tl.min(tl.where(row_ok, pos, 2147483647), axis=0)
    max_pos = tl.max(tl.where(row_ok, pos, 0), axis=0)
    n_full = (min_pos + 1) // BLOCK  # blocks [.., n_full): every key <= every row's position
    n_end = max_pos // BLOCK + 1  # blocks [n_full, n_end): causal edge, masked
    if HAS_DOC:  # per-row lower bound: keys < doc_start[t] are invisible
        dlo = tl.load(ds_ptr + pid_b * s_ds_b + t, mask=row_ok, other=0).to(tl.int32)
        first = dlo // BLOCK  # the row's document's first block
        lo_min = tl.min(tl.where(row_ok, dlo, 2147483647), axis=0)
        lo_max = tl.max(tl.where(row_ok, dlo, 0), axis=0)
        n_lo = lo_min // BLOCK
        f_lo = tl.minimum((lo_max + BLOCK - 1) // BLOCK, n_end)  # blocks >= f_lo: no row's doc starts after them
        f_hi = tl.maximum(n_full, f_lo)
    else:
        n_lo = 0
        f_lo = 0
        f_hi = n_full

    slot = tl.arange(0, KP)
    topi = tl.zeros([BLOCK_M, KP], dtype=tl.int32) - 1 - slot[None, :]  # distinct empty-slot ids < 0
    # Slots >= K (K not a power of two) hold +inf forever: never the minimum that gets evicted.
    topv = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    curmin = tl.full([BLOCK_M], float("-inf"), tl.float32)  # smallest held score
    evict = tl.full([BLOCK_M], -1, tl.int32)  # id of the slot to evict: highest id among the minima
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)

    for phase in tl.static_range(0 if HAS_DOC else 1, 3):
        if phase == 0:
            lo = n_lo
            hi = f_lo
        elif phase == 1:
            lo = f_lo
            hi = f_hi
        else:
            lo = f_hi
            hi = n_end
        for n in range(lo, hi):
            score = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for sub in tl.static_range(NSUB):
                kk = n * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                k_ptrs = ik_base + kk[:, None].to(tl.int64) * s_ik_s + offs_d[None, :]
                if phase == 1:  # whole block inside [0, sk): no key mask (keeps loads vectorised)
                    if DI == DIP:
                        ikb = tl.load(k_ptrs)
                    else:
                        ikb = tl.load(k_ptrs, mask=offs_d[None, :] < DI, other=0.0)
                else:
                    ikb = tl.load(k_ptrs, mask=(kk[:, None] < sk) & (offs_d[None, :] < DI), other=0.0)
                if UPCAST:
                    ikb = ikb.to(tl.float32)
                s = tl.dot(iq_t, tl.trans(ikb), input_precision=DOT_PREC)
                if phase == 0:
                    s = tl.where((kk[None, :] <= pos[:, None]) & (kk[None, :] < sk) & (kk[None, :] >= dlo[:, None]),
                                 s, float("-inf"))
                if phase == 2:
                    s = tl.where((kk[None, :] <= pos[:, None]) & (kk[None, :] < sk), s, float("-inf"))
                score = tl.maximum(score, tl.max(s, axis=1))
            if SCORE_ONLY:
                best = tl.maximum(best, score)
            else:
                if HAS_DOC:  # forced blocks: own + local (if visible), init blocks from the document's first
                    forced = (((n > own - LOCAL_BLOCKS) | (n < first + INIT_BLOCKS)) & (n <= own)) & (n >= first)
                else:
                    forced = ((n > own - LOCAL_BLOCKS) & (n <= own)) | ((n < INIT_BLOCKS) & (n <= own))
                score = tl.where(forced, float("inf"), score)
                # Strictly greater than the current minimum -> replace it (ties keep the
                # lower, earlier block); the evicted slot is the highest index among minima.
                upd = score > curmin
                if LAZY:
                    if tl.max(upd.to(tl.int32), axis=0) > 0:
                        hit = (topi == evict[:, None]) & upd[:, None]
                        topv = tl.where(hit, score[:, None], topv)
                        topi = tl.where(hit, n, topi)
                        curmin = tl.min(topv, axis=1)
                        evict = tl.max(tl.where(topv == curmin[:, None], topi, -2147483647), axis=1)
                else:
                    hit = (topi == evict[:, None]) & upd[:, None]
                    topv = tl.where(hit, score[:, None], topv)
                    topi = tl.where(hit, n, topi)
                    curmin = tl.min(topv, axis=1)
                    evict = tl.max(tl.where(topv == curmin[:, None], topi, -2147483647), axis=1)

    if SCORE_ONLY:
        tl.store(best_ptr + pid_b * n_rows + rows, best, mask=row_ok)
    else:
        # Emit held blocks ascending (selection sort over K slots), -1 for empty slots.
        key = tl.where(topi >= 0, topi, 2147483647)
        obase = out_ptr + pid_b * s_o_b + h.to(tl.int64) * s_o_g + t.to(tl.int64) * s_o_s
        for r in tl.static_range(K):
            m = tl.min(key, axis=1)
            tl.store(obase + r, tl.where(m == 2147483647, -1, m), mask=row_ok)
            key = tl.where(key == m[:, None], 2147483647, key)


# ----------------------------------------------------------------------------- reverse index (key block -> rows)
@dataclass
class ReverseIndex:
    """Rows that selected each key block, cut into work items of at most ``chunk`` rows.

    ``order`` [E] int32 (int64 beyond 2**31 entries): flat entry ids e = ((b * g + g_i) * sq + t) * K + slot of the
    selections, grouped by (b, g, block) and ascending in t inside a group (unused -1
    slots sort last and belong to no item). Item i covers
    ``order[item_start[i]:item_end[i]]``, all of one ``item_key[i] = (b * g + g_i) * nb +
    block``; on CUDA the item arrays have a static upper-bound length (no host sync) and
    the surplus items are empty. ``order`` is the selection's CSR (``csr``, ops/csr.py), which
    the op hands on to the main kernels: one reverse index per selection."""

    order: Tensor
    item_key: Tensor
    item_start: Tensor
    item_end: Tensor
    nb: int
    chunk: int
    shape: Tuple[int, int, int, int]
    csr: Optional[SelectionCSR] = None


def build_reverse_index(block_idx: Tensor, nb: int, chunk: int, csr: Optional[SelectionCSR] = None) -> ReverseIndex:
    """Work items of at most ``chunk`` rows over the selection's CSR (``ops/csr.py``; ``csr``:
    the one the op built for this selection, reused, else built here)."""
    b, g, sq, K = block_idx.shape
    dev = block_idx.device
    nkeys = b * g * nb
    csr = csr_for(block_idx, nb, csr)
    order, seg_start, seg_end = csr.order, csr.seg_start, csr.seg_end
    counts = seg_end - seg_start
    items_per = (counts + chunk - 1) // chunk
    items_cum = torch.cumsum(items_per, 0)
    max_items = (b * g * sq * K + chunk - 1) // chunk + nkeys  # static bound: no sync
    i = torch.arange(max_items, device=dev, dtype=torch.int64)
    key_of = torch.searchsorted(items_cum, i, right=True)
    real = key_of < nkeys
    kc = key_of.clamp(max=max(nkeys - 1, 0))
    first = items_cum[kc] - items_per[kc]
    start = seg_start[kc] + (i - first) * chunk
    end = torch.minimum(start + chunk, seg_end[kc])
    zero = torch.zeros_like(start)
    start, end = torch.where(real, start, zero), torch.where(real, end, zero)
    if dev.type == "cpu":  # syncing is free here: drop the empty tail items (interpreter speed)
        n_real = int(real.sum())
        kc, start, end = kc[:n_real], start[:n_real], end[:n_real]
    return ReverseIndex(order=order, item_key=kc, item_start=start, item_end=end, nb=nb, chunk=chunk,
                        shape=(b, g, sq, K), csr=csr)


# ----------------------------------------------------------------------------- kernel 2: per-(row, block) index LSE
@triton.jit
def _selected_lse_kernel(
    iq_ptr, ik_ptr, qpos_ptr, ds_ptr, order_ptr, ikey_ptr, istart_ptr, iend_ptr, part_ptr,
    sq, sk, NG, nb, iscale_log2,
    s_iq_b, s_iq_s, s_iq_g, s_ik_b, s_ik_s, s_ds_b,
    K: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    NSUB: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """part[e] = log2-sum-exp2 of entry e's row's scaled index scores over its block's
    visible keys (one work item of the reverse index per program)."""
    pid = tl.program_id(0)
    key = tl.load(ikey_ptr + pid)
    start = tl.load(istart_ptr + pid)
    end = tl.load(iend_ptr + pid)
    bg = key // nb
    n = key % nb
    bi = bg // NG
    gi = bg % NG
    offs_d = tl.arange(0, DIP)
    ar = tl.arange(0, BLOCK_Q)
    for off in range(start, end, BLOCK_Q):
        rm = off + ar < end
        e = tl.load(order_ptr + off + ar, mask=rm, other=0).to(tl.int64)  # int32 in memory
        t = (e // K) % sq
        pos = tl.load(qpos_ptr + t, mask=rm, other=0)
        if HAS_DOC:
            dlo = tl.load(ds_ptr + bi * s_ds_b + t, mask=rm, other=0)
        iq_r = tl.load(iq_ptr + bi * s_iq_b + t[:, None] * s_iq_s + gi * s_iq_g + offs_d[None, :],
                       mask=rm[:, None] & (offs_d[None, :] < DI), other=0.0)
        if UPCAST:
            iq_r = iq_r.to(tl.float32)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for sub in tl.static_range(NSUB):
            kk = n * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            ikb = tl.load(ik_ptr + bi * s_ik_b + kk[:, None].to(tl.int64) * s_ik_s + offs_d[None, :],
                          mask=(kk[:, None] < sk) & (offs_d[None, :] < DI), other=0.0)
            if UPCAST:
                ikb = ikb.to(tl.float32)
            s = tl.dot(iq_r, tl.trans(ikb), input_precision=DOT_PREC) * iscale_log2
            s = tl.where((kk[None, :] <= pos[:, None]) & (kk[None, :] < sk), s, float("-inf"))
            if HAS_DOC:
                s = tl.where(kk[None, :] >= dlo[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m = m_new
        tl.store(part_ptr + e, m + tl.log2(tl.where(rm, l, 1.0)), mask=rm)


# ----------------------------------------------------------------------------- kernel 3: dense index LSE (warmup)
@triton.jit
def _dense_lse_kernel(
    iq_ptr, ik_ptr, qpos_ptr, ds_ptr, lse_ptr,
    sq, sk, NG, iscale_log2,
    s_iq_b, s_iq_s, s_iq_g, s_ik_b, s_ik_s, s_l_b, s_l_g, s_ds_b,
    DI: tl.constexpr, DIP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """Natural-log LSE of the scaled index scores over every causal (same-document) key
    (tiles and the three block ranges as kernel 1)."""
    num_m = tl.num_programs(0)
    pid_m = num_m - 1 - tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n_rows = sq * NG
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // NG
    h = rows % NG
    pos = tl.load(qpos_ptr + t, mask=row_ok, other=0).to(tl.int32)
    offs_d = tl.arange(0, DIP)
    iq_t = tl.load(
        iq_ptr + pid_b * s_iq_b + t[:, None].to(tl.int64) * s_iq_s + h[:, None] * s_iq_g + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < DI), other=0.0,
    )
    if UPCAST:
        iq_t = iq_t.to(tl.float32)
    ik_base = ik_ptr + pid_b * s_ik_b
    min_pos = tl.min(tl.where(row_ok, pos, 2147483647), axis=0)
    max_pos = tl.max(tl.where(row_ok, pos, 0), axis=0)
    n_full = (min_pos + 1) // BLOCK
    n_end = max_pos // BLOCK + 1
    if HAS_DOC:
        dlo = tl.load(ds_ptr + pid_b * s_ds_b + t, mask=row_ok, other=0).to(tl.int32)
        lo_min = tl.min(tl.where(row_ok, dlo, 2147483647), axis=0)
        lo_max = tl.max(tl.where(row_ok, dlo, 0), axis=0)
        n_lo = lo_min // BLOCK
        f_lo = tl.minimum((lo_max + BLOCK - 1) // BLOCK, n_end)
        f_hi = tl.maximum(n_full, f_lo)
    else:
        n_lo = 0
        f_lo = 0
        f_hi = n_full
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for phase in tl.static_range(0 if HAS_DOC else 1, 3):
        if phase == 0:
            lo = n_lo
            hi = f_lo
        elif phase == 1:
            lo = f_lo
            hi = f_hi
        else:
            lo = f_hi
            hi = n_end
        for n in range(lo, hi):
            for sub in tl.static_range(NSUB):
                kk = n * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                k_ptrs = ik_base + kk[:, None].to(tl.int64) * s_ik_s + offs_d[None, :]
                if phase == 1:  # whole block inside [0, sk): no key mask (keeps loads vectorised)
                    if DI == DIP:
                        ikb = tl.load(k_ptrs)
                    else:
                        ikb = tl.load(k_ptrs, mask=offs_d[None, :] < DI, other=0.0)
                else:
                    ikb = tl.load(k_ptrs, mask=(kk[:, None] < sk) & (offs_d[None, :] < DI), other=0.0)
                if UPCAST:
                    ikb = ikb.to(tl.float32)
                s = tl.dot(iq_t, tl.trans(ikb), input_precision=DOT_PREC) * iscale_log2
                if phase == 0:
                    s = tl.where((kk[None, :] <= pos[:, None]) & (kk[None, :] < sk) & (kk[None, :] >= dlo[:, None]),
                                 s, float("-inf"))
                if phase == 2:
                    s = tl.where((kk[None, :] <= pos[:, None]) & (kk[None, :] < sk), s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                m = m_new
    lse = (m + tl.log2(tl.where(row_ok, l, 1.0))) / 1.4426950408889634
    tl.store(lse_ptr + pid_b * s_l_b + h.to(tl.int64) * s_l_g + t, lse, mask=row_ok)


# ----------------------------------------------------------------------------- kernel 4: KL backward
@triton.jit
def _kl_kernel(
    q_ptr, k_ptr, iq_ptr, ik_ptr, mlse_ptr, ilse_ptr, qpos_ptr, ds_ptr, diq_ptr, dik_ptr, kl_ptr, ent_ptr,
    order_ptr, ikey_ptr, istart_ptr, iend_ptr,
    sq, sk, NG, nb, scale_log2, iscale, coef,
    s_q_b, s_q_s, s_q_h, s_k_b, s_k_s, s_k_g, s_iq_b, s_iq_s, s_iq_g, s_ik_b, s_ik_s,
    s_ml_b, s_ml_h, s_il_b, s_il_g, s_d_b, s_d_s, s_d_g, s_dk_b, s_dk_s, s_ds_b,
    K: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr,
    DENSE: tl.constexpr, STATS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """KV-outer KL backward. A program owns one (b, g, key block) and a set of rows:
    sparse -> one reverse-index item (rows that selected the block); dense -> query chunk
    ``program_id(1)`` of all queries (causality masks the rest). Per [rows, keys] tile:

        P = mean_h exp(q_h.k * scale - main_lse_h)      (teacher, over the valid tokens)
        log Q = iq.ik * iscale - index_lse,  Q = exp(log Q)
        KL += P (log P - log Q);  dS = coef * (Q - P)   (coef = iscale * grad_scale / norm)
        d_iq[rows] += dS @ ik_blk (fp32 atomics);  d_ik[blk] += dS^T @ iq_rows (registers,
        one atomic add per program).

    STATS: also the entropy sums of the tile's valid entries, -sum Q ln Q (student) and
    -sum_h sum P_h ln P_h (each head's main softmax): ent[prog] = (index, main). Entropy
    is additive over the disjoint token sets of a row, so per-program partial sums of the
    per-entry terms add up to the row entropies (no per-row state needed).

    HAS_DOC: keys before the row's document start (ds_ptr [b, sq]) are invalid too, and a
    tile no row can see (all rows' documents start after it) is skipped."""
    if DENSE:
        pid = tl.program_id(0)
        n = pid % nb
        bg = pid // nb
        start = tl.program_id(1) * CHUNK
        end = tl.minimum(start + CHUNK, sq)
        prog = pid * tl.num_programs(1) + tl.program_id(1)
    else:
        pid = tl.program_id(0)
        key = tl.load(ikey_ptr + pid)
        start = tl.load(istart_ptr + pid)
        end = tl.load(iend_ptr + pid)
        bg = key // nb
        n = key % nb
        prog = pid
    bi = (bg // NG).to(tl.int64)
    gi = bg % NG
    ar = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, DP)
    offs_i = tl.arange(0, DIP)
    kl_acc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    ent_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # sum Q log Q (natural log)
    ent_m = tl.zeros([BLOCK_Q], dtype=tl.float32)  # sum_h P_h log2 P_h
    for sub in tl.static_range(NSUB):
        kk = n * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = kk < sk
        kb = tl.load(k_ptr + bi * s_k_b + kk[:, None].to(tl.int64) * s_k_s + gi * s_k_g + offs_d[None, :],
                     mask=kmask[:, None] & (offs_d[None, :] < D), other=0.0)
        ikb = tl.load(ik_ptr + bi * s_ik_b + kk[:, None].to(tl.int64) * s_ik_s + offs_i[None, :],
                      mask=kmask[:, None] & (offs_i[None, :] < DI), other=0.0)
        if UPCAST:
            kb = kb.to(tl.float32)
            ikb = ikb.to(tl.float32)
        acc = tl.zeros([BLOCK_N, DIP], dtype=tl.float32)
        for off in range(start, end, BLOCK_Q):
            rm = off + ar < end
            if DENSE:
                t = (off + ar).to(tl.int64)
            else:
                e = tl.load(order_ptr + off + ar, mask=rm, other=0).to(tl.int64)  # int32 in memory
                t = (e // K) % sq
            pos = tl.load(qpos_ptr + t, mask=rm, other=-1)
            if HAS_DOC:
                dlo = tl.load(ds_ptr + bi * s_ds_b + t, mask=rm, other=2147483647)
                sees = (pos >= n * BLOCK + sub * BLOCK_N) & (dlo < n * BLOCK + (sub + 1) * BLOCK_N)
                seen = tl.max(sees.to(tl.int32), axis=0) > 0
            else:
                seen = tl.max(pos, axis=0) >= n * BLOCK + sub * BLOCK_N
            if seen:  # some row sees a key of the tile
                valid = (kk[None, :] <= pos[:, None]) & kmask[None, :] & rm[:, None]
                if HAS_DOC:
                    valid = valid & (kk[None, :] >= dlo[:, None])
                p = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
                for hh in range(G):
                    head = gi * G + hh
                    qh = tl.load(q_ptr + bi * s_q_b + t[:, None] * s_q_s + head * s_q_h + offs_d[None, :],
                                 mask=rm[:, None] & (offs_d[None, :] < D), other=0.0)
                    if UPCAST:
                        qh = qh.to(tl.float32)
                    lse_h = tl.load(mlse_ptr + bi * s_ml_b + head * s_ml_h + t, mask=rm, other=0.0)
                    lg = tl.dot(qh, tl.trans(kb), input_precision=DOT_PREC) * scale_log2
                    lp2 = lg - (lse_h * 1.4426950408889634)[:, None]  # log2 P_h
                    ph = tl.exp2(lp2)
                    p += ph
                    if STATS:
                        ent_m += tl.sum(tl.where(valid, ph * lp2, 0.0), axis=1)
                p = tl.where(valid, p / G, 0.0)
                iq_r = tl.load(iq_ptr + bi * s_iq_b + t[:, None] * s_iq_s + gi * s_iq_g + offs_i[None, :],
                               mask=rm[:, None] & (offs_i[None, :] < DI), other=0.0)
                if UPCAST:
                    iq_r = iq_r.to(tl.float32)
                ilse = tl.load(ilse_ptr + bi * s_il_b + gi * s_il_g + t, mask=rm, other=0.0)
                logq = tl.dot(iq_r, tl.trans(ikb), input_precision=DOT_PREC) * iscale - ilse[:, None]
                qs = tl.where(valid, tl.exp(logq), 0.0)
                kl_acc += tl.sum(tl.where(valid & (p > 0), p * (tl.log(tl.where(p > 0, p, 1.0)) - logq), 0.0), axis=1)
                if STATS:
                    ent_i += tl.sum(tl.where(valid, qs * logq, 0.0), axis=1)
                ds = ((qs - p) * coef).to(ik_ptr.dtype.element_ty)  # bf16 dS, as flash-attention bwd
                if UPCAST:
                    ds = ds.to(tl.float32)
                d_iq = tl.dot(ds, ikb, input_precision=DOT_PREC)
                tl.atomic_add(diq_ptr + bi * s_d_b + t[:, None] * s_d_s + gi * s_d_g + offs_i[None, :], d_iq,
                              mask=rm[:, None] & (offs_i[None, :] < DI))
                acc += tl.dot(tl.trans(ds), iq_r, input_precision=DOT_PREC)
        # The "program has rows" condition as a [BLOCK_N] tensor, not a scalar: triton 3.9's
        # interpreter rejects a scalar term in an atomic's mask ("mask has unsupported dtype").
        nonempty = (kk * 0 + (end - start)) > 0
        tl.atomic_add(dik_ptr + bi * s_dk_b + kk[:, None].to(tl.int64) * s_dk_s + offs_i[None, :], acc,
                      mask=(kmask & nonempty)[:, None] & (offs_i[None, :] < DI))
    tl.store(kl_ptr + prog, tl.sum(kl_acc, axis=0))
    if STATS:
        tl.store(ent_ptr + 2 * prog, -tl.sum(ent_i, axis=0))
        tl.store(ent_ptr + 2 * prog + 1, -0.6931471805599453 * tl.sum(ent_m, axis=0))


# ----------------------------------------------------------------------------- Python wrappers
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _poisoned(t: Tensor, value) -> Tensor:
    if POISON_OUTPUTS:
        t.fill_(value)
    return t


def _index_constants(cfg: MSAConfig, di: int, dtype: torch.dtype) -> dict:
    bn = _sub_block(cfg.block_size)
    return dict(DI=di, DIP=_pow2_at_least(di), BLOCK=cfg.block_size, BLOCK_N=bn, NSUB=cfg.block_size // bn,
                DOT_PREC=_dot_precision(dtype), UPCAST=_upcast())


def _stages(stages: int, x: Tensor) -> int:
    """fp32 tiles are twice as large: cap the pipeline depth so shared memory fits."""
    return min(stages, 2) if x.element_size() == 4 else stages


def _launch_select(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Tensor, score_only: bool,
                   docs: Optional[_Docs] = None) -> Tensor:
    b, sq, g, di = iq.shape
    sk = ik.shape[1]
    lc = _launch_config(iq.device)
    K = cfg.topk
    if score_only:
        out = torch.empty(1, device=iq.device, dtype=torch.int32)
        best = _poisoned(torch.empty(b, sq * g, device=iq.device, dtype=torch.float32), float("nan"))
    else:
        out = _poisoned(torch.empty(b, g, sq, K, device=iq.device, dtype=torch.int32), -7)
        best = torch.empty(1, device=iq.device, dtype=torch.float32)
    grid = (triton.cdiv(sq * g, lc.sel_block_m), b)
    docs = docs or _Docs(q_pos, 0, False)
    _select_kernel[grid](
        iq, ik, q_pos, docs.ptr, out, best, sq, sk, g,
        iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
        out.stride(0) if not score_only else 0, out.stride(1) if not score_only else 0,
        out.stride(2) if not score_only else 0, docs.stride_b, HAS_DOC=docs.on,
        K=K, KP=max(2, triton.next_power_of_2(K)), INIT_BLOCKS=cfg.init_blocks, LOCAL_BLOCKS=cfg.local_blocks,
        BLOCK_M=lc.sel_block_m, LAZY=lc.lazy_topk, SCORE_ONLY=score_only,
        num_warps=lc.sel_warps, num_stages=_stages(lc.sel_stages, iq), **_index_constants(cfg, di, iq.dtype),
    )
    return best if score_only else out


#: FP8 format of the opt-in FP8 index scores and its largest finite value.
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0


def fp8_index_inputs(iq: Tensor, ik: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(iq8, ik8, iq_scale, ik_scale): iq / ik quantised to float8 e4m3 for the FP8 selection.

    Scaling: iq **per row** (each (query, group) row divided by amax/448: a positive factor
    per query leaves that query's block ranking unchanged, so the kernel never applies it);
    ik **per tensor** (one factor, also ranking-neutral). Per-row ik scales would change the
    ranking and need an in-kernel multiply: the index key is RMS-normed, so one scale keeps
    every row within e4m3's range. ``iq ~ iq8 * iq_scale[..., None]``, ``ik ~ ik8 * ik_scale``."""
    if FP8_DTYPE is None:
        raise UnsupportedInputError("this torch has no float8_e4m3fn dtype: the FP8 index path needs torch >= 2.1")
    iq32, ik32 = iq.detach().float(), ik.detach().float()
    iq_scale = iq32.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    ik_scale = ik32.abs().amax().clamp_min(1e-12) / FP8_MAX
    iq8 = (iq32 / iq_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    ik8 = (ik32 / ik_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return iq8, ik8, iq_scale, ik_scale


def index_select_fp8(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *,
                     doc_start: Optional[Tensor] = None) -> Tensor:
    """Opt-in FP8 (e4m3) selection, block_idx [b, g, sq, K] int32 only (prefill: no LSE).

    Scores iq8 . ik8 run on FP8 tensor cores (H100: 1.5x the bf16 selection, kernel study
    section 4); the ranking differs from bf16 only where block scores are within FP8
    rounding of each other (near-ties). Scaling: see :func:`fp8_index_inputs`."""
    return index_select(iq, ik, cfg, q_pos, with_lse=False, fp8=True, doc_start=doc_start)[0]


def index_select(
    iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *, return_plan: bool = False,
    with_lse: bool = True, fp8: Optional[bool] = None, doc_start: Optional[Tensor] = None,
):
    """Fused index branch: causal raw scores -> per-block max -> forced + top-k blocks.

    Args:
        iq: [b, sq, g, di] index queries (one head per KV group), fp32 / bf16 / fp16.
        ik: [b, sk, di] shared index key, same dtype as iq.
        cfg: uses block_size, topk, init_blocks, local_blocks, index_dim (= di).
        q_pos: optional int [sq] global query positions in [0, sk) (default: the last sq
            positions). Context parallelism passes its chunk's positions with all keys.
        return_plan: also return the :class:`ReverseIndex` (key block -> rows), which
            :func:`sparse_kl_backward` accepts to skip rebuilding it.
        doc_start: optional int [b, sq] (or [sq]) packed documents: keys before each
            query's document start are invisible (``naive.select(doc_start=...)``).

    Returns:
        block_idx [b, g, sq, K] int32, ascending, unused slots -1 (fewer than K visible
        blocks), equal to ``naive.select`` except at fp32 near-ties of block scores
        (exact ties -> lower block index, as the reference);
        index_lse [b, g, sq] fp32 = ``naive.selected_index_lse`` (log-sum-exp of
        iq.ik * cfg.index_softmax_scale over the selected causal tokens);
        [plan] when ``return_plan``.

        with_lse=False: skip the index LSE and the reverse index (prefill / no KL): returns
        ``(block_idx, None)`` (``return_plan`` then needs with_lse).
        fp8=True: scores from FP8 e4m3 copies of iq / ik (:func:`fp8_index_inputs`); implies
        no LSE (the LSE feeds the KL, which stays in the input precision). None (default):
        FP8 when ``with_lse=False`` and the launch config's ``fp8_prefill`` is on.

    No gradient flows (selection is discrete; the KL gradient is
    :func:`sparse_kl_backward`)."""
    b, sq, g, di, sk = _check_index_inputs(iq, ik, cfg)
    if fp8 is None:
        fp8 = not with_lse and _launch_config(iq.device).fp8_prefill
    if fp8 and with_lse:
        raise UnsupportedInputError("index_select(fp8=True) computes no index LSE: pass with_lse=False")
    if return_plan and not with_lse:
        raise UnsupportedInputError("index_select(return_plan=True) needs with_lse=True (the plan is built for the LSE)")
    q_pos = _positions(q_pos, sq, sk, iq.device)
    docs = _doc_start(doc_start, b, sq, q_pos)
    iq, ik = _last_dim_contiguous(iq.detach()), _last_dim_contiguous(ik.detach())
    if sq == 0:
        block_idx = torch.empty(b, g, 0, cfg.topk, device=iq.device, dtype=torch.int32)
        if not with_lse:
            return block_idx, None
        lse = torch.empty(b, g, 0, device=iq.device, dtype=torch.float32)
        plan = build_reverse_index(block_idx, triton.cdiv(sk, cfg.block_size), _launch_config(iq.device).items_chunk)
        return (block_idx, lse, plan) if return_plan else (block_idx, lse)
    if fp8:
        iq8, ik8 = fp8_index_inputs(iq, ik)[:2]
        return _launch_select(iq8, ik8, cfg, q_pos, score_only=False, docs=docs), None
    block_idx = _launch_select(iq, ik, cfg, q_pos, score_only=False, docs=docs)
    if not with_lse:
        return block_idx, None
    plan = build_reverse_index(block_idx, triton.cdiv(sk, cfg.block_size), _launch_config(iq.device).items_chunk)
    lse = _selected_lse(iq, ik, cfg, q_pos, plan, docs)
    return (block_idx, lse, plan) if return_plan else (block_idx, lse)


def index_block_max(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *,
                    doc_start: Optional[Tensor] = None) -> Tensor:
    """Benchmark aid: the selection kernel without its top-k (max block score per row,
    [b, sq * g] fp32). Its time vs :func:`index_select`'s selection part is the top-k cost."""
    b, sq, g, di, sk = _check_index_inputs(iq, ik, cfg)
    q_pos = _positions(q_pos, sq, sk, iq.device)
    return _launch_select(_last_dim_contiguous(iq.detach()), _last_dim_contiguous(ik.detach()), cfg, q_pos, True,
                          _doc_start(doc_start, b, sq, q_pos))


def _selected_lse(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Tensor, plan: ReverseIndex,
                  docs: Optional[_Docs] = None) -> Tensor:
    b, g, sq, K = plan.shape
    di, sk = iq.shape[3], ik.shape[1]
    lc = _launch_config(iq.device)
    part = torch.full((b, g, sq, K), float("-inf"), device=iq.device, dtype=torch.float32)
    n_items = plan.item_key.numel()
    docs = docs or _Docs(q_pos, 0, False)
    if n_items:
        _selected_lse_kernel[(n_items,)](
            iq, ik, q_pos, docs.ptr, plan.order, plan.item_key, plan.item_start, plan.item_end, part,
            sq, sk, g, plan.nb, cfg.index_softmax_scale * LOG2E,
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1), docs.stride_b, HAS_DOC=docs.on,
            K=K, BLOCK_Q=lc.items_block_q, num_warps=lc.lse_warps, num_stages=1,
            **_index_constants(cfg, di, iq.dtype),
        )
    return torch.logsumexp(part / LOG2E, dim=-1)  # parts are log2-sum-exp2: to ln first


def selected_lse(iq: Tensor, ik: Tensor, block_idx: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *,
                 doc_start: Optional[Tensor] = None, csr: Optional[SelectionCSR] = None,
                 plan: Optional[ReverseIndex] = None) -> Tensor:
    """Index LSE [b, g, sq] fp32 over the tokens of a given selection (as
    ``naive.selected_index_lse``); :func:`index_select` already returns it. ``plan`` (work
    items, reused by :func:`sparse_kl_backward`) or ``csr`` (the selection's reverse index,
    ops/csr.py): what the caller already built for this selection."""
    b, sq, g, di, sk = _check_index_inputs(iq, ik, cfg)
    _check_block_idx(block_idx, b, g, sq, iq.device)
    q_pos = _positions(q_pos, sq, sk, iq.device)
    docs = _doc_start(doc_start, b, sq, q_pos)
    nb = triton.cdiv(sk, cfg.block_size)
    if plan is None or plan.shape != tuple(block_idx.shape) or plan.nb != nb:
        plan = build_reverse_index(block_idx, nb, _launch_config(iq.device).items_chunk, csr=csr)
    return _selected_lse(_last_dim_contiguous(iq.detach()), _last_dim_contiguous(ik.detach()), cfg, q_pos, plan, docs)


def dense_index_lse(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None, *,
                    doc_start: Optional[Tensor] = None) -> Tensor:
    """Index LSE [b, g, sq] fp32 over every causal (same-document) key (the warmup
    student's normaliser)."""
    b, sq, g, di, sk = _check_index_inputs(iq, ik, cfg)
    q_pos = _positions(q_pos, sq, sk, iq.device)
    docs = _doc_start(doc_start, b, sq, q_pos)
    iq, ik = _last_dim_contiguous(iq.detach()), _last_dim_contiguous(ik.detach())
    lc = _launch_config(iq.device)
    lse = _poisoned(torch.empty(b, g, sq, device=iq.device, dtype=torch.float32), float("nan"))
    if sq:
        _dense_lse_kernel[(triton.cdiv(sq * g, lc.sel_block_m), b)](
            iq, ik, q_pos, docs.ptr, lse, sq, sk, g, cfg.index_softmax_scale * LOG2E,
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1), lse.stride(0), lse.stride(1),
            docs.stride_b, HAS_DOC=docs.on,
            BLOCK_M=lc.sel_block_m, num_warps=lc.sel_warps, num_stages=_stages(lc.sel_stages, iq),
            **_index_constants(cfg, di, iq.dtype),
        )
    return lse


def _check_block_idx(block_idx: Tensor, b: int, g: int, sq: int, device) -> None:
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (b, g, sq):
        raise UnsupportedInputError(f"block_idx must be [b={b}, g={g}, sq={sq}, K]; got {tuple(block_idx.shape)}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInputError(f"block_idx must be int32 or int64, got {block_idx.dtype}")
    if block_idx.device != device:
        raise UnsupportedInputError(f"block_idx is on {block_idx.device}, the index inputs on {device}")


def _check_kl_inputs(q: Tensor, k: Tensor, iq: Tensor, ik: Tensor, main_lse: Tensor, cfg: MSAConfig):
    b, sq, g, di, sk = _check_index_inputs(iq, ik, cfg)
    if q.dim() != 4 or k.dim() != 4:
        raise UnsupportedInputError(f"q [b, sq, hq, d] and k [b, sk, g, d] expected; got {tuple(q.shape)}, {tuple(k.shape)}")
    hq, d = q.shape[2], q.shape[3]
    if q.shape[:2] != (b, sq) or k.shape != (b, sk, g, d):
        raise UnsupportedInputError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match iq {tuple(iq.shape)} / ik {tuple(ik.shape)}"
        )
    if hq % g:
        raise UnsupportedInputError(f"query heads ({hq}) must be a multiple of KV groups ({g})")
    if d > 256:
        raise UnsupportedInputError(f"head dim {d} > 256 is not supported by the Triton KL kernels")
    _check_dtype("q", q)
    _check_dtype("k", k)
    if q.dtype != k.dtype:
        raise UnsupportedInputError(f"q ({q.dtype}) and k ({k.dtype}) must share a dtype")
    if main_lse.shape != (b, hq, sq) or main_lse.dtype != torch.float32:
        raise UnsupportedInputError(f"main_lse must be fp32 [b={b}, hq={hq}, sq={sq}]; got {main_lse.dtype} {tuple(main_lse.shape)}")
    _check_device(q, k, iq, ik, main_lse)
    return b, sq, g, di, sk, hq, d


def _kl_common(q, k, iq, ik, main_lse, index_lse, cfg, softmax_scale, normalizer, grad_scale):
    b, sq, g, di, sk, hq, d = _check_kl_inputs(q, k, iq, ik, main_lse, cfg)
    if index_lse.shape != (b, g, sq) or index_lse.dtype != torch.float32:
        raise UnsupportedInputError(f"index_lse must be fp32 [b={b}, g={g}, sq={sq}]; got {index_lse.dtype} {tuple(index_lse.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    norm = float(normalizer if normalizer is not None else max(1, b * g * sq))
    if norm <= 0:
        raise UnsupportedInputError(f"normalizer must be > 0, got {norm}")
    gs = float(grad_scale) if not isinstance(grad_scale, Tensor) else 1.0
    tens = [_last_dim_contiguous(x.detach()) for x in (q, k, iq, ik)]
    d_iq32 = torch.zeros(b, sq, g, di, device=iq.device, dtype=torch.float32)
    d_ik32 = torch.zeros(b, sk, di, device=iq.device, dtype=torch.float32)
    consts = dict(G=hq // g, D=d, DP=_pow2_at_least(d), **_index_constants(cfg, di, iq.dtype))
    kl_bn = _launch_config(iq.device).kl_block_n
    if kl_bn & (kl_bn - 1) or kl_bn < 16:
        raise UnsupportedInputError(f"KL key tile {kl_bn} must be a power of two >= 16")
    consts["BLOCK_N"] = min(consts["BLOCK_N"], kl_bn)
    consts["NSUB"] = cfg.block_size // consts["BLOCK_N"]
    if torch.float32 in (q.dtype, iq.dtype):
        consts["DOT_PREC"] = "ieee"
    scalars = (scale * LOG2E, cfg.index_softmax_scale, cfg.index_softmax_scale * gs / norm)
    return tens, d_iq32, d_ik32, consts, scalars, norm, (b, sq, g, di, sk, hq, d)


def _lse_rows_contiguous(x: Tensor) -> Tensor:
    """The KL kernels index LSE rows with unit stride along the query axis."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(q, k, iq, ik, main_lse, index_lse, d_iq32, d_ik32):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1),
            main_lse.stride(0), main_lse.stride(1), index_lse.stride(0), index_lse.stride(1),
            d_iq32.stride(0), d_iq32.stride(1), d_iq32.stride(2), d_ik32.stride(0), d_ik32.stride(1))


def _stats_buffer(n_progs: int, return_stats: bool, kl_part: Tensor) -> Tensor:
    """Per-program (index, main) entropy sums; without stats the kernel never touches it."""
    if not return_stats:
        return kl_part
    return torch.zeros(max(n_progs, 1), 2, device=kl_part.device, dtype=torch.float32)


def _finish(kl_part: Tensor, norm: float, d_iq32: Tensor, d_ik32: Tensor, iq: Tensor, ik: Tensor, grad_scale,
            ent_part: Optional[Tensor] = None, G: int = 1):
    kl = kl_part.sum() / norm
    d_iq, d_ik = d_iq32, d_ik32
    if isinstance(grad_scale, Tensor):
        d_iq, d_ik = d_iq * grad_scale, d_ik * grad_scale
    if ent_part is None:
        return kl, d_iq.to(iq.dtype), d_ik.to(ik.dtype)
    # Means as naive.msa_attention: index entropy per (b, g, query) row, main entropy per
    # (b, query head, query) row; ``norm`` is the row count (or the caller's normalizer).
    sums = ent_part.sum(0)
    stats = {"index_entropy": sums[0] / norm, "main_entropy": sums[1] / (norm * G)}
    return kl, d_iq.to(iq.dtype), d_ik.to(ik.dtype), stats


def sparse_kl_backward(
    q: Tensor, k: Tensor, iq: Tensor, ik: Tensor, block_idx: Tensor, main_lse: Tensor, index_lse: Tensor,
    cfg: MSAConfig, q_pos: Optional[Tensor] = None, grad_scale=1.0, *, softmax_scale: Optional[float] = None,
    normalizer: Optional[float] = None, plan: Optional[ReverseIndex] = None, return_stats: bool = False,
    doc_start: Optional[Tensor] = None, csr: Optional[SelectionCSR] = None,
):
    """KL(teacher || student) over each row's selected tokens: its value and its gradient
    w.r.t. iq and ik in one pass (no separate KL forward), as ``naive.sparse_kl_loss``.

    Teacher (per batch, group g, query t): mean over the group's G query heads of
    softmax(q.k * softmax_scale) restricted to the selected causal tokens, rebuilt from
    ``main_lse`` [b, hq, sq] fp32 (the main sparse attention's LSE over the same tokens).
    Student: softmax(iq.ik * cfg.index_softmax_scale) over those tokens, normalised by
    ``index_lse`` [b, g, sq] fp32 (from :func:`index_select`). q [b, sq, hq, d] and
    k [b, sk, g, d] are read only (the teacher is detached).

    Args:
        block_idx: [b, g, sq, K] selection (int32/int64; -1 = unused).
        grad_scale: upstream gradient of the returned mean KL (float or 0-dim tensor,
            e.g. kl_coeff * grad_out): d_iq, d_ik = grad_scale * d(kl)/d(iq, ik).
        softmax_scale: main-branch scale (default 1/sqrt(d)).
        normalizer: the mean's denominator (default b * g * sq rows, as the reference);
            context parallelism may pass the global row count.
        plan: the reverse index returned by ``index_select(..., return_plan=True)``.
        csr: else the selection's CSR (ops/csr.py) when the caller has it: no sort here.
        return_stats: also return the entropy statistics, by-products of the same pass
            (a few extra element-wise ops per tile; off: the kernel compiles without them).
        doc_start: optional int [b, sq] / [sq] packed documents (as :func:`index_select`):
            keys before a row's document start are not among its tokens; ``main_lse`` and
            ``index_lse`` must be over the same document-masked tokens.

    Returns:
        kl: fp32 scalar, sum of P (log P - log Q) / normalizer (for logging; detached);
        d_iq [b, sq, g, di] in iq's dtype; d_ik [b, sk, di] in ik's dtype;
        with ``return_stats`` a 4th item, a dict of fp32 scalars defined as the reference's
        ``msa_attention`` stats: ``index_entropy`` = sum over rows of H(Q) / normalizer,
        ``main_entropy`` = sum over rows and the G heads of H(P_h) / (normalizer * G)
        (the entropy of each head's main softmax over the same tokens; natural log).
    The gradient w.r.t. the student logits is (Q - P) * index_softmax_scale / normalizer.
    d_iq / d_ik are accumulated with fp32 atomics (not bitwise deterministic)."""
    tens, d_iq32, d_ik32, consts, scalars, norm, dims = _kl_common(
        q, k, iq, ik, main_lse, index_lse, cfg, softmax_scale, normalizer, grad_scale)
    b, sq, g, di, sk, hq, d = dims
    main_lse, index_lse = _lse_rows_contiguous(main_lse), _lse_rows_contiguous(index_lse)
    _check_block_idx(block_idx, b, g, sq, iq.device)
    q_pos = _positions(q_pos, sq, sk, iq.device)
    docs = _doc_start(doc_start, b, sq, q_pos)
    lc = _launch_config(iq.device)
    nb = triton.cdiv(sk, cfg.block_size)
    if plan is None or plan.shape != tuple(block_idx.shape) or plan.nb != nb:
        plan = build_reverse_index(block_idx, nb, lc.items_chunk, csr=csr)
    n_items = plan.item_key.numel()
    kl_part = torch.zeros(max(n_items, 1), device=iq.device, dtype=torch.float32)
    ent_part = _stats_buffer(n_items, return_stats, kl_part)
    qc, kc, iqc, ikc = tens
    if n_items:
        _kl_kernel[(n_items,)](
            qc, kc, iqc, ikc, main_lse, index_lse, q_pos, docs.ptr, d_iq32, d_ik32, kl_part, ent_part,
            plan.order, plan.item_key, plan.item_start, plan.item_end,
            sq, sk, g, nb, *scalars, *_strides(qc, kc, iqc, ikc, main_lse, index_lse, d_iq32, d_ik32), docs.stride_b,
            HAS_DOC=docs.on, K=block_idx.shape[-1], BLOCK_Q=lc.items_block_q, CHUNK=plan.chunk, DENSE=False, STATS=return_stats,
            num_warps=lc.kl_warps, num_stages=lc.kl_stages, **consts,
        )
    return _finish(kl_part, norm, d_iq32, d_ik32, iq, ik, grad_scale, ent_part if return_stats else None, hq // g)


def dense_kl_backward(
    q: Tensor, k: Tensor, iq: Tensor, ik: Tensor, main_lse: Tensor, cfg: MSAConfig,
    q_pos: Optional[Tensor] = None, grad_scale=1.0, *, softmax_scale: Optional[float] = None,
    normalizer: Optional[float] = None, index_lse: Optional[Tensor] = None, return_stats: bool = False,
    doc_start: Optional[Tensor] = None,
):
    """Warmup-phase KL over all causal tokens (``naive.dense_kl_loss``): value and
    gradients w.r.t. iq, ik.

    The teacher is the group head-mean of the dense causal softmax, rebuilt from the dense
    ``main_lse`` [b, hq, sq] fp32 (the main branch's own flash-attention LSE, or
    :func:`dense_main_lse`); the student's normaliser is computed here by one exp pass over
    the index scores (:func:`dense_index_lse`) unless ``index_lse`` is given. The gradient
    pass costs about one dense QK^T pass over all query heads (no PV), i.e. about half a
    dense attention forward. Arguments and returns (``return_stats`` included: entropies over all
    causal tokens; ``doc_start``: all causal same-document tokens, ``main_lse`` with the
    document mask) as :func:`sparse_kl_backward`."""
    tens, d_iq32, d_ik32, consts, scalars, norm, dims = _kl_common(
        q, k, iq, ik, main_lse,
        index_lse if index_lse is not None else torch.empty(iq.shape[0], iq.shape[2], iq.shape[1], device=iq.device),
        cfg, softmax_scale, normalizer, grad_scale)
    b, sq, g, di, sk, hq, d = dims
    q_pos = _positions(q_pos, sq, sk, iq.device)
    docs = _doc_start(doc_start, b, sq, q_pos)
    if index_lse is None:
        index_lse = dense_index_lse(iq, ik, cfg, q_pos, doc_start=doc_start)
    main_lse, index_lse = _lse_rows_contiguous(main_lse), _lse_rows_contiguous(index_lse)
    lc = _launch_config(iq.device)
    nb = triton.cdiv(sk, cfg.block_size)
    chunk = lc.items_chunk * 4
    n_chunks = triton.cdiv(sq, chunk) if sq else 0
    kl_part = torch.zeros(max(b * g * nb * n_chunks, 1), device=iq.device, dtype=torch.float32)
    ent_part = _stats_buffer(b * g * nb * n_chunks, return_stats, kl_part)
    qc, kc, iqc, ikc = tens
    if n_chunks:
        _kl_kernel[(b * g * nb, n_chunks)](
            qc, kc, iqc, ikc, main_lse, index_lse, q_pos, docs.ptr, d_iq32, d_ik32, kl_part, ent_part,
            q_pos, q_pos, q_pos, q_pos,  # no reverse index in dense mode (unused pointers)
            sq, sk, g, nb, *scalars, *_strides(qc, kc, iqc, ikc, main_lse, index_lse, d_iq32, d_ik32), docs.stride_b,
            HAS_DOC=docs.on, K=1, BLOCK_Q=lc.items_block_q, CHUNK=chunk, DENSE=True, STATS=return_stats,
            num_warps=lc.kl_warps, num_stages=lc.kl_stages, **consts,
        )
    return _finish(kl_part, norm, d_iq32, d_ik32, iq, ik, grad_scale, ent_part if return_stats else None, hq // g)


def dense_main_lse(q: Tensor, k: Tensor, q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None, *,
                   doc_start: Optional[Tensor] = None) -> Tensor:
    """Dense causal main-branch LSE [b, hq, sq] fp32 (natural log).

    CUDA, sq == sk, default positions and no documents: torch's flash-attention op (GQA
    keys repeated per query head; values are a dummy, only the LSE is used). Otherwise the
    reference (slow: for tests and CPU; with ``doc_start`` the document-masked LSE)."""
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    if (q.is_cuda and q_pos is None and doc_start is None and sq == sk
            and q.dtype in (torch.bfloat16, torch.float16)):
        qh = q.detach().transpose(1, 2)
        kh = k.detach().transpose(1, 2).repeat_interleave(hq // g, dim=1)
        out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, kh, 0.0, True, False, scale=softmax_scale)
        return out[1].float()[:, :, :sq]
    from . import naive

    _, lse = naive.dense_attention(q.detach(), k.detach(), k.detach(), q_pos, softmax_scale, doc_start=doc_start)
    return lse


__all__ = [
    "IndexConfig", "ReverseIndex", "UnsupportedInputError", "build_reverse_index", "dense_index_lse",
    "dense_kl_backward", "dense_main_lse", "index_block_max", "index_select", "selected_lse", "sparse_kl_backward",
]

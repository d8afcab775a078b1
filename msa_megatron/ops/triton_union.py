"""Main-branch kernels v2: the GQA-packed query-tile "union" path (forward, dQ, indexer KL).

Semantics are those of :func:`msa_megatron.ops.naive.sparse_attention` (and of
``reference.sparse_kl_terms`` for the KL): identical results to the KV-outer kernels of
:mod:`.triton_sparse_attn`, computed in another order.

Why (docs/kernels_main.md "v2: union tile", ../shared/kernel_study.md section 6): with
G = 16 query heads per KV group, one 128-row MMA tile holds ``P = 8`` consecutive query
positions x the 16 heads. Such a program loops over the *union* of the blocks its P
positions selected (sorted, de-duplicated, with a P-bit membership mask per entry), masks
the rows whose position did not select the block, and keeps the softmax state in
registers: out and LSE are written once, no partial buffers, no combine kernel. The cost is
linear in the union size U (measured 1.45 ms x U8 at 128K on H100): it wins while the P
positions share most of their blocks (U8 <~ 32 of K = 16), and loses to the KV-outer path
for locality-free selections (random: U8 ~ 100). :func:`resolve_main_impl` picks per call.

The backward is split: dK/dV by the KV-outer kernel without its dQ half
(``sparse_attention_bwd(..., compute_dq=False)``; or, opt-in, per key block over the union
entries that hold it, ``union_dkdv="union"``), dQ by the union tile (written once,
deterministic). The indexer KL (``kl=``) takes its teacher from the union dQ pass: the tile
holds P_h of P positions x G heads, so the head mean is a warp-local reduction, stored per
(tile, union entry); the student side (index dots, softmax, KL, entropies, d_iq) runs in a
light kernel of its own (``_union_kl_kernel``), where occupancy hides the latency that made
it expensive inside the dQ tile; d_ik is reduced owner-side (one program per (batch, key
block) over the union entries that contain it, in a fixed order) from a per-(tile, union
entry) buffer of the student's logit gradient: deterministic without atomics, and the
expensive teacher is never recomputed.

Under ``TRITON_INTERPRET=1`` bf16 operands are upcast after loading (``UPCAST``), as in
:mod:`.triton_sparse_attn`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_sparse_attn as _tsa

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- union lists
@dataclass
class UnionLists:
    """Per (b*g, tile of P consecutive query positions): the sorted union of the blocks the
    tile's positions selected (``blk`` [nbg * nt, UMAX] int32, -1 after ``cnt``), a P-bit
    membership mask per entry (``msk``, int32: bit p = position p of the tile selected it),
    the entry count ``cnt`` [nbg * nt] int32, the exclusive prefix sum of counts ``off``
    (int64; compact per-entry buffers) and the launch order ``order`` (largest unions
    first). ``mean`` (device 0-dim fp32): mean union size per tile; ``dups`` (device bool):
    some row selected a block twice (the union path counts it once, the reference twice)."""

    P: int
    nt: int
    umax: int
    blk: Tensor
    msk: Tensor
    cnt: Tensor
    off: Tensor
    order: Tensor
    mean: Tensor
    dups: Tensor
    key: tuple


def union_positions(G: int, dtype: torch.dtype, cfg: _tsa.KernelConfig, d: int = 128) -> int:
    """P, the query positions per union tile: P x next_pow2(G) = ``union_rows`` MMA rows
    (128 by default: P = 8 at G = 16), at most 32 (the membership mask is an int32), at
    least 1; fp32 inputs and head dims above 128 use proportionally fewer rows (registers)."""
    GP = _tsa._next_pow2(G)
    rows = cfg.union_rows if dtype != torch.float32 else cfg.union_rows // 2
    rows = max(16, rows * 128 // max(128, _tsa._next_pow2(d)))
    return max(1, min(32, rows // GP)) if GP < rows else 1


def _union_key(block_idx: Tensor, P: int) -> tuple:
    return (tuple(block_idx.shape), P, str(block_idx.device), block_idx.data_ptr(), block_idx._version)


_SENT = torch.iinfo(torch.int32).max  # sort key of a -1 (no block) entry: after every real one


def _tile_rows(block_idx: Tensor, P: int) -> Tuple[Tensor, int]:
    """``block_idx`` [b, g, sq, K] as one row of P*K entries per (b*g, tile of P positions)
    (the last tile padded with -1), and the tiles per (b, g)."""
    b, g, sq, K = block_idx.shape
    nt = max(1, -(-sq // P))
    bi = block_idx.contiguous()
    if nt * P != sq:
        bi = torch.nn.functional.pad(bi, (0, 0, 0, nt * P - sq), value=-1)
    return bi.view(b * g * nt, P * K), nt


def _sorted_keys(rows: Tensor, P: int) -> Tensor:
    """Each row's keys block * P + position, ascending (-1 entries last, as :data:`_SENT`):
    the union is the distinct blocks, each block's positions adjacent."""
    pidx = torch.arange(P, device=rows.device, dtype=torch.int32).repeat_interleave(rows.shape[1] // P).view(1, -1)
    return torch.sort(torch.where(rows >= 0, rows * P + pidx, torch.full_like(rows, _SENT)), dim=-1).values


def build_union_lists(block_idx: Tensor, P: int, heavy_first: bool = True) -> UnionLists:
    """Union lists of ``block_idx`` [b, g, sq, K] for tiles of P positions, on the device
    with torch ops (one segmented sort of P*K int32 keys per tile, no host sync).

    Sort key = block * P + position: sorted keys give the union ascending, each block's
    positions adjacent; a run start is a new union entry, its bits are OR-ed (summed, the
    (block, position) pairs being de-duplicated first) by a scatter-add."""
    b, g, _, K = block_idx.shape
    dev = block_idx.device
    umax = P * K
    nbg = b * g
    bi, nt = _tile_rows(block_idx, P)
    key = _sorted_keys(bi, P)  # (temporaries are freed early: ~1 GiB each at 1M tokens)
    del bi
    valid = key != _SENT
    blk = torch.div(key, P, rounding_mode="floor")
    pos = key - blk * P
    new_pair = valid & (key != torch.nn.functional.pad(key[:, :-1], (1, 0), value=-1))
    del key
    new_entry = valid & (blk != torch.nn.functional.pad(blk[:, :-1], (1, 0), value=-1))
    dups = (valid & ~new_pair).any()
    cnt = new_entry.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(new_entry, -1, dtype=torch.int32) - 1
    bits = torch.where(new_pair, torch.ones_like(pos) << pos, torch.zeros_like(pos))
    del pos, new_pair
    slot = torch.where(valid, slot, umax).long()  # invalid -> spill column
    del valid
    msk = torch.zeros(nbg * nt, umax + 1, dtype=torch.int32, device=dev).scatter_add_(-1, slot, bits)
    del bits
    ublk = torch.full((nbg * nt, umax + 1), -1, dtype=torch.int32, device=dev)
    ublk.scatter_(-1, torch.where(new_entry, slot, umax), blk)
    del slot, blk, new_entry
    ublk, msk = ublk[:, :umax].contiguous(), msk[:, :umax].contiguous()
    ublk = torch.where(torch.arange(umax, device=dev)[None, :] < cnt[:, None], ublk, torch.full_like(ublk, -1))
    off = torch.cumsum(cnt.to(torch.int64), 0) - cnt.to(torch.int64)
    if heavy_first and cnt.numel() > 1:
        order = torch.argsort(cnt, descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(cnt.numel(), device=dev, dtype=torch.int32)
    mean = cnt.float().mean() if cnt.numel() else torch.zeros((), device=dev)
    return UnionLists(P, nt, umax, ublk, msk, cnt, off, order.contiguous(), mean, dups, _union_key(block_idx, P))


@triton.jit
def _union_lists_kernel(
    BIDX, SCR, UBLK, UMSK, UCNT, DUPS, sq, nt,
    P: tl.constexpr, KSEL: tl.constexpr, UMAX: tl.constexpr, UP: tl.constexpr,
):
    """One program = one (b*g, tile): sort the tile's P*K keys block*P + position (tl.sort),
    find run starts by comparing with the previous key (through a scratch row: Triton has no
    in-register shift), scatter the entries to their slots (cumsum of run starts) and OR the
    positions' bits into the zeroed mask row (atomic_or: order-free, so deterministic)."""
    w = tl.program_id(0).to(tl.int64)
    bg = w // nt
    tile = w % nt
    offs = tl.arange(0, UP)
    p = offs // KSEL
    t = tile * P + p
    inb = (offs < UMAX) & (t < sq)
    blk = tl.load(BIDX + (bg * sq + t) * KSEL + offs % KSEL, mask=inb, other=-1)
    SENT: tl.constexpr = 2147483647
    key = tl.where(blk >= 0, blk * P + p, SENT)
    key = tl.sort(key)
    tl.store(SCR + w * UP + offs, key)
    tl.debug_barrier()
    prev = tl.load(SCR + w * UP + offs - 1, mask=offs > 0, other=-1)
    valid = key != SENT
    kb = key // P  # keys are >= 0 here (SENT rows are masked by ``valid``)
    pb = tl.where(prev >= 0, prev // P, -1)
    new_entry = valid & (kb != pb)
    new_pair = valid & (key != prev)
    slot = tl.cumsum(new_entry.to(tl.int32), 0) - 1
    cnt = tl.sum(new_entry.to(tl.int32), 0)
    tl.store(UBLK + w * UMAX + slot, kb, mask=new_entry)
    tl.store(UBLK + w * UMAX + offs, tl.full([UP], -1, tl.int32), mask=(offs >= cnt) & (offs < UMAX))
    bits = tl.where(new_pair, 1 << (key - kb * P), 0)
    tl.atomic_or(UMSK + w * UMAX + slot, bits, mask=new_pair, sem="relaxed")
    tl.store(UCNT + w, cnt)
    tl.store(DUPS + w, tl.sum((valid & ~new_pair).to(tl.int32), 0))


def build_union_lists_triton(block_idx: Tensor, P: int, heavy_first: bool = True) -> UnionLists:
    """:func:`build_union_lists` by one small Triton kernel (one program per tile; the
    temporaries of the torch version, ~1 GiB each at 1M tokens, are not needed); same result."""
    b, g, sq, K = block_idx.shape
    dev = block_idx.device
    nt = max(1, -(-sq // P))
    umax = P * K
    n = b * g * nt
    UP = triton.next_power_of_2(umax)
    bi = block_idx.contiguous()
    ublk = torch.empty((n, umax), dtype=torch.int32, device=dev)
    msk = torch.zeros((n, umax), dtype=torch.int32, device=dev)
    cnt = torch.empty((n,), dtype=torch.int32, device=dev)
    dup = torch.empty((n,), dtype=torch.int32, device=dev)
    scr = torch.empty((n, UP), dtype=torch.int32, device=dev)
    if sq:
        _union_lists_kernel[(n,)](bi, scr, ublk, msk, cnt, dup, sq, nt, P=P, KSEL=K, UMAX=umax, UP=UP, num_warps=4)
    else:
        ublk.fill_(-1)
        cnt.zero_()
        dup.zero_()
    del scr
    off = torch.cumsum(cnt.to(torch.int64), 0) - cnt.to(torch.int64)
    if heavy_first and n > 1:
        order = torch.argsort(cnt, descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(n, device=dev, dtype=torch.int32)
    mean = cnt.float().mean()
    return UnionLists(P, nt, umax, ublk, msk, cnt, off, order.contiguous(), mean, (dup > 0).any(),
                      _union_key(block_idx, P))


def union_lists_for(block_idx: Tensor, G: int, dtype: torch.dtype, cfg: Optional[_tsa.KernelConfig] = None,
                    lists: Optional[UnionLists] = None, d: int = 128) -> UnionLists:
    """The union lists the kernels use for this layout (``lists`` reused when it matches)."""
    cfg = cfg or _tsa.default_config()
    P = union_positions(G, dtype, cfg, d)
    if lists is not None and lists.key == _union_key(block_idx, P):
        return lists
    if cfg.union_lists_kernel:
        return build_union_lists_triton(block_idx, P, heavy_first=cfg.union_heavy_first)
    return build_union_lists(block_idx, P, heavy_first=cfg.union_heavy_first)


#: Tiles per slice of :func:`union_mean_dups` (x P*K int32 keys: 64 MiB of sort input at P*K = 128).
MEAN_DUPS_SLICE_TILES = 1 << 17


def union_mean_dups(block_idx: Tensor, P: int, slice_tiles: int = MEAN_DUPS_SLICE_TILES) -> Tuple[Tensor, Tensor]:
    """(mean union size per tile, whether a row repeats a block) as :func:`build_union_lists`
    computes them (device tensors, no host sync), without building the lists: the auto
    dispatch needs only these two numbers, and when they say "KV-outer" the lists (~2.5 GiB of
    temporaries at 1M tokens with a random selection, run 11's 1M OOM candidate) would be
    thrown away. Sorted in slices of ``slice_tiles`` tiles: a bounded transient."""
    dev = block_idx.device
    bi, _ = _tile_rows(block_idx, P)
    total = torch.zeros((), dtype=torch.int64, device=dev)
    dups = torch.zeros((), dtype=torch.bool, device=dev)
    for t0 in range(0, bi.shape[0], max(1, slice_tiles)):
        key = _sorted_keys(bi[t0:t0 + slice_tiles], P)
        valid = key != _SENT
        blk = torch.div(key, P, rounding_mode="floor")
        prev_key = torch.nn.functional.pad(key[:, :-1], (1, 0), value=-1)
        prev_blk = torch.nn.functional.pad(blk[:, :-1], (1, 0), value=-1)
        total += (valid & (blk != prev_blk)).sum()
        dups |= (valid & (key == prev_key)).any()
    mean = total.float() / bi.shape[0] if bi.shape[0] else torch.zeros((), device=dev)
    return mean, dups


def union_stats(block_idx: Tensor, P: int = 8) -> dict:
    """Mean / p90 / max union size per tile of P positions (host floats; one sync): the
    locality measure the dispatch and the benchmarks report (U8 at P = 8)."""
    L = build_union_lists(block_idx, P, heavy_first=False)
    c = L.cnt.float()
    return {"mean": float(c.mean()), "p90": float(torch.quantile(c, 0.9)) if c.numel() else 0.0,
            "max": float(c.max()) if c.numel() else 0.0}


# ----------------------------------------------------------------------------- dispatch
# (weak reference to the selection tensor, its key, mean union, repeats) of the last auto decision:
# the op decides, then SparseAttentionFn asks again for the same tensor (no second build). A weak
# reference, not the data pointer: a new selection allocated where a freed one lived (same
# pointer, version 0) must not inherit its decision (run 9 measured exactly that mix-up).
_last_stats: Optional[tuple] = None


def resolve_main_impl(cfg: _tsa.KernelConfig, block_idx: Tensor, G: int, dtype: torch.dtype,
                      lists: Optional[UnionLists] = None, d: int = 128,
                      fwd_only: bool = False, with_kl: bool = False) -> Tuple[str, Optional[UnionLists]]:
    """'union' or 'kv' for this call, plus the union lists when 'union' (reused by the
    backward). ``auto``: the union path when the mean union per tile is below ``limit x K/16``
    and no row repeats a block; one host sync for that number; logged once per reason. The
    limits (blocks per tile at K = 16, P = 8) are the break-evens measured at 128K (run 9, one
    H200, docs/gpu_logs/run9_h200/union_check/, pool selections with U8 = 16 / 32, interpolated):
    ``union_max_blocks`` = 22 for a main branch with a backward (union fwd+bwd 124.8 / 187.1 ms
    vs KV-outer 150-152); ``union_max_blocks_fwd`` = 30 without a backward (union fwd 30.5 /
    58.8 ms vs 56.3); ``union_max_blocks_kl`` = 27 for the op's training path with the indexer
    KL (op fwd+bwd ~154 / ~238 ms vs KV-outer 214-219)."""
    global _last_stats
    impl = cfg.main_impl
    if impl == "kv" or block_idx.shape[2] == 0:
        if impl == "kv":
            _tsa._announce("main-kv", "MSA main branch: KV-outer kernels (kernel_config main_impl=kv)")
        return "kv", None
    if fwd_only:
        max_blocks, knob = cfg.union_max_blocks_fwd, "union_max_blocks_fwd"
    elif with_kl:
        max_blocks, knob = cfg.union_max_blocks_kl, "union_max_blocks_kl"
    else:
        max_blocks, knob = cfg.union_max_blocks, "union_max_blocks"
    K = block_idx.shape[-1]
    limit = max_blocks * K / 16.0
    key = _union_key(block_idx, union_positions(G, dtype, cfg, d))
    if impl == "auto" and lists is None and _last_stats is not None and _last_stats[0]() is block_idx \
            and _last_stats[1] == key and (_last_stats[3] or _last_stats[2] >= limit):
        return "kv", None  # this very selection was measured a moment ago (the op, then SparseAttentionFn)
    if impl == "union":
        lists = union_lists_for(block_idx, G, dtype, cfg, lists, d)
        if bool(lists.dups):
            raise ValueError("kernel_config main_impl=union: block_idx repeats a block within a row; the union path "
                             "counts it once (use main_impl=kv or auto, which count it twice like the reference)")
        _tsa._announce("main-union", "MSA main branch: union-tile kernels (kernel_config main_impl=union)")
        return "union", lists
    P = union_positions(G, dtype, cfg, d)
    if lists is not None and lists.key == key:
        stats = (lists.mean, lists.dups)
    else:  # the two numbers only: the lists are built when the union path is taken
        stats = union_mean_dups(block_idx, P)
    mean, dups = torch.stack([stats[0].float(), stats[1].float()]).tolist()
    _last_stats = (weakref.ref(block_idx), key, mean, bool(dups))
    if dups:
        _tsa._announce("main-auto-dups", "MSA main branch auto: a row repeats a block -> KV-outer kernels")
        return "kv", None
    if mean < limit:
        _tsa._announce(f"main-auto-union-{knob}", f"MSA main branch auto: mean union {mean:.1f} blocks per {P}-"
                                                  f"position tile < {limit:g} ({knob}) -> union-tile kernels")
        return "union", union_lists_for(block_idx, G, dtype, cfg, lists, d)
    _tsa._announce(f"main-auto-kv-{knob}", f"MSA main branch auto: mean union {mean:.1f} blocks per {P}-position "
                                           f"tile >= {limit:g} ({knob}) -> KV-outer kernels")
    return "kv", None


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _union_fwd_kernel(
    Q, K, V, QPOS, ORD, UBLK, UMSK, UCNT, OUT, LSE, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_ob, stride_ot, stride_oh, stride_dsb,
    sq, sk, n_groups, nt, G, D, qk_scale,
    UMAX: tl.constexpr, P: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    NSUB: tl.constexpr, DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr = False,
):
    """One program = P positions x the G heads of one group (P*GP rows); online softmax over
    the tile's union in BN-key steps; out and LSE (natural log, -inf if no key) written once."""
    w = tl.load(ORD + tl.program_id(0)).to(tl.int64)
    bg = w // nt
    tile = w % nt
    bi = bg // n_groups
    gi = bg % n_groups
    r = tl.arange(0, P * GP)
    p = r // GP
    h = r % GP
    t = tile * P + p
    tin = t < sq
    rvalid = tin & (h < G)
    qpos = tl.load(QPOS + t, mask=tin, other=-1)
    if HAS_DOC:  # packed documents: keys before the row's document start are invisible
        dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t, mask=tin, other=0)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    head = (gi * G + h).to(tl.int64)
    q_rows = bi.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt + head * stride_qh
    qt = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
    m = tl.full([P * GP], float("-inf"), tl.float32)
    l = tl.zeros([P * GP], tl.float32)
    acc = tl.zeros([P * GP, DP], tl.float32)
    cnt = tl.load(UCNT + w)
    kv_base = bi.to(tl.int64) * stride_kb + gi * stride_kh
    for j in range(0, cnt * NSUB):
        u = j // NSUB
        n = j % NSUB
        blk = tl.load(UBLK + w * UMAX + u)
        bits = tl.load(UMSK + w * UMAX + u)
        sel = ((bits >> p) & 1) != 0
        kpos = blk * BLOCK + n * BN + tl.arange(0, BN)
        kin = kpos < sk
        kv_off = kv_base + kpos.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        kmask = kin[:, None] & dmask[None, :]
        kt = tl.load(K + kv_off, mask=kmask, other=0.0)
        vt = tl.load(V + kv_off, mask=kmask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        valid = (sel & rvalid)[:, None] & kin[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_DOC:
            valid = valid & (kpos[None, :] >= dlo[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt, input_precision=DOT_PREC)
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_rows = bi.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=rvalid[:, None] & dmask[None, :])
    hq = n_groups * G
    tl.store(LSE + (bi.to(tl.int64) * hq + head) * sq + t, lse, mask=rvalid)


@triton.jit
def _union_dq_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, ORD, UBLK, UMSK, UCNT, UOFF, DQ, PBUF, ENTM, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_db, stride_dt, stride_dh, stride_gb, stride_gt, stride_gh, stride_dsb,
    sq, sk, n_groups, nt, G, D, sm_scale, qk_scale, w0, off0,
    UMAX: tl.constexpr, P: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    NSUB: tl.constexpr, DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    KL: tl.constexpr, HAS_DOC: tl.constexpr = False,
):
    """Union-tile dQ: recompute S, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta) per
    BN-key step of the union; dQ += dS K in registers, written once.

    KL: also hand the indexer KL its teacher. The head mean P-bar [P, BN] of the tile's P
    (a reshape-sum: one position's G heads are one warp's rows) is stored per (tile, union
    entry) in PBUF [entries, P, BLOCK] (fp32) for :func:`_union_kl_kernel`, and the main
    entropy partial sum P_h log2 P_h goes to ENTM. Only that: the student side (index dots,
    exp/log, d_iq) costs ~3 us of dependent latency per step at one CTA per SM (run 8:
    87.8 vs 31.5 ms at 128K), so it runs in its own light kernel where occupancy hides it.
    KL runs only on the tiles [w0, w0 + grid) of the current chunk (natural order: PBUF is
    indexed by UOFF - off0)."""
    if KL:
        w = (w0 + tl.program_id(0)).to(tl.int64)
    else:
        w = tl.load(ORD + tl.program_id(0)).to(tl.int64)
    bg = w // nt
    tile = w % nt
    bi = bg // n_groups
    gi = bg % n_groups
    hq = n_groups * G
    r = tl.arange(0, P * GP)
    p = r // GP
    h = r % GP
    t = tile * P + p
    tin = t < sq
    rvalid = tin & (h < G)
    qpos = tl.load(QPOS + t, mask=tin, other=-1)
    if HAS_DOC:  # packed documents: keys before the row's document start are invisible
        dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t, mask=tin, other=0)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    rmask = rvalid[:, None] & dmask[None, :]
    head = (gi * G + h).to(tl.int64)
    t64 = t.to(tl.int64)
    qt = tl.load(Q + (bi.to(tl.int64) * stride_qb + t64 * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
                 mask=rmask, other=0.0)
    dot_ = tl.load(DO + (bi.to(tl.int64) * stride_db + t64 * stride_dt + head * stride_dh)[:, None] + offs_d[None, :],
                   mask=rmask, other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
        dot_ = dot_.to(tl.float32)
    stat = (bi.to(tl.int64) * hq + head) * sq + t
    lse2 = tl.load(LSE + stat, mask=rvalid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat, mask=rvalid, other=0.0)
    dq = tl.zeros([P * GP, DP], tl.float32)
    cnt = tl.load(UCNT + w)
    kv_base = bi.to(tl.int64) * stride_kb + gi * stride_kh
    if KL:
        ent_m = tl.zeros([P * GP], tl.float32)
        ent_base = tl.load(UOFF + w) - off0
        pp = tl.arange(0, P)
        cols = tl.arange(0, BN)
    for j in range(0, cnt * NSUB):
        u = j // NSUB
        n = j % NSUB
        blk = tl.load(UBLK + w * UMAX + u)
        bits = tl.load(UMSK + w * UMAX + u)
        sel = ((bits >> p) & 1) != 0
        kpos = blk * BLOCK + n * BN + tl.arange(0, BN)
        kin = kpos < sk
        kv_off = kv_base + kpos.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        kmask = kin[:, None] & dmask[None, :]
        kt = tl.load(K + kv_off, mask=kmask, other=0.0)
        vt = tl.load(V + kv_off, mask=kmask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        valid = (sel & rvalid)[:, None] & kin[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_DOC:
            valid = valid & (kpos[None, :] >= dlo[:, None])
        pr = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(dot_, tl.trans(vt), input_precision=DOT_PREC)
        ds = (pr * (dp - delta[:, None])).to(qt.dtype)
        dq += tl.dot(ds, kt, input_precision=DOT_PREC)
        if KL:
            ent_m += tl.sum(tl.where(valid, pr * (s - lse2[:, None]), 0.0), 1)
            pbar = tl.sum(tl.reshape(pr, (P, GP, BN)), 1) / G
            pb_off = ((ent_base + u) * P + pp.to(tl.int64))[:, None] * BLOCK + (n * BN + cols)[None, :]
            tl.store(PBUF + pb_off, pbar, mask=(n * BN + cols < BLOCK)[None, :])
    dq = dq * sm_scale
    tl.store(DQ + (bi.to(tl.int64) * stride_gb + t64 * stride_gt + head * stride_gh)[:, None] + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask)
    if KL:
        tl.store(ENTM + tl.program_id(0), tl.sum(ent_m, 0))


@triton.jit
def _union_kl_kernel(
    QPOS, UBLK, UMSK, UCNT, UOFF, PBUF, IQ, IK, ILSE, DIQ, DSBUF, KLPART, DS,
    stride_iqb, stride_iqt, stride_iqg, stride_ikb, stride_ikt, stride_ilb, stride_ilg, stride_dsb,
    sq, sk, n_groups, nt, iscale, kl_coef, w0, off0,
    UMAX: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr,
    DI: tl.constexpr, DIP: tl.constexpr, PPAD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr = False,
):
    """The indexer KL of one union tile (P positions of one group) over the tokens its
    main-branch tile visited, from the teacher P-bar the dQ pass stored in PBUF.

    Student rows: PPAD >= 16 (MMA-sized), row j <-> position j // R, only j % R == 0 live
    (R = PPAD / P). Per BN-key step of the union: log Q = iq . ik * iscale - index_lse over
    the selected causal tokens; KL += P-bar (ln P-bar - log Q), sum Q ln Q;
    dS_student = (Q - P-bar) * kl_coef (rounded to ik's dtype, as on the KV-outer paths):
    d_iq += dS . ik in registers (written once), dS stored per (tile, entry) in DSBUF for the
    owner-side d_ik pass. A light kernel (16 rows, no main-branch state), so several CTAs per
    SM hide the latency of its small dots and transcendental steps."""
    w = (w0 + tl.program_id(0)).to(tl.int64)
    bg = w // nt
    tile = w % nt
    bi = bg // n_groups
    gi = bg % n_groups
    R: tl.constexpr = PPAD // P
    jr = tl.arange(0, PPAD)
    sp = jr // R
    st = tile * P + sp
    slive = ((jr % R) == 0) & (st < sq)
    spos = tl.load(QPOS + st, mask=st < sq, other=-1)
    if HAS_DOC:
        sdlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + st, mask=st < sq, other=0)
    offs_i = tl.arange(0, DIP)
    imask = offs_i < DI
    iq_off = bi.to(tl.int64) * stride_iqb + st.to(tl.int64) * stride_iqt + gi * stride_iqg
    iqt = tl.load(IQ + iq_off[:, None] + offs_i[None, :], mask=slive[:, None] & imask[None, :], other=0.0)
    if UPCAST:
        iqt = iqt.to(tl.float32)
    ilse = tl.load(ILSE + bi.to(tl.int64) * stride_ilb + gi * stride_ilg + st, mask=slive, other=0.0)
    diq = tl.zeros([PPAD, DIP], tl.float32)
    kl_acc = tl.zeros([PPAD], tl.float32)
    ent_i = tl.zeros([PPAD], tl.float32)
    ent_base = tl.load(UOFF + w) - off0
    cnt = tl.load(UCNT + w)
    for j in range(0, cnt * NSUB):
        u = j // NSUB
        n = j % NSUB
        blk = tl.load(UBLK + w * UMAX + u)
        bits = tl.load(UMSK + w * UMAX + u)
        col = n * BN + tl.arange(0, BN)
        kpos = blk * BLOCK + col
        kin = (kpos < sk) & (col < BLOCK)
        ikb = tl.load(IK + bi.to(tl.int64) * stride_ikb + kpos.to(tl.int64)[:, None] * stride_ikt + offs_i[None, :],
                      mask=kin[:, None] & imask[None, :], other=0.0)
        if UPCAST:
            ikb = ikb.to(tl.float32)
        row_off = ((ent_base + u) * P + sp.to(tl.int64))[:, None] * BLOCK + col[None, :]
        pbar = tl.load(PBUF + row_off, mask=slive[:, None] & (col < BLOCK)[None, :], other=0.0)
        ssel = ((bits >> sp) & 1) != 0
        sv = (slive & ssel)[:, None] & kin[None, :] & (kpos[None, :] <= spos[:, None])
        if HAS_DOC:
            sv = sv & (kpos[None, :] >= sdlo[:, None])
        logq = tl.dot(iqt, tl.trans(ikb), input_precision=DOT_PREC) * iscale - ilse[:, None]
        qs = tl.where(sv, tl.exp(logq), 0.0)
        pos_t = sv & (pbar > 0)
        kl_acc += tl.sum(tl.where(pos_t, pbar * (tl.log(tl.where(pos_t, pbar, 1.0)) - logq), 0.0), 1)
        ent_i += tl.sum(tl.where(sv, qs * logq, 0.0), 1)
        dsk = tl.where(sv, (qs - pbar) * kl_coef, 0.0).to(IK.dtype.element_ty)
        if UPCAST:
            dsk = dsk.to(tl.float32)
        diq += tl.dot(dsk, ikb, input_precision=DOT_PREC)
        tl.store(DSBUF + row_off, dsk.to(DSBUF.dtype.element_ty), mask=slive[:, None] & (col < BLOCK)[None, :])
    diq_off = ((bi.to(tl.int64) * sq + st) * n_groups + gi) * DI
    tl.store(DIQ + diq_off[:, None] + offs_i[None, :], diq.to(DIQ.dtype.element_ty), mask=slive[:, None] & imask[None, :])
    tl.store(KLPART + tl.program_id(0) * 2, tl.sum(kl_acc, 0))
    tl.store(KLPART + tl.program_id(0) * 2 + 1, tl.sum(ent_i, 0))


@triton.jit
def _union_dik_kernel(
    DSBUF, IQ, DIK, DIKPART, ENT_ORD, IT_ORD, IT_SEG, IT_START, IT_END, IT_PSLOT, NTOT, UOFF,
    stride_iqb, stride_iqt, stride_iqg,
    sq, sk, n_groups, nt, nb, w0, off0,
    UMAX: tl.constexpr, P: tl.constexpr, PK: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    DI: tl.constexpr, DIP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Owner-side d_ik: one program = (work item, BN-key sub-tile). A work item is a run of at
    most ``union_dik_item_entries`` union entries (of this chunk) that contain one (batch, key
    block), in a fixed order (groups, tiles ascending): d_ik += dS_student^T . iq (K = PK >= 16
    rows, P live). A block's only item adds to DIK itself; items of a hot block (sinks, popular
    early blocks) write fp32 partials that ``_union_dik_reduce_kernel`` adds in item order.
    Launched largest items first (IT_ORD); items past NTOT (the padded grid) do nothing."""
    i = tl.load(IT_ORD + tl.program_id(0))
    sub = tl.program_id(1)
    if i < tl.load(NTOT):
        seg = tl.load(IT_SEG + i)
        start = tl.load(IT_START + i)
        end = tl.load(IT_END + i)
        pslot = tl.load(IT_PSLOT + i)
        bi = seg // nb
        blk = seg % nb
        kk = sub * BN + tl.arange(0, BN)
        kpos = blk * BLOCK + kk
        kin = (kpos < sk) & (kk < BLOCK)
        offs_i = tl.arange(0, DIP)
        imask = offs_i < DI
        rp = tl.arange(0, PK)
        acc = tl.zeros([BN, DIP], tl.float32)
        for e in range(start, end):
            slot = tl.load(ENT_ORD + e).to(tl.int64)  # (w - w0) * UMAX + u
            wl = slot // UMAX
            u = slot % UMAX
            w = w0 + wl
            bg = w // nt
            tile = w % nt
            gi = bg % n_groups
            ent = tl.load(UOFF + w) - off0 + u
            t = tile * P + rp
            live = (rp < P) & (t < sq)
            dsT = tl.load(DSBUF + (ent * P + rp.to(tl.int64))[None, :] * BLOCK + kk[:, None],
                          mask=live[None, :] & kin[:, None], other=0.0)
            iqr = tl.load(IQ + (bi.to(tl.int64) * stride_iqb + t.to(tl.int64) * stride_iqt + gi * stride_iqg)[:, None]
                          + offs_i[None, :], mask=live[:, None] & imask[None, :], other=0.0)
            if UPCAST:
                dsT = dsT.to(tl.float32)
                iqr = iqr.to(tl.float32)
            acc += tl.dot(dsT, iqr, input_precision=DOT_PREC)
        m = kin[:, None] & imask[None, :]
        if pslot < 0:
            off = (bi.to(tl.int64) * sk + kpos.to(tl.int64))[:, None] * DI + offs_i[None, :]
            tl.store(DIK + off, tl.load(DIK + off, mask=m, other=0.0) + acc, mask=m)
        else:
            poff = (pslot.to(tl.int64) * BLOCK + kk)[:, None] * DI + offs_i[None, :]
            tl.store(DIKPART + poff, acc, mask=m)


@triton.jit
def _union_dik_reduce_kernel(
    DIKPART, DIK, SEG_FIRST, SEG_NIT, IT_PSLOT, sk, nb,
    BLOCK: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
):
    """d_ik of a hot (batch, key block): the sum of its work items' partials, in item order."""
    seg = tl.program_id(0)
    sub = tl.program_id(1)
    n = tl.load(SEG_NIT + seg)
    if n > 1:
        f = tl.load(SEG_FIRST + seg)
        bi = seg // nb
        blk = seg % nb
        kk = sub * BN + tl.arange(0, BN)
        kpos = blk * BLOCK + kk
        offs_i = tl.arange(0, DIP)
        m = ((kpos < sk) & (kk < BLOCK))[:, None] & (offs_i < DI)[None, :]
        acc = tl.zeros([BN, DIP], tl.float32)
        for j in range(f, f + n):
            ps = tl.load(IT_PSLOT + j).to(tl.int64)
            acc += tl.load(DIKPART + (ps * BLOCK + kk)[:, None] * DI + offs_i[None, :], mask=m, other=0.0)
        off = (bi.to(tl.int64) * sk + kpos.to(tl.int64))[:, None] * DI + offs_i[None, :]
        tl.store(DIK + off, tl.load(DIK + off, mask=m, other=0.0) + acc, mask=m)


@triton.jit
def _union_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, UBLK, UMSK, UOFF, DK, DV, DKVPART,
    ENT_ORD, IT_ORD, IT_SEG, IT_START, IT_END, IT_PSLOT, NTOT, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_db, stride_dt, stride_dh, stride_gb, stride_gt, stride_gh, stride_dsb,
    sq, sk, n_groups, nt, nb, G, D, sm_scale, qk_scale,
    UMAX: tl.constexpr, P: tl.constexpr, GP: tl.constexpr, RM: tl.constexpr, BLOCK: tl.constexpr,
    BN: tl.constexpr, DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr = False,
):
    """Union-tile dK/dV: one program = (work item, BN-key sub-tile). A work item is a run of
    union entries (tiles ascending) that contain one (batch, group, key block): the program
    keeps K, V of its keys and fp32 dK, dV accumulators [BN, d] resident and streams those
    tiles' P positions x G heads in RM-row steps, in the transposed orientation of the FA
    dK/dV loop (S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
    dK += dS^T Q); rows whose position did not select the block are masked (entry bits).
    A block's only item stores dK/dV in the output dtype; the items of a hot block write
    fp32 partials [2, BN..] that ``_union_dkdv_reduce_kernel`` adds in item order: no
    atomics, deterministic. Cost linear in the union size, like the forward."""
    i = tl.load(IT_ORD + tl.program_id(0))
    sub = tl.program_id(1)
    if i < tl.load(NTOT):
        seg = tl.load(IT_SEG + i)
        start = tl.load(IT_START + i)
        end = tl.load(IT_END + i)
        pslot = tl.load(IT_PSLOT + i)
        bg = seg // nb
        blk = seg % nb
        bi = bg // n_groups
        gi = bg % n_groups
        hq = n_groups * G
        kk = sub * BN + tl.arange(0, BN)
        kpos = blk * BLOCK + kk
        kin = (kpos < sk) & (kk < BLOCK)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        kmask = kin[:, None] & dmask[None, :]
        kv_off = bi.to(tl.int64) * stride_kb + gi * stride_kh + kpos.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        kt = tl.load(K + kv_off, mask=kmask, other=0.0)
        vt = tl.load(V + kv_off, mask=kmask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        rr = tl.arange(0, RM)
        NRS: tl.constexpr = (P * GP) // RM
        for e in range(0, (end - start) * NRS):
            ee = start + e // NRS
            rs = e % NRS
            slot = tl.load(ENT_ORD + ee).to(tl.int64)  # w * UMAX + u
            w = slot // UMAX
            u = slot % UMAX
            tile = w % nt
            bits = tl.load(UMSK + w * UMAX + u)
            r = rs * RM + rr
            p = r // GP
            h = r % GP
            t = tile * P + p
            tin = t < sq
            sel = ((bits >> p) & 1) != 0
            rvalid = tin & (h < G) & sel
            qpos = tl.load(QPOS + t, mask=tin, other=-1)
            head = (gi * G + h).to(tl.int64)
            t64 = t.to(tl.int64)
            rmask = rvalid[:, None] & dmask[None, :]
            qr = tl.load(Q + (bi.to(tl.int64) * stride_qb + t64 * stride_qt + head * stride_qh)[:, None]
                         + offs_d[None, :], mask=rmask, other=0.0)
            dor = tl.load(DO + (bi.to(tl.int64) * stride_db + t64 * stride_dt + head * stride_dh)[:, None]
                          + offs_d[None, :], mask=rmask, other=0.0)
            if UPCAST:
                qr = qr.to(tl.float32)
                dor = dor.to(tl.float32)
            stat = (bi.to(tl.int64) * hq + head) * sq + t
            lse2 = tl.load(LSE + stat, mask=rvalid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat, mask=rvalid, other=0.0)
            st = tl.dot(kt, tl.trans(qr), input_precision=DOT_PREC) * qk_scale  # [BN, RM]
            valid = rvalid[None, :] & kin[:, None] & (kpos[:, None] <= qpos[None, :])
            if HAS_DOC:
                dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t, mask=tin, other=0)
                valid = valid & (kpos[:, None] >= dlo[None, :])
            pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(dor.dtype), dor, input_precision=DOT_PREC)
            dpt = tl.dot(vt, tl.trans(dor), input_precision=DOT_PREC)
            dst = (pt * (dpt - delta[None, :])).to(qr.dtype)
            dk += tl.dot(dst, qr, input_precision=DOT_PREC)
        dk = dk * sm_scale
        if pslot < 0:
            o_off = bi.to(tl.int64) * stride_gb + gi * stride_gh + kpos.to(tl.int64)[:, None] * stride_gt + offs_d[None, :]
            tl.store(DK + o_off, dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV + o_off, dv.to(DV.dtype.element_ty), mask=kmask)
        else:
            poff = ((pslot.to(tl.int64) * 2) * BLOCK + kk)[:, None] * D + offs_d[None, :]
            tl.store(DKVPART + poff, dk, mask=kmask)
            tl.store(DKVPART + poff + BLOCK * D, dv, mask=kmask)


@triton.jit
def _union_dkdv_reduce_kernel(
    DKVPART, DK, DV, SEG_FIRST, SEG_NIT, IT_PSLOT, stride_gb, stride_gt, stride_gh, sk, nb, n_groups, D,
    BLOCK: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
):
    """dK/dV of a hot (batch, group, key block): the sum of its items' partials, in item order."""
    seg = tl.program_id(0)
    sub = tl.program_id(1)
    n = tl.load(SEG_NIT + seg)
    if n > 1:
        f = tl.load(SEG_FIRST + seg)
        bg = seg // nb
        blk = seg % nb
        bi = bg // n_groups
        gi = bg % n_groups
        kk = sub * BN + tl.arange(0, BN)
        kpos = blk * BLOCK + kk
        offs_d = tl.arange(0, DP)
        m = ((kpos < sk) & (kk < BLOCK))[:, None] & (offs_d < D)[None, :]
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        for j in range(f, f + n):
            ps = tl.load(IT_PSLOT + j).to(tl.int64)
            off = ((ps * 2) * BLOCK + kk)[:, None] * D + offs_d[None, :]
            dk += tl.load(DKVPART + off, mask=m, other=0.0)
            dv += tl.load(DKVPART + off + BLOCK * D, mask=m, other=0.0)
        o_off = bi.to(tl.int64) * stride_gb + gi * stride_gh + kpos.to(tl.int64)[:, None] * stride_gt + offs_d[None, :]
        tl.store(DK + o_off, dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + o_off, dv.to(DV.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- host wrappers
def _bn(block_size: int, cfg: _tsa.KernelConfig, dtype: torch.dtype, forward: bool = False) -> int:
    """Keys per step: ``union_block_n`` (the forward: ``union_fwd_block_n`` when set), at most 32 in fp32."""
    want = (cfg.union_fwd_block_n or cfg.union_block_n) if forward else cfg.union_block_n
    cap = want if dtype != torch.float32 else min(want, 32)
    return _tsa._block_n(block_size, cap)


def union_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[_tsa.KernelConfig] = None, lists: Optional[UnionLists] = None, return_lists: bool = False,
    doc_start: Optional[Tensor] = None,
):
    """Union-tile forward: (out [b, sq, hq, d], lse [b, hq, sq] fp32), the contract of
    ``sparse_attention_fwd`` (rows with no visible key: out 0, lse -inf; ``doc_start``: packed
    documents). Rows must not repeat a block (checked by the dispatch; the union counts it once)."""
    cfg = config or _tsa.default_config()
    b, sq, hq, d, sk, g, K = _tsa._check_inputs(q, k, v, block_idx, block_size)
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = _tsa._positions(q_pos, sq, sk, q.device)
    docs = _tsa._docs(doc_start, b, sq, pos)
    out = _tsa._alloc((b, sq, hq, d), q.dtype, q.device)
    lse = _tsa._alloc((b, hq, sq), torch.float32, q.device)
    if sq == 0:
        return (out, lse, lists) if return_lists else (out, lse)
    block_idx = block_idx.contiguous()
    lists = union_lists_for(block_idx, G, q.dtype, cfg, lists, d)
    bn = _bn(block_size, cfg, q.dtype, forward=True)
    _union_fwd_kernel[(lists.cnt.numel(),)](
        q, k, v, pos, lists.order, lists.blk, lists.msk, lists.cnt, out, lse, docs.ptr,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), docs.stride_b,
        sq, sk, g, lists.nt, G, d, scale * LOG2E, HAS_DOC=docs.on,
        UMAX=lists.umax, P=lists.P, GP=_tsa._next_pow2(G), BLOCK=block_size, BN=bn, NSUB=block_size // bn,
        DP=_tsa._next_pow2(d), DOT_PREC=_tsa._dot_prec(q.dtype), UPCAST=_tsa._upcast(q),
        num_warps=cfg.union_fwd_warps, num_stages=cfg.union_fwd_stages,
    )
    return (out, lse, lists) if return_lists else (out, lse)


@dataclass
class UnionKLResult:
    """As ``FusedKLResult``: kl (mean, fp32 0-dim), d_iq [b, sq, g, di] (iq's dtype: written
    once per tile) / d_ik [b, sk, di] (fp32: accumulated over tiles) gradients of that mean,
    stats (index_entropy, main_entropy means)."""

    kl: Tensor
    d_iq: Tensor
    d_ik: Tensor
    stats: dict


def union_resident_bytes(q: Tensor, k: Tensor, K: int, lists: UnionLists, kl: bool = False, di: int = 0) -> int:
    """Bytes the union training path holds during its dQ pass besides the chunked buffers,
    from shapes: q, out, dout, dq; k, v, dk, dv; lse and delta [b, hq, sq] fp32; block_idx;
    the union lists (block and membership [tiles, UMAX] int32, counts / offsets / order);
    with the KL: iq, ik, the index LSE, d_iq (iq's dtype) and the fp32 d_ik accumulator.
    At 1M tokens, paper layout, bf16: 72.0 GiB (docs/kernels_main.md, "Memory at 1M")."""
    b, sq, hq, _ = q.shape
    g, sk = k.shape[2], k.shape[1]
    qb, kb = q.numel() * q.element_size(), k.numel() * k.element_size()
    n = lists.cnt.numel()
    total = 4 * qb + 4 * kb + 2 * b * hq * sq * 4 + b * g * sq * K * 4 + n * (2 * lists.umax * 4 + 16)
    if kl:
        total += 2 * b * sq * g * di * q.element_size() + b * sk * di * (q.element_size() + 4) + b * g * sq * 4
    return total


def _dsbuf_chunks(lists: UnionLists, bytes_per_entry: int, budget: int, bytes_per_tile: int = 0):
    """Tile ranges [w0, w1) (natural order) with their entry ranges [o0, o1), cut where the
    running bytes (``bytes_per_entry`` per union entry + ``bytes_per_tile`` per tile) cross
    equal shares of the total, as many shares as ``budget`` needs: each chunk stays within the
    budget plus one tile. One small host sync (the total and the cut points)."""
    n = lists.cnt.numel()
    if not n:
        return []
    ends = lists.off + lists.cnt.to(torch.int64)  # entries of tiles [0, w]
    cum = ends * bytes_per_entry + torch.arange(1, n + 1, device=ends.device) * bytes_per_tile
    total = int(cum[-1])
    nch = max(1, -(-total // max(1, budget)))
    if nch == 1:
        return [(0, n, 0, int(ends[-1]))]
    targets = torch.arange(1, nch, device=ends.device, dtype=torch.float64) * (total / nch)
    cuts = torch.searchsorted(cum.to(torch.float64), targets, right=True)
    offs = torch.cat([ends.new_zeros(1), ends])
    host = torch.cat([cuts, offs[cuts]]).tolist()
    bounds = [0] + [int(c) for c in host[:nch - 1]] + [n]
    eoffs = [0] + [int(o) for o in host[nch - 1:]] + [int(ends[-1])]
    return [(bounds[i], bounds[i + 1], eoffs[i], eoffs[i + 1]) for i in range(nch) if bounds[i + 1] > bounds[i]]


def _segment_work_items(seg_cnt: Tensor, n_entries: int, cap: int) -> dict:
    """Work items of the owner-side passes (d_ik; the opt-in union dK/dV), on the device without
    a host sync: each key-block segment of ``seg_cnt`` entries is cut into runs of at most ``cap`` entries
    (0: one item per segment). The grid is padded to an upper bound (``n_max``; items past
    ``total`` exit); partial slots (``pslot``, -1 for a segment's only item) are bounded by
    2 * n_entries / cap (a split segment has more than cap entries)."""
    dev = seg_cnt.device
    nseg = seg_cnt.numel()
    if cap <= 0:
        cap_t, n_max, n_part = seg_cnt.clamp_min(1), nseg, 0
    else:
        cap_t, n_max, n_part = torch.full_like(seg_cnt, cap), nseg + -(-n_entries // cap), 2 * -(-n_entries // cap)
    n_it = (seg_cnt + cap_t - 1) // cap_t  # 0 for empty segments
    cum = torch.cumsum(n_it, 0)
    first = cum - n_it
    seg_off = torch.cumsum(seg_cnt, 0) - seg_cnt
    i = torch.arange(n_max, device=dev)
    iseg = torch.searchsorted(cum, i, right=True).clamp_max(nseg - 1)
    start = seg_off[iseg] + (i - first[iseg]) * cap_t[iseg]
    end = torch.minimum(start + cap_t[iseg], seg_off[iseg] + seg_cnt[iseg])
    total = cum[-1:].clone()
    split = (n_it[iseg] > 1) & (i < total)
    pslot = torch.where(split, torch.cumsum(split.long(), 0) - 1, torch.full_like(i, -1))
    order = torch.argsort(torch.where(i < total, end - start, -1), descending=True, stable=True)
    return dict(n_max=n_max, n_part=n_part if cap > 0 else 0, order=order, seg=iseg, start=start, end=end,
                pslot=pslot, total=total, seg_first=first, seg_nit=n_it)


def union_attention_dq(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[_tsa.KernelConfig] = None, lists: Optional[UnionLists] = None,
    delta: Optional[Tensor] = None, kl: Optional[_tsa.FusedKL] = None, doc_start: Optional[Tensor] = None,
    extra_resident_bytes: int = 0,
):
    """Union-tile dQ (deterministic, written once), optionally with the indexer KL fused
    (``kl=FusedKL(iq, ik, index_lse, index_scale)``): returns dq, or (dq, UnionKLResult).

    With the KL, d_iq is written once per tile in iq's dtype (no fp32 [b, sq, g, di] buffer:
    2 GiB at 1M) and d_ik accumulated in fp32 [b, sk, di]. The tiles run in chunks whose
    teacher / dS buffers (and the d_ik pass's per-chunk arrays) fit
    ``triton_sparse_attn.partial_budget`` of this call's resident tensors (+
    ``extra_resident_bytes`` the caller holds): a function of the shapes, not of free memory."""
    cfg = config or _tsa.default_config()
    b, sq, hq, d, sk, g, K = _tsa._check_inputs(q, k, v, block_idx, block_size)
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = _tsa._positions(q_pos, sq, sk, q.device)
    docs = _tsa._docs(doc_start, b, sq, pos)
    do = do if do.stride(-1) == 1 else do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    lse = lse.contiguous()
    dq = _tsa._alloc((b, sq, hq, d), q.dtype, q.device)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    if kl is not None:
        kiq, kik, kilse, di, kl_norm = _tsa._check_fused_kl(kl, q, sk, g)
        d_iq32 = _tsa._alloc((b, sq, g, di), kiq.dtype, q.device)  # written once per tile: no fp32 needed
        d_ik32 = torch.zeros((b, sk, di), dtype=torch.float32, device=q.device)
    if sq == 0:
        if kl is None:
            return dq
        zero = torch.zeros((), dtype=torch.float32, device=q.device)
        return dq, UnionKLResult(zero, d_iq32, d_ik32, {"index_entropy": zero.clone(), "main_entropy": zero.clone()})
    block_idx = block_idx.contiguous()
    lists = union_lists_for(block_idx, G, q.dtype, cfg, lists, d)
    if delta is None:
        delta = _tsa._delta(out, do)
    bn = _bn(block_size, cfg, q.dtype)
    P, GP, DP = lists.P, _tsa._next_pow2(G), _tsa._next_pow2(d)
    prec, up = _tsa._dot_prec(q.dtype), _tsa._upcast(q)
    common = dict(UMAX=lists.umax, P=P, GP=GP, BLOCK=block_size, BN=bn, NSUB=block_size // bn, DP=DP,
                  DOT_PREC=prec, UPCAST=up, HAS_DOC=docs.on)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2))
    n_w = lists.cnt.numel()
    if kl is None:
        _union_dq_kernel[(n_w,)](
            q, k, v, do, lse, delta, pos, lists.order, lists.blk, lists.msk, lists.cnt, lists.off, dq,
            dummy, dummy, docs.ptr, *strides, docs.stride_b,
            sq, sk, g, lists.nt, G, d, scale, scale * LOG2E, 0, 0, KL=False, **common,
            num_warps=cfg.union_dq_warps, num_stages=cfg.union_dq_stages,
        )
        return dq
    DIP = max(16, _tsa._next_pow2(di))
    iscale = float(kl.index_scale)
    nb = math.ceil(sk / block_size)
    ds_dtype = kik.dtype
    # per union entry: the teacher P-bar (fp32), the student's logit gradient (ik's dtype), its
    # share of the d_ik pass's partials (two per union_dik_item_entries entries) and of the
    # chunk's entry sort (int64 keys, order and segment ids per tile slot, ~UMAX / U per entry)
    cap = cfg.union_dik_item_entries
    per_entry = (P * block_size * (4 + torch.empty((), dtype=ds_dtype).element_size())
                 + (-(-2 * block_size * di * 4 // cap) if cap > 0 else 0))
    per_tile = 4 * 8 * lists.umax  # the chunk's entry sort: int64 slot keys, sorted keys, order, segment ids
    budget = _tsa.partial_budget(cfg, union_resident_bytes(q, k, K, lists, kl=True, di=di) + extra_resident_bytes)
    chunks = _dsbuf_chunks(lists, per_entry, budget, per_tile)
    kl_parts, entm_parts = [], []
    bn_ik = _tsa._block_n(block_size, 64)
    bn_kl = _tsa._block_n(block_size, 64 if q.dtype != torch.float32 else 32)
    PPAD = max(16, _tsa._next_pow2(P))
    for w0, w1, o0, o1 in chunks:
        nwc = w1 - w0
        ne = max(1, o1 - o0)
        pbuf = _tsa._alloc((ne, P, block_size), torch.float32, q.device)
        dsbuf = _tsa._alloc((ne, P, block_size), ds_dtype, q.device)
        entm = torch.empty((nwc,), dtype=torch.float32, device=q.device)
        klpart = torch.empty((nwc, 2), dtype=torch.float32, device=q.device)
        _union_dq_kernel[(nwc,)](
            q, k, v, do, lse, delta, pos, lists.order, lists.blk, lists.msk, lists.cnt, lists.off, dq,
            pbuf, entm, docs.ptr, *strides, docs.stride_b,
            sq, sk, g, lists.nt, G, d, scale, scale * LOG2E, w0, o0, KL=True, **common,
            num_warps=cfg.union_dq_warps, num_stages=cfg.union_dq_stages,
        )
        _union_kl_kernel[(nwc,)](
            pos, lists.blk, lists.msk, lists.cnt, lists.off, pbuf, kiq, kik, kilse, d_iq32, dsbuf, klpart, docs.ptr,
            kiq.stride(0), kiq.stride(1), kiq.stride(2), kik.stride(0), kik.stride(1),
            kilse.stride(0), kilse.stride(1), docs.stride_b,
            sq, sk, g, lists.nt, iscale, iscale / kl_norm, w0, o0,
            UMAX=lists.umax, P=P, BLOCK=block_size, BN=bn_kl, NSUB=triton.cdiv(block_size, bn_kl), DI=di, DIP=DIP,
            PPAD=PPAD, DOT_PREC=_tsa._dot_prec(kik.dtype), UPCAST=up, HAS_DOC=docs.on,
            num_warps=4, num_stages=cfg.union_kl_stages,
        )
        del pbuf
        kl_parts.append(klpart)
        entm_parts.append(entm)
        # owner-side d_ik: reverse index of this chunk's union entries by (batch, block)
        ent_ord, seg_cnt, nseg = _entry_segments(lists, nb, g, w0, w1)
        items = _segment_work_items(seg_cnt, o1 - o0, cfg.union_dik_item_entries)
        grid_n = triton.cdiv(block_size, bn_ik)
        dikpart = torch.empty((max(1, items["n_part"]), block_size, di), dtype=torch.float32, device=q.device)
        _union_dik_kernel[(items["n_max"], grid_n)](
            dsbuf, kiq, d_ik32, dikpart, ent_ord, items["order"], items["seg"], items["start"], items["end"],
            items["pslot"], items["total"], lists.off,
            kiq.stride(0), kiq.stride(1), kiq.stride(2),
            sq, sk, g, lists.nt, nb, w0, o0,
            UMAX=lists.umax, P=P, PK=max(16, _tsa._next_pow2(P)), BLOCK=block_size, BN=bn_ik, DI=di, DIP=DIP,
            DOT_PREC=_tsa._dot_prec(kik.dtype), UPCAST=up, num_warps=4, num_stages=2,
        )
        if items["n_part"]:
            _union_dik_reduce_kernel[(nseg, grid_n)](
                dikpart, d_ik32, items["seg_first"], items["seg_nit"], items["pslot"], sk, nb,
                BLOCK=block_size, BN=bn_ik, DI=di, DIP=DIP, num_warps=4,
            )
        del dsbuf, ent_ord, seg_cnt, items, dikpart
    sums = torch.cat(kl_parts).sum(0)
    ent_m = torch.cat(entm_parts).sum()
    stats = {"index_entropy": -sums[1] / kl_norm, "main_entropy": -LN2 * ent_m / (kl_norm * G)}
    return dq, UnionKLResult(sums[0] / kl_norm, d_iq32, d_ik32, stats)


def _entry_segments(lists: UnionLists, nb: int, groups: int, w0: int = 0, w1: Optional[int] = None):
    """The reverse of the union lists (no host sync): the entries ``(w - w0) * UMAX + u`` of the
    tiles [w0, w1) sorted by key-block segment, stable (tiles ascending inside a segment: a
    fixed order), the entry count per segment, and the segment count. Tiles are numbered
    ``(b * g + group) * nt + tile``; segments are (w // nt // groups, block): ``groups=1`` gives
    (b*g, block) (K/V belong to a group), ``groups=g`` gives (b, block) (the shared index key)."""
    w1 = lists.cnt.numel() if w1 is None else w1
    ublk = lists.blk[w0:w1].to(torch.int64)
    owner = torch.arange(w0, w1, device=ublk.device) // lists.nt // groups
    nseg = lists.cnt.numel() // lists.nt // groups * nb
    seg = torch.where(ublk >= 0, owner[:, None] * nb + ublk, torch.full_like(ublk, nseg))
    del ublk
    ent_ord = torch.sort(seg.view(-1), stable=True).indices
    seg_cnt = torch.bincount(seg.view(-1), minlength=nseg + 1)[:nseg]
    return ent_ord, seg_cnt, nseg


def union_attention_dkdv(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[_tsa.KernelConfig] = None, lists: Optional[UnionLists] = None,
    doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Union-tile dK/dV (deterministic, no atomics): (dk, dv) [b, sk, g, d] in k's dtype;
    ``delta`` = rowsum(out * dout) [b, hq, sq] fp32. Keys no query selected get 0."""
    cfg = config or _tsa.default_config()
    b, sq, hq, d, sk, g, K = _tsa._check_inputs(q, k, v, block_idx, block_size)
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = _tsa._positions(q_pos, sq, sk, q.device)
    docs = _tsa._docs(doc_start, b, sq, pos)
    do = do if do.stride(-1) == 1 else do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    dk = torch.zeros((b, sk, g, d), dtype=k.dtype, device=k.device)
    dv = torch.zeros((b, sk, g, d), dtype=v.dtype, device=v.device)
    if sq == 0 or sk == 0:
        return dk, dv
    block_idx = block_idx.contiguous()
    lists = union_lists_for(block_idx, G, q.dtype, cfg, lists, d)
    lse = lse.contiguous()
    nb = math.ceil(sk / block_size)
    ent_ord, seg_cnt, nseg = _entry_segments(lists, nb, 1)
    n_entries = int(ent_ord.numel())
    items = _segment_work_items(seg_cnt, n_entries, cfg.union_dkdv_item_entries)
    bn = _tsa._block_n(block_size, cfg.union_dkdv_block_n if q.dtype != torch.float32 else 32)
    GP, DP = _tsa._next_pow2(G), _tsa._next_pow2(d)
    rows = lists.P * GP
    rm = min(rows, cfg.union_dkdv_rows if q.dtype != torch.float32 else 32)
    n_part = int(items["pslot"].max().item()) + 1 if items["n_part"] else 0  # one host sync: the real count
    part = torch.empty((max(1, n_part), 2, block_size, d), dtype=torch.float32, device=q.device)
    grid_n = triton.cdiv(block_size, bn)
    _union_dkdv_kernel[(items["n_max"], grid_n)](
        q, k, v, do, lse, delta, pos, lists.blk, lists.msk, lists.off, dk, dv, part,
        ent_ord, items["order"], items["seg"], items["start"], items["end"], items["pslot"], items["total"], docs.ptr,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), docs.stride_b,
        sq, sk, g, lists.nt, nb, G, d, scale, scale * LOG2E,
        UMAX=lists.umax, P=lists.P, GP=GP, RM=rm, BLOCK=block_size, BN=bn, DP=DP,
        DOT_PREC=_tsa._dot_prec(q.dtype), UPCAST=_tsa._upcast(q), HAS_DOC=docs.on,
        num_warps=cfg.union_dkdv_warps, num_stages=cfg.union_dkdv_stages,
    )
    if n_part:
        _union_dkdv_reduce_kernel[(nseg, grid_n)](
            part, dk, dv, items["seg_first"], items["seg_nit"], items["pslot"],
            dk.stride(0), dk.stride(1), dk.stride(2), sk, nb, g, d,
            BLOCK=block_size, BN=bn, DP=DP, num_warps=4,
        )
    return dk, dv


def union_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[_tsa.KernelConfig] = None, lists: Optional[UnionLists] = None, plan=None,
    kl: Optional[_tsa.FusedKL] = None, doc_start: Optional[Tensor] = None, extra_resident_bytes: int = 0,
):
    """Split backward: dK/dV per key block over the union entries that hold it
    (``union_dkdv="union"``, default) or by the KV-outer kernel without its dQ half
    (``"kv"``), dQ (+ the KL) by the union tile. Returns (dq, dk, dv) or
    (dq, dk, dv, UnionKLResult)."""
    cfg = config or _tsa.default_config()
    do = do if do.stride(-1) == 1 else do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if q.shape[1] and lists is None:  # built once for both halves
        lists = union_lists_for(block_idx.contiguous(), q.shape[2] // k.shape[2], q.dtype, cfg, None, q.shape[-1])
    if cfg.union_dkdv == "union":
        delta = _tsa._delta(out, do)
        dk, dv = union_attention_dkdv(do, q, k, v, lse, delta, block_idx, block_size, q_pos, softmax_scale, config=cfg,
                                      lists=lists, doc_start=doc_start)
    else:
        _, dk, dv, delta = _tsa.sparse_attention_bwd(do, q, k, v, out, lse, block_idx, block_size, q_pos,
                                                     softmax_scale, config=cfg, plan=plan, compute_dq=False,
                                                     return_delta=True, doc_start=doc_start)
    plan = None  # its reverse index is not needed by the dQ pass (freed here unless the caller keeps it)
    res = union_attention_dq(do, q, k, v, out, lse, block_idx, block_size, q_pos, softmax_scale, config=cfg,
                             lists=lists, delta=delta, kl=kl, doc_start=doc_start,
                             extra_resident_bytes=extra_resident_bytes)
    if kl is None:
        return res, dk, dv
    dq, klres = res
    return dq, dk, dv, klres


__all__ = [
    "UnionKLResult", "UnionLists", "build_union_lists", "build_union_lists_triton", "resolve_main_impl", "union_attention_bwd",
    "union_attention_dkdv", "union_attention_dq", "union_attention_fwd", "union_lists_for", "union_positions",
    "union_mean_dups", "union_resident_bytes", "union_stats",
]

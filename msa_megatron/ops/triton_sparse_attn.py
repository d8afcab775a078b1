"""Triton kernels for MSA's main branch: exact attention over per-token selected key blocks.

Semantics are those of :func:`msa_megatron.ops.naive.sparse_attention` (layouts in the
reference's module docstring): every query head attends, with an exact softmax, to the
keys of its group's selected blocks that are causally visible (key <= q_pos, key < sk).

Why KV-outer (see docs/kernels_main.md for the design and numbers): each query selects its
own K blocks, so a query-outer program only has the G heads of one position as MMA rows
(16 rows against 128-key tiles) and reloads 2 x K key/value tiles per position. Here a
program owns one KV block (``BN`` keys of it) and streams the queries that chose it, taken
from a reverse index (block -> (query, slot) pairs, built per call by a stable sort), packed
``QP`` positions x ``G`` heads per MMA tile (128 rows at G = 16). The price is that a query's
softmax is split over K programs:

* forward: every program writes a partial (normalised output, log-sum-exp) per
  (query, slot, head); a combine kernel merges a query's K partials by LSE, in slot order
  (no atomics, deterministic).
* backward: dK/dV accumulate in registers of the block's program (blocks chosen by more
  than ``item_pairs`` queries are split over several programs and reduced in order by a
  second kernel); dQ is written as per-(query, slot) partials summed in slot order by a
  combine kernel (``deterministic=True``, the default) or accumulated with fp32 atomics.

Partial buffers scale with sq x hq x K x d, so the queries are processed in chunks that keep
them under ``KernelConfig.partial_bytes``. The simple query-outer forward (``fwd_impl='q'``)
is a benchmark baseline: it lives in ``msa_megatron/bench/qouter.py``.

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 cannot be computed by the interpreter, so
bf16 operands are upcast to fp32 right after loading (``UPCAST``); loads, stores and the
partial buffers keep their real dtypes. On CUDA ``UPCAST`` is always off.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common as _common
from .csr import SelectionCSR, csr_for
from .tuning import MAIN_IMPLS, KernelConfig, KernelConfigError, default_config  # noqa: F401  (re-exported)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Fill outputs and partial buffers with NaN before the kernels run, so an element a kernel
#: fails to write (or a partial the combine wrongly reads) shows up. Tests and
#: scripts/gpu_check_main.py turn it on (or MSA_POISON_OUTPUTS=1; this module's own switch).
POISON_OUTPUTS = _common.POISON_OUTPUTS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Validate block_idx ranges with a host-side check (one sync per call) instead of the
#: asynchronous device assert (MSA_DEBUG_CHECKS=1; the tests turn it on for clear errors).
DEBUG_CHECKS = _common.DEBUG_CHECKS


log = logging.getLogger("msa_megatron.ops")
_announce, _announced = _common.announce, _common.ANNOUNCED


# ----------------------------------------------------------------------------- configuration
# KernelConfig, default_config: ops/tuning.py (one config family, one env syntax), re-exported here.


def _kv_outer_only(cfg: KernelConfig) -> None:
    """fwd_impl='q' (the query-outer baseline) is not a production path: say where it lives."""
    if cfg.fwd_impl != "kv":
        raise KernelConfigError("KernelConfig.fwd_impl", cfg.fwd_impl,
                                "'kv' here ('q', the query-outer baseline, runs through "
                                "msa_megatron.bench.qouter.qouter_attention)")


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kv_kernel(
    Q, K, V, QPOS, PERM, IT_BG, IT_BLK, IT_START, IT_END, OPART, LPART, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_dsb,
    t0, cq, sk, n_groups, G, D, qk_scale,
    KSEL: tl.constexpr, NSUB: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    GP: tl.constexpr, QP: tl.constexpr, DP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_DOC: tl.constexpr = False,
):
    """KV-outer forward: one program = one work item (a run of the (query, slot) pairs that
    chose one block) x one BN-key sub-tile of the block. Writes, per pair and head, the
    sub-tile's normalised output and log2-sum-exp (-inf when no key is visible)."""
    item = tl.program_id(0)
    sub = tl.program_id(1)
    bg = tl.load(IT_BG + item)
    blk = tl.load(IT_BLK + item)
    start = tl.load(IT_START + item)
    end = tl.load(IT_END + item)
    bi = bg // n_groups
    gi = bg % n_groups
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    kpos = blk * BLOCK + sub * BN + tl.arange(0, BN)
    kin = kpos < sk
    kv_off = bi.to(tl.int64) * stride_kb + kpos.to(tl.int64)[:, None] * stride_kt + gi * stride_kh + offs_d[None, :]
    kmask = kin[:, None] & dmask[None, :]
    kt = tl.load(K + kv_off, mask=kmask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    vt = tl.load(V + kv_off, mask=kmask, other=0.0)
    if UPCAST:
        vt = vt.to(tl.float32)
    r = tl.arange(0, QP * GP)
    pr = r // GP
    h = r % GP
    for e0 in range(start, end, QP):
        e = e0 + pr
        rvalid = (e < end) & (h < G)
        pair = tl.load(PERM + e, mask=rvalid, other=0).to(tl.int64)
        t = t0 + (pair // KSEL) % cq
        qpos = tl.load(QPOS + t, mask=rvalid, other=-1)
        q_rows = bi.to(tl.int64) * stride_qb + t * stride_qt + (gi * G + h).to(tl.int64) * stride_qh
        qt = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
        sc = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        valid = rvalid[:, None] & kin[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_DOC:
            dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t, mask=rvalid, other=0)
            valid = valid & (kpos[None, :] >= dlo[:, None])
        sc = tl.where(valid, sc, float("-inf"))
        m = tl.max(sc, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(sc - m_safe[:, None])
        l = tl.sum(p, 1)
        o = tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        l_safe = tl.where(l > 0, l, 1.0)
        o = o / l_safe[:, None]
        lse2 = tl.where(l > 0, m_safe + tl.log2(l_safe), float("-inf"))
        prow = (pair * NSUB + sub) * G + h
        tl.store(OPART + prow[:, None] * D + offs_d[None, :], o.to(OPART.dtype.element_ty),
                 mask=rvalid[:, None] & dmask[None, :])
        tl.store(LPART + prow, lse2, mask=rvalid)


@triton.jit
def _fwd_combine_kernel(
    OPART, LPART, BIDX, OUT, LSE,
    stride_ob, stride_ot, stride_oh,
    t0, cq, nt, sq, n_groups, G, D,
    KSEL: tl.constexpr, NSUB: tl.constexpr, GP: tl.constexpr, TQ: tl.constexpr, DP: tl.constexpr,
):
    """Merges each query's per-(slot, sub-tile) partials by LSE, in slot order; one program =
    TQ query positions x the G heads of one group."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    bi = bg // n_groups
    gi = bg % n_groups
    r = tl.arange(0, TQ * GP)
    h = r % GP
    tloc = tile * TQ + r // GP
    rmask = (h < G) & (tloc < nt)
    offs_d = tl.arange(0, DP)
    mask = rmask[:, None] & (offs_d < D)[None, :]
    M = tl.full([TQ * GP], float("-inf"), tl.float32)
    L = tl.zeros([TQ * GP], tl.float32)
    acc = tl.zeros([TQ * GP, DP], tl.float32)
    pair0 = (bg.to(tl.int64) * cq + tloc) * KSEL
    for s in range(KSEL):
        blk = tl.load(BIDX + pair0 + s, mask=rmask, other=-1)
        use = rmask & (blk >= 0)
        for n in range(NSUB):
            prow = ((pair0 + s) * NSUB + n) * G + h
            lu = tl.load(LPART + prow, mask=use, other=float("-inf"))
            ou = tl.load(OPART + prow[:, None] * D + offs_d[None, :], mask=use[:, None] & mask, other=0.0)
            m_new = tl.maximum(M, lu)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp2(M - m_safe)
            w = tl.exp2(lu - m_safe)
            acc = acc * a[:, None] + w[:, None] * ou.to(tl.float32)
            L = L * a + w
            M = m_new
    L_safe = tl.where(L > 0, L, 1.0)
    o = acc / L_safe[:, None]
    lse = tl.where(L > 0, (M + tl.log2(L_safe)) * 0.6931471805599453, float("-inf"))
    t = (t0 + tloc).to(tl.int64)
    o_rows = bi.to(tl.int64) * stride_ob + t * stride_ot + (gi * G + h).to(tl.int64) * stride_oh
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=mask)
    hq = n_groups * G
    tl.store(LSE + (bi.to(tl.int64) * hq + gi * G + h) * sq + t, lse, mask=rmask)


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
    sq, hq, D, HP: tl.constexpr, TD: tl.constexpr, DP: tl.constexpr,
):
    """delta[b, h, t] = sum_d out * dout (fp32), the softmax-backward row correction; one
    program = TD positions x all heads."""
    tile = tl.program_id(0)
    bi = tl.program_id(1)
    r = tl.arange(0, TD * HP)
    h = r % HP
    t = (tile * TD + r // HP).to(tl.int64)
    rmask = (h < hq) & (t < sq)
    offs_d = tl.arange(0, DP)
    mask = rmask[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + (bi.to(tl.int64) * stride_ob + t * stride_ot + h.to(tl.int64) * stride_oh)[:, None]
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + (bi.to(tl.int64) * stride_db + t * stride_dt + h.to(tl.int64) * stride_dh)[:, None]
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (bi.to(tl.int64) * hq + h) * sq + t, tl.sum(o * do, 1), mask=rmask)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, PERM, IT_BG, IT_BLK, IT_START, IT_END, IT_PSLOT,
    DQ, DKACC, DVACC, DKPART, DVPART,
    IQ, IK, ILSE, DIQ, DIK, KLPART, DS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_db, stride_dt, stride_dh,
    stride_iqb, stride_iqt, stride_iqg, stride_ikb, stride_ikt, stride_ilb, stride_ilg, stride_dsb,
    t0, cq, sq, sk, n_groups, G, D, sm_scale, qk_scale, iscale, kl_coef,
    KSEL: tl.constexpr, NSUB: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
    GP: tl.constexpr, QP: tl.constexpr, DP: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, PART: tl.constexpr,
    KL: tl.constexpr, KLJ: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, DIRECT: tl.constexpr = False,
    HAS_DOC: tl.constexpr = False,
):
    """KV-outer backward for one work item x one BN-key sub-tile: dK/dV in registers over the
    item's queries; dQ per (pair, sub-tile, head) into a partial buffer (or fp32 atomics into
    the chunk's dQ accumulator [b, cq, hq, d]). PART 0: all of it (5 dots); 1: dV only;
    2: dK and dQ only (split mode: one accumulator per program, 6 dots in all); 3: dK and dV
    without dQ (the v2 split backward: dQ comes from the union-tile kernel).

    KL (fused indexer KL backward, in PART 0 or 1): the tile already holds every head's P_h
    for its QP pairs, so the teacher P-bar = mean_h P_h is a reduction over the tile's heads.
    P-bar of KLJ consecutive row tiles (KLJ * QP >= 16 pairs: an MMA-sized student tile) is
    collected in registers, then per group: log Q = iq . ik * iscale - index_lse (one dot),
    dS = (Q - P-bar) * kl_coef (bf16 like dS above), d_ik += dS^T-side dot in registers (one
    atomic add per program), d_iq += dS . ik (fp32 atomics), and the KL / entropy partial sums
    (KLPART[program] = (KL, sum Q ln Q, sum_h P_h log2 P_h), signs/units fixed on the host)."""
    item = tl.program_id(0)
    sub = tl.program_id(1)
    bg = tl.load(IT_BG + item)
    blk = tl.load(IT_BLK + item)
    start = tl.load(IT_START + item)
    end = tl.load(IT_END + item)
    bi = bg // n_groups
    gi = bg % n_groups
    hq = n_groups * G
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    kpos = blk * BLOCK + sub * BN + tl.arange(0, BN)
    kin = kpos < sk
    kv_off = bi.to(tl.int64) * stride_kb + kpos.to(tl.int64)[:, None] * stride_kt + gi * stride_kh + offs_d[None, :]
    kmask = kin[:, None] & dmask[None, :]
    kt = tl.load(K + kv_off, mask=kmask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    vt = tl.load(V + kv_off, mask=kmask, other=0.0)
    if UPCAST:
        vt = vt.to(tl.float32)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    r = tl.arange(0, QP * GP)
    pr = r // GP
    h = r % GP
    head = (gi * G + h).to(tl.int64)
    KLON: tl.constexpr = KL and PART != 2
    if KLON:
        offs_i = tl.arange(0, DIP)
        imask = offs_i < DI
        ikb = tl.load(IK + bi.to(tl.int64) * stride_ikb + kpos.to(tl.int64)[:, None] * stride_ikt + offs_i[None, :],
                      mask=kin[:, None] & imask[None, :], other=0.0)
        if UPCAST:
            ikb = ikb.to(tl.float32)
        dik = tl.zeros([BN, DIP], tl.float32)
        cc = tl.arange(0, QP * KLJ)
        jj = tl.arange(0, KLJ)
        pbar3 = tl.zeros([BN, KLJ, QP], tl.float32)  # P-bar of the group's KLJ row tiles
        kl_acc = tl.zeros([BN], tl.float32)
        ent_i = tl.zeros([BN], tl.float32)
        ent_m = tl.zeros([BN], tl.float32)
    for e0 in range(start, end, QP):
        e = e0 + pr
        rvalid = (e < end) & (h < G)
        pair = tl.load(PERM + e, mask=rvalid, other=0).to(tl.int64)
        tloc = (pair // KSEL) % cq
        t = t0 + tloc
        qpos = tl.load(QPOS + t, mask=rvalid, other=-1)
        rmask = rvalid[:, None] & dmask[None, :]
        q_rows = bi.to(tl.int64) * stride_qb + t * stride_qt + head * stride_qh
        qt = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rmask, other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
        do_rows = bi.to(tl.int64) * stride_db + t * stride_dt + head * stride_dh
        dot_ = tl.load(DO + do_rows[:, None] + offs_d[None, :], mask=rmask, other=0.0)
        if UPCAST:
            dot_ = dot_.to(tl.float32)
        stat = (bi.to(tl.int64) * hq + head) * sq + t
        lse2 = tl.load(LSE + stat, mask=rvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat, mask=rvalid, other=0.0)
        # Transposed orientation [keys, rows] (as the Triton FA tutorial's dK/dV loop): P^T and
        # dS^T are the A operands of the dV / dK updates straight from registers.
        sT = tl.dot(kt, tl.trans(qt), input_precision=DOT_PREC) * qk_scale
        validT = rvalid[None, :] & kin[:, None] & (kpos[:, None] <= qpos[None, :])
        if HAS_DOC:  # keys before the row's document start are invisible
            dlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + t, mask=rvalid, other=0)
            validT = validT & (kpos[:, None] >= dlo[None, :])
        pT = tl.where(validT, tl.exp2(sT - lse2[None, :]), 0.0)
        if KLON:
            ent_m += tl.sum(tl.where(validT, pT * (sT - lse2[None, :]), 0.0), 1)
            jcur = ((e0 - start) // QP) % KLJ
            pb = tl.sum(tl.reshape(pT, (BN, QP, GP)), 2)  # head sum per pair: [BN, QP]
            pbar3 = tl.where(jj[None, :, None] == jcur, pb[:, None, :], pbar3)
            if (jcur == KLJ - 1) | (e0 + QP >= end):  # group complete: the student step
                e00 = e0 - jcur * QP
                ec = e00 + cc
                cvalid = ec < end
                cpair = tl.load(PERM + ec, mask=cvalid, other=0).to(tl.int64)
                ct = t0 + (cpair // KSEL) % cq
                cpos = tl.load(QPOS + ct, mask=cvalid, other=-1)
                iq_off = bi.to(tl.int64) * stride_iqb + ct * stride_iqt + gi * stride_iqg
                iqc = tl.load(IQ + iq_off[:, None] + offs_i[None, :], mask=cvalid[:, None] & imask[None, :], other=0.0)
                if UPCAST:
                    iqc = iqc.to(tl.float32)
                ilse = tl.load(ILSE + bi.to(tl.int64) * stride_ilb + gi * stride_ilg + ct, mask=cvalid, other=0.0)
                pbar = tl.reshape(pbar3, (BN, QP * KLJ)) / G
                cv = cvalid[None, :] & kin[:, None] & (kpos[:, None] <= cpos[None, :])
                if HAS_DOC:
                    cdlo = tl.load(DS + bi.to(tl.int64) * stride_dsb + ct, mask=cvalid, other=0)
                    cv = cv & (kpos[:, None] >= cdlo[None, :])
                logq = tl.dot(ikb, tl.trans(iqc), input_precision=DOT_PREC) * iscale - ilse[None, :]
                qs = tl.where(cv, tl.exp(logq), 0.0)
                kl_acc += tl.sum(tl.where(cv & (pbar > 0), pbar * (tl.log(tl.where(pbar > 0, pbar, 1.0)) - logq), 0.0), 1)
                ent_i += tl.sum(tl.where(cv, qs * logq, 0.0), 1)
                dsk = tl.where(cv, (qs - pbar) * kl_coef, 0.0).to(IK.dtype.element_ty)
                if UPCAST:
                    dsk = dsk.to(tl.float32)
                dik += tl.dot(dsk, iqc, input_precision=DOT_PREC)
                diq = tl.dot(tl.trans(dsk), ikb, input_precision=DOT_PREC)
                diq_off = ((bi.to(tl.int64) * sq + ct) * n_groups + gi) * DI
                tl.atomic_add(DIQ + diq_off[:, None] + offs_i[None, :], diq, mask=cvalid[:, None] & imask[None, :],
                              sem="relaxed")
                pbar3 = tl.zeros([BN, KLJ, QP], tl.float32)
        if PART != 2:
            dv += tl.dot(pT.to(dot_.dtype), dot_, input_precision=DOT_PREC)
        if PART != 1:
            dpT = tl.dot(vt, tl.trans(dot_), input_precision=DOT_PREC)
            dsT = (pT * (dpT - delta[None, :])).to(qt.dtype)
            dk += tl.dot(dsT, qt, input_precision=DOT_PREC)
            if PART != 3:
                dq = tl.dot(tl.trans(dsT), kt, input_precision=DOT_PREC) * sm_scale
                if DQ_ATOMIC:
                    dq_rows = ((bi.to(tl.int64) * cq + tloc) * hq + head) * D
                    tl.atomic_add(DQ + dq_rows[:, None] + offs_d[None, :], dq, mask=rmask, sem="relaxed")
                else:
                    prow = (pair * NSUB + sub) * G + h
                    tl.store(DQ + prow[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask)
    if KLON:
        tl.atomic_add(DIK + (bi.to(tl.int64) * sk + kpos.to(tl.int64))[:, None] * DI + offs_i[None, :], dik,
                      mask=kin[:, None] & imask[None, :], sem="relaxed")
        prog = (item * NSUB + sub) * 3
        tl.store(KLPART + prog, tl.sum(kl_acc, 0))
        tl.store(KLPART + prog + 1, tl.sum(ent_i, 0))
        tl.store(KLPART + prog + 2, tl.sum(ent_m, 0))
    dk = dk * sm_scale
    pslot = tl.load(IT_PSLOT + item)
    if pslot < 0:
        # sole program of this (block, sub-tile) in this launch: accumulate in place
        acc_off = ((bi.to(tl.int64) * sk + kpos.to(tl.int64)[:, None]) * n_groups + gi) * D + offs_d[None, :]
        if PART != 1:
            if DIRECT:  # one chunk: this program is the only writer -> the output dtype, no fp32 accumulator
                tl.store(DKACC + acc_off, dk.to(DKACC.dtype.element_ty), mask=kmask)
            else:
                tl.store(DKACC + acc_off, tl.load(DKACC + acc_off, mask=kmask, other=0.0) + dk, mask=kmask)
        if PART != 2:
            if DIRECT:
                tl.store(DVACC + acc_off, dv.to(DVACC.dtype.element_ty), mask=kmask)
            else:
                tl.store(DVACC + acc_off, tl.load(DVACC + acc_off, mask=kmask, other=0.0) + dv, mask=kmask)
    else:
        part_off = (pslot.to(tl.int64) * BLOCK + sub * BN + tl.arange(0, BN))[:, None] * D + offs_d[None, :]
        pmask = (tl.arange(0, BN) < BN)[:, None] & dmask[None, :]
        if PART != 1:
            tl.store(DKPART + part_off, dk, mask=pmask)
        if PART != 2:
            tl.store(DVPART + part_off, dv, mask=pmask)


@triton.jit
def _bwd_reduce_kernel(
    DKPART, DVPART, DKACC, DVACC, SG_BG, SG_BLK, SG_P0, SG_P1,
    sk, n_groups, D, BLOCK: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DIRECT: tl.constexpr = False,
):
    """Adds the partial dK/dV of a split block's work items, in item order (deterministic);
    one program = BN rows of the block."""
    seg = tl.program_id(0)
    sub = tl.program_id(1)
    bg = tl.load(SG_BG + seg)
    blk = tl.load(SG_BLK + seg)
    p0 = tl.load(SG_P0 + seg)
    p1 = tl.load(SG_P1 + seg)
    bi = bg // n_groups
    gi = bg % n_groups
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    rows = sub * BN + tl.arange(0, BN)
    sdk = tl.zeros([BN, DP], tl.float32)
    sdv = tl.zeros([BN, DP], tl.float32)
    pmask = (rows < BLOCK)[:, None] & dmask[None, :]
    base = p0.to(tl.int64)
    for i in range(0, p1 - p0):
        off = ((base + i) * BLOCK + rows)[:, None] * D + offs_d[None, :]
        sdk += tl.load(DKPART + off, mask=pmask, other=0.0)
        sdv += tl.load(DVPART + off, mask=pmask, other=0.0)
    kpos = blk * BLOCK + rows
    kmask = ((kpos < sk) & (rows < BLOCK))[:, None] & dmask[None, :]  # rows past the block belong to the next one
    acc_off = ((bi.to(tl.int64) * sk + kpos.to(tl.int64)[:, None]) * n_groups + gi) * D + offs_d[None, :]
    if DIRECT:  # one chunk: the block's only writer -> the output dtype
        tl.store(DKACC + acc_off, sdk.to(DKACC.dtype.element_ty), mask=kmask)
        tl.store(DVACC + acc_off, sdv.to(DVACC.dtype.element_ty), mask=kmask)
    else:
        tl.store(DKACC + acc_off, tl.load(DKACC + acc_off, mask=kmask, other=0.0) + sdk, mask=kmask)
        tl.store(DVACC + acc_off, tl.load(DVACC + acc_off, mask=kmask, other=0.0) + sdv, mask=kmask)


@triton.jit
def _dq_combine_kernel(
    DQPART, BIDX, DQ,
    stride_qb, stride_qt, stride_qh,
    t0, cq, nt, n_groups, G, D,
    KSEL: tl.constexpr, NSUB: tl.constexpr, GP: tl.constexpr, TQ: tl.constexpr, DP: tl.constexpr,
):
    """dQ of TQ query positions x one group's heads: the sum of each query's per-(slot,
    sub-tile) partials, in slot order."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    bi = bg // n_groups
    gi = bg % n_groups
    r = tl.arange(0, TQ * GP)
    h = r % GP
    tloc = tile * TQ + r // GP
    rmask = (h < G) & (tloc < nt)
    offs_d = tl.arange(0, DP)
    mask = rmask[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([TQ * GP, DP], tl.float32)
    pair0 = (bg.to(tl.int64) * cq + tloc) * KSEL
    for s in range(KSEL):
        blk = tl.load(BIDX + pair0 + s, mask=rmask, other=-1)
        use = (blk >= 0)[:, None] & mask
        for n in range(NSUB):
            prow = ((pair0 + s) * NSUB + n) * G + h
            acc += tl.load(DQPART + prow[:, None] * D + offs_d[None, :], mask=use, other=0.0).to(tl.float32)
    t = (t0 + tloc).to(tl.int64)
    rows = bi.to(tl.int64) * stride_qb + t * stride_qt + (gi * G + h).to(tl.int64) * stride_qh
    tl.store(DQ + rows[:, None] + offs_d[None, :], acc.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- planning (reverse index)
@dataclass
class _Chunk:
    """Queries [t0, t1) of the plan: their slice of the work items. Pair ids are flat indices
    into ``bidx`` [b, g, cq, K] (cq >= t1 - t0: the last chunk is padded with -1 rows)."""

    t0: int
    t1: int
    cq: int
    bidx: Tensor
    it_bg: Tensor  # work items (views into the plan's arrays): (b * g) index, block,
    it_blk: Tensor
    it_start: Tensor  # [start, end) range of Plan.perm
    it_end: Tensor
    it_pslot: Tensor  # partial dK/dV slot in this chunk, -1 if the item is its block's only one
    sg_bg: Tensor  # split blocks: their items' partial slot range [p0, p1)
    sg_blk: Tensor
    sg_p0: Tensor
    sg_p1: Tensor
    n_items: int
    n_split_items: int
    n_split_segs: int


@dataclass
class Plan:
    """The reverse index of a block selection (built once in the forward, reused by the
    backward): ``perm`` lists the chunk-local pair ids of every chunk sorted by (chunk, b, g,
    block), queries ascending inside a block; work items are runs of it."""

    chunks: List[_Chunk]
    perm: Tensor  # int32
    nb: int
    key: tuple  # what it was built for (shape, sk, block_size, device, data_ptr)


def _alloc(shape, dtype, device) -> Tensor:
    """torch.empty, NaN-filled when POISON_OUTPUTS (floating dtypes)."""
    x = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and x.is_floating_point():
        x.fill_(float("nan"))
    return x


_next_pow2 = _common.next_pow2


def _block_n(block_size: int, cap: int) -> int:
    bn = block_size & (-block_size)  # largest power of 2 dividing block_size
    return min(bn, cap)


#: Shared memory the KV-outer kernels may plan for (H100/H200 allow 227 KB per block).
SMEM_BUDGET = 200 * 1024
#: The fused KL's extra shared memory is mostly its [bn, di] index-key tile plus as much
#: scratch; sm_90a AOT (bf16, d = di = 128, 64 rows x 128 keys): 168 KB at kl_bwd_stages=1,
#: 225 KB at 2 (vs 161 KB without the KL). Larger index dims shrink the key tile.
KL_IK_TILE_BYTES = 32 * 1024


def kv_tiles(kind: str, dtype: torch.dtype, d: int, G: int, block_size: int, cfg: KernelConfig,
             kl_di: int = 0) -> Tuple[int, int]:
    """(QP positions per row tile, BN keys per program) of the KV-outer forward (``kind='fwd'``)
    or backward (``'bwd'``): the configured sizes, shrunk (rows first, then keys) until the
    estimated shared memory fits :data:`SMEM_BUDGET` (fp32 inputs, head dims above 128).
    The estimate (K/V tiles + pipelined q [+ dout] tiles + a conversion tile) matches the
    sm_90a compile report within a few KB at d=128."""
    GP, DP = _next_pow2(G), _next_pow2(d)
    elt = torch.empty((), dtype=dtype).element_size()
    rows, bn, stages = (cfg.fwd_rows, cfg.fwd_block_n, cfg.fwd_stages) if kind == "fwd" else (
        cfg.bwd_rows, cfg.bwd_block_n, cfg.bwd_stages)
    bn = _block_n(block_size, bn if elt < 4 else min(bn, 64))  # fp32 (IEEE FMA dots): lighter tiles
    qp = max(1, rows // GP)
    if qp * GP < 16:
        qp = 16 // GP
    per_row = (stages + 1) if kind == "fwd" else (2 * stages + 2)

    def smem(qp_, bn_):  # + the backward's fp32 dK/dV epilogue conversion (partly aliased)
        return (2 * bn_ * DP + per_row * qp_ * GP * DP) * elt + (bn_ * DP * 2 if kind == "bwd" else 0)

    while smem(qp, bn) > SMEM_BUDGET:
        if qp > 1 and qp * GP > 16:
            qp //= 2
        elif bn > 16:
            bn //= 2
        else:
            break
    if kl_di:  # fused KL (backward): keep its index-key tile [bn, di] at <= 32 KB, the size AOT-checked
        while bn > 16 and bn * _next_pow2(max(16, kl_di)) * elt > KL_IK_TILE_BYTES:
            bn //= 2
    return qp, bn


# ----------------------------------------------------------------------------- memory sizing
#: Bounds of the auto per-chunk partial budget (see :func:`partial_budget`). The floor keeps
#: chunks large enough that each work item still reuses its K/V block for several queries (at
#: 1M tokens, 512 MiB = ~2K query positions per chunk of the KV-outer path); the cap is the old
#: free-memory rule's cap, so at 128K (33 GiB of KV-outer partials) the chunks are the ones an
#: idle H100 got before (5 chunks, few launches: nothing gets slower).
PARTIAL_MIN_BYTES = 512 << 20
PARTIAL_MAX_BYTES = 8 << 30
_GIB = 1 << 30


def partial_budget(cfg: KernelConfig, resident_bytes: int = 0) -> int:
    """Bytes the partial buffers of one chunk may take: ``cfg.partial_bytes`` when set, else
    what the memory envelope (``cfg.mem_envelope_gib``, default 74 GiB: one 80 GB card with
    5 GiB of margin) leaves after ``resident_bytes`` (the tensors this call's forward and
    backward hold anyway, :func:`main_resident_bytes`), between :data:`PARTIAL_MIN_BYTES` and
    :data:`PARTIAL_MAX_BYTES`.

    A function of the shapes only, never of the memory free at call time: the same call gets
    the same chunks on any card and at any point of a step (before, a budget taken from free
    memory in the forward sized the backward's buffers: peaks that changed with what happened
    to be free, and the 1M fwd+bwd OOM of kernel_study.md section 3)."""
    if cfg.partial_bytes > 0:
        return cfg.partial_bytes
    room = int(cfg.mem_envelope_gib * _GIB) - int(resident_bytes)
    return int(min(PARTIAL_MAX_BYTES, max(PARTIAL_MIN_BYTES, room)))


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def main_resident_bytes(q_shape, k_shape, K: int, dtype: torch.dtype, bwd: bool = True,
                        fp32_dkdv: bool = True) -> int:
    """Bytes a KV-outer main-branch call holds besides its partial buffers while its chunks
    run, from shapes: forward: q, out, k, v, lse [b, hq, sq] fp32, block_idx and the plan's two
    int32 copies (reverse-index order, chunk-major selection) [b, g, sq, K]; with ``bwd`` also
    dout, dq, delta (fp32 like lse) and dK/dV: the fp32 accumulators when the queries are
    chunked (``fp32_dkdv``; cast to the output dtype one at a time after the chunks, with the
    plan and delta freed first), else dk, dv. At 1M tokens, paper layout (64 q / 4 KV heads,
    d 128, K 16, bf16): 35.0 GiB forward, 71.25 GiB forward + backward (docs/kernels_main.md,
    "Memory at 1M")."""
    b, sq, hq, _ = q_shape
    qb, kb = _nbytes(q_shape, dtype), _nbytes(k_shape, dtype)
    stats = b * hq * sq * 4
    sel = 3 * b * k_shape[2] * sq * K * 4
    total = 2 * qb + 2 * kb + stats + sel
    if bwd:
        total += 2 * qb + stats + (2 * _nbytes(k_shape, torch.float32) if fp32_dkdv else 2 * kb)
    return total


def _plan_fits(plan: Plan, bytes_per_pos: int, device: torch.device, cfg: KernelConfig,
               resident_bytes: int = 0) -> bool:
    """Whether the plan's chunks keep ``bytes_per_pos`` partial buffers under the budget
    (always true when it is already one position per chunk). ``device``: unused (the budget
    does not depend on the device's free memory); kept for callers."""
    if not plan.chunks or bytes_per_pos <= 0:
        return True
    cq = plan.chunks[0].cq
    return cq <= 1 or cq * bytes_per_pos <= partial_budget(cfg, resident_bytes)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewer, larger work items


def build_plan(block_idx: Tensor, sk: int, block_size: int, bytes_per_pos: int,
               config: Optional[KernelConfig] = None, resident_bytes: int = 0,
               csr: Optional[SelectionCSR] = None) -> Plan:
    """Work items over the reverse index of ``block_idx`` [b, g, sq, K]: for each (b, g, block)
    the (query, slot) pairs that chose it, split into work items of at most ``item_pairs`` pairs;
    the queries cut into chunks whose partial buffers (``bytes_per_pos`` per query position, see
    :func:`partial_bytes_per_pos`) fit :func:`partial_budget` (``resident_bytes``: what the call
    holds besides them) and are at most ``chunk_queries`` long.

    The reverse index is the selection's CSR (``ops/csr.py``): ``csr`` when the op built it for
    this selection (shared with the index kernels), else built here (one stable sort). One
    chunk: ``perm`` is the CSR's order itself; several: each segment's pairs are already
    ascending in the query, so chunk c's pairs are a contiguous run of the segment (counted by
    one bincount) and ``perm`` holds their chunk-local ids. One host sync."""
    cfg = config or default_config()
    b, g, sq, K = block_idx.shape
    dev = block_idx.device
    nb = math.ceil(sk / block_size)
    nseg = b * g * nb
    cq = max(1, min(sq, partial_budget(cfg, resident_bytes) // max(1, bytes_per_pos)))
    if cfg.chunk_queries > 0:
        cq = min(cq, cfg.chunk_queries)
    nch = -(-sq // cq) if sq else 0
    if nch <= 1:
        cq = sq
        bcat = block_idx.contiguous().view(1, b, g, sq, K)
    else:  # chunk-major copy, last chunk padded with unused (-1) rows
        pad = nch * cq - sq
        bp = torch.nn.functional.pad(block_idx, (0, 0, 0, pad), value=-1) if pad else block_idx
        bcat = bp.reshape(b, g, nch, cq, K).permute(2, 0, 1, 3, 4).contiguous()
    chunk_pairs = b * g * cq * K
    if nch * (nseg + 1) >= 2**31 or max(nch * chunk_pairs, b * g * sq * K) >= 2**31:
        raise ValueError(f"selection too large for the int32 reverse index ({nch} chunks x {chunk_pairs} pairs)")
    csr = csr_for(block_idx, nb, csr)
    if nch <= 1:  # chunk-local pair ids are the global ones (no queries: no chunk, no segment)
        perm = csr.order
        counts, seg_off = csr.counts[:nch * nseg], csr.seg_start[:nch * nseg]
    else:
        t_chunk = (torch.arange(sq, device=dev, dtype=torch.int32) // cq).view(1, 1, sq, 1)
        bg = (torch.arange(b * g, device=dev, dtype=torch.int32) * nb).view(b, g, 1, 1)
        key = torch.where(block_idx >= 0, t_chunk * nseg + bg + block_idx, nch * nseg).view(-1)
        counts_cs = torch.bincount(key, minlength=nch * nseg + 1)[:nch * nseg].view(nch, nseg)
        del key
        seg_off = (csr.seg_start[None, :] + torch.cumsum(counts_cs, 0) - counts_cs).reshape(-1)
        counts = counts_cs.reshape(-1)
        e = csr.order  # global pair ids -> chunk-local ((bg * cq) + t - t0) * K + slot
        t = (e // K) % sq
        perm = (((e // (sq * K)) * cq + t % cq) * K + e % K).to(torch.int32)
        del t
    if cfg.item_pairs > 0:
        per_item = cfg.item_pairs
    else:  # about items_per_sm items per SM and chunk, never tiny
        per_item = max(64, -(-chunk_pairs // (cfg.items_per_sm * _num_sms(dev))))
    n_it = (counts + per_item - 1) // per_item
    split_seg = n_it > 1
    per_chunk = torch.stack([n_it.view(nch, nseg).sum(1), split_seg.view(nch, nseg).sum(1),
                             (n_it * split_seg).view(nch, nseg).sum(1)]).tolist() if nch else [[], [], []]
    items_c, splitsegs_c, splititems_c = per_chunk
    n_items = int(sum(items_c))
    first_item = torch.cumsum(n_it, 0) - n_it
    item_sid = torch.repeat_interleave(torch.arange(nch * nseg, device=dev), n_it, output_size=n_items)
    sub = torch.arange(n_items, device=dev) - first_item[item_sid]
    start = seg_off[item_sid] + sub * per_item
    end = torch.minimum(start + per_item, seg_off[item_sid] + counts[item_sid])
    item_chunk = item_sid // nseg
    split_item = split_seg[item_sid]
    split_base = torch.tensor([0] + list(itertools.accumulate(splititems_c))[:-1], device=dev, dtype=torch.long)
    pslot = torch.where(split_item, torch.cumsum(split_item.long(), 0) - 1 - split_base[item_chunk],
                        torch.full_like(start, -1))
    sg = torch.nonzero(split_seg).view(-1)
    sg_p0 = pslot[first_item[sg]]
    sg_p1 = sg_p0 + n_it[sg]
    it_bg, it_blk = (item_sid % nseg) // nb, item_sid % nb
    if cfg.lpt_order and n_items > 1:  # largest items first inside each chunk
        order = torch.argsort(item_chunk * (per_item + 1) + (per_item - (end - start)), stable=True)
        it_bg, it_blk, start, end, pslot = (x[order] for x in (it_bg, it_blk, start, end, pslot))
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    it_bg, it_blk, start, end, pslot = (i32(x) for x in (it_bg, it_blk, start, end, pslot))
    sg_bg, sg_blk, sg_p0, sg_p1 = i32((sg % nseg) // nb), i32(sg % nb), i32(sg_p0), i32(sg_p1)
    chunks = []
    i0 = s0 = 0
    for c in range(nch):
        i1, s1 = i0 + int(items_c[c]), s0 + int(splitsegs_c[c])
        chunks.append(_Chunk(
            c * cq, min(sq, (c + 1) * cq), cq, bcat[c], it_bg[i0:i1], it_blk[i0:i1], start[i0:i1], end[i0:i1],
            pslot[i0:i1], sg_bg[s0:s1], sg_blk[s0:s1], sg_p0[s0:s1], sg_p1[s0:s1],
            int(items_c[c]), int(splititems_c[c]), int(splitsegs_c[c]),
        ))
        i0, s0 = i1, s1
    return Plan(chunks, perm, nb, _plan_key(block_idx, sk, block_size))


def _plan_key(block_idx: Tensor, sk: int, block_size: int) -> tuple:
    return (tuple(block_idx.shape), sk, block_size, str(block_idx.device), block_idx.data_ptr())


# ----------------------------------------------------------------------------- fused indexer KL
@dataclass
class FusedKL:
    """Inputs of the indexer KL computed inside the main backward (``sparse_attention_bwd(...,
    kl=FusedKL(...))``): the student is softmax(iq . ik * index_scale) over each row's selected
    causal tokens, normalised by ``index_lse``; the teacher is the group's head-mean of the main
    softmax the backward recomputes anyway. Same definitions as ``reference.sparse_kl_terms``."""

    iq: Tensor  # [b, sq, g, di], q's dtype
    ik: Tensor  # [b, sk, di], q's dtype
    index_lse: Tensor  # [b, g, sq] fp32 (natural log), from index_select / selected_lse
    index_scale: float  # cfg.index_softmax_scale
    normalizer: Optional[float] = None  # the mean's denominator; default b * g * sq rows


@dataclass
class FusedKLResult:
    """kl: mean KL (fp32 0-dim); d_iq [b, sq, g, di] / d_ik [b, sk, di]: fp32 gradients of that
    mean (times nothing); stats: index_entropy, main_entropy means (reference definitions)."""

    kl: Tensor
    d_iq: Tensor
    d_ik: Tensor
    stats: dict


def _check_fused_kl(kl: FusedKL, q: Tensor, sk: int, g: int) -> Tuple[Tensor, Tensor, Tensor, int, float]:
    b, sq = q.shape[:2]
    iq, ik, ilse = kl.iq, kl.ik, kl.index_lse
    if iq.dim() != 4 or tuple(iq.shape[:3]) != (b, sq, g):
        raise ValueError(f"FusedKL.iq must be [b={b}, sq={sq}, g={g}, di]; got {tuple(iq.shape)}")
    di = iq.shape[3]
    if ik.dim() != 3 or tuple(ik.shape) != (b, sk, di):
        raise ValueError(f"FusedKL.ik must be [b={b}, sk={sk}, di={di}]; got {tuple(ik.shape)}")
    if iq.dtype != q.dtype or ik.dtype != q.dtype:
        raise TypeError(f"FusedKL.iq/ik must have q's dtype {q.dtype}; got {iq.dtype}, {ik.dtype}")
    if di > 256:
        raise ValueError(f"FusedKL index dim {di} > 256 is not supported")
    if tuple(ilse.shape) != (b, g, sq) or ilse.dtype != torch.float32:
        raise ValueError(f"FusedKL.index_lse must be fp32 [b={b}, g={g}, sq={sq}]; got {ilse.dtype} {tuple(ilse.shape)}")
    if iq.device != q.device or ik.device != q.device or ilse.device != q.device:
        raise ValueError("FusedKL tensors must be on q's device")
    norm = float(kl.normalizer if kl.normalizer is not None else max(1, b * g * sq))
    if norm <= 0:
        raise ValueError(f"FusedKL.normalizer must be > 0, got {norm}")
    iq = iq.detach() if iq.stride(-1) == 1 else iq.detach().contiguous()
    ik = ik.detach() if ik.stride(-1) == 1 else ik.detach().contiguous()
    ilse = ilse.detach() if ilse.stride(-1) == 1 else ilse.detach().contiguous()
    return iq, ik, ilse, di, norm


def _kl_group(QP: int) -> int:
    """Row tiles per student step of the fused KL: >= 16 query pairs (the smallest MMA tile)."""
    return max(1, 16 // QP)


# ----------------------------------------------------------------------------- host wrappers
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int) -> Tuple[int, int, int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [b, s, heads, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [b={b}, sk, g, d={d}]")
    if hq % g:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({g})")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d % 16 or d > 256:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels: a multiple of 16 up to 256")
    if block_size % 16 or block_size <= 0:
        raise ValueError(f"block_size {block_size} is not supported: a positive multiple of 16")
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (b, g, sq):
        raise ValueError(f"block_idx must be [b={b}, g={g}, sq={sq}, K]; got {tuple(block_idx.shape)}")
    if block_idx.dtype != torch.int32:
        raise TypeError(f"block_idx must be int32, got {block_idx.dtype}")
    if q.device != k.device or k.device != v.device or block_idx.device != q.device:
        raise ValueError("q, k, v and block_idx must be on one device")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim (got strides {x.stride()})")
    K = block_idx.shape[3]
    nb = math.ceil(sk / block_size)
    if block_idx.numel():
        if DEBUG_CHECKS or block_idx.device.type != "cuda":
            lo, hi = torch.stack([block_idx.min(), block_idx.max()]).tolist()
            if lo < -1 or hi >= nb:
                raise ValueError(f"block_idx entries must lie in [-1, {nb - 1}] (nb = ceil({sk} / {block_size})); "
                                 f"got [{lo}, {hi}]")
        else:  # no host sync per call: a device-side assert (MSA_DEBUG_CHECKS=1 for the host check)
            torch._assert_async(((block_idx >= -1) & (block_idx < nb)).all(),
                                f"block_idx entries must lie in [-1, {nb - 1}] (nb = ceil({sk} / {block_size}))")
    return b, sq, hq, d, sk, g, K


_positions = _common.kernel_positions  # int32 [sq], no sync
#: The checked per-query document lower bound as kernel arguments (shared with the index kernels).
_docs = _common.doc_args


def _combine_tq(GP: int, DP: int) -> int:
    """Query positions per combine program: about 8K partial elements per step."""
    return max(1, min(64, 8192 // (GP * DP)))


def _dot_prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


def _upcast(x: Tensor) -> bool:
    # The interpreter (CPU tensors) cannot compute in bf16; compiled kernels never upcast.
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def partial_bytes_per_pos(q: Tensor, num_kv_heads: int, K: int, block_size: int, fwd: bool = True, bwd: bool = False,
                          deterministic: bool = True, dq_partial_dtype: torch.dtype = torch.float32,
                          config: Optional[KernelConfig] = None, kl_di: int = 0) -> int:
    """Bytes of partial buffers per query position: forward (out partial + LSE per (slot,
    sub-tile, head)), backward (dQ partials, or the fp32 dQ accumulator with atomics); ``kl_di``:
    the backward runs the fused KL with that index dim (its key tile may be narrower)."""
    cfg = config or default_config()
    b, _, hq, d = q.shape
    need = 0
    if fwd:
        bn = kv_tiles("fwd", q.dtype, d, hq // num_kv_heads, block_size, cfg)[1]
        need = b * hq * K * (block_size // bn) * (d * q.element_size() + 4)
    if bwd:
        bn = kv_tiles("bwd", q.dtype, d, hq // num_kv_heads, block_size, cfg, kl_di=kl_di)[1]
        rows = b * hq * K * (block_size // bn)
        dq_bytes = rows * d * torch.empty((), dtype=dq_partial_dtype).element_size() if deterministic else b * hq * d * 4
        need = max(need, dq_bytes)
    return need


def sparse_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[KernelConfig] = None, plan: Optional[Plan] = None, return_plan: bool = False,
    doc_start: Optional[Tensor] = None, csr: Optional[SelectionCSR] = None,
):
    """Sparse main-branch forward. Returns (out [b, sq, hq, d] in q's dtype, lse [b, hq, sq]
    fp32), plus the reverse-index plan when ``return_plan`` (reused by the backward).

    ``doc_start``: optional int [b, sq] / [sq] packed documents (``reference.sparse_attention``):
    keys before each query's document start are invisible (``None``: the plain kernels).
    Rows with no visible selected key get out 0 and lse -inf (the reference gives NaN).
    ``csr``: the selection's reverse index (ops/csr.py) when no ``plan`` is given."""
    cfg = config or default_config()
    _kv_outer_only(cfg)
    b, sq, hq, d, sk, g, K = _check_inputs(q, k, v, block_idx, block_size)
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = _positions(q_pos, sq, sk, q.device)
    docs = _docs(doc_start, b, sq, pos)
    out = _alloc((b, sq, hq, d), q.dtype, q.device)
    lse = _alloc((b, hq, sq), torch.float32, q.device)
    DP = _next_pow2(d)
    QP, bn = kv_tiles("fwd", q.dtype, d, G, block_size, cfg)
    nsub = block_size // bn
    prec, up = _dot_prec(q.dtype), _upcast(q)
    if sq == 0:
        return (out, lse, plan) if return_plan else (out, lse)
    block_idx = block_idx.contiguous()
    if plan is None or plan.key != _plan_key(block_idx, sk, block_size):
        plan = build_plan(block_idx, sk, block_size, partial_bytes_per_pos(q, g, K, block_size, config=cfg), cfg,
                          resident_bytes=main_resident_bytes(q.shape, k.shape, K, q.dtype, bwd=False), csr=csr)
    GP = _next_pow2(G)
    TQ = _combine_tq(GP, DP)
    part_dtype = q.dtype
    for ch in plan.chunks:
        cq, nt = ch.cq, ch.t1 - ch.t0
        npairs = ch.bidx.numel()
        opart = _alloc((npairs * nsub * G, d), part_dtype, q.device)
        lpart = _alloc((npairs * nsub * G,), torch.float32, q.device)
        if ch.n_items:
            _fwd_kv_kernel[(ch.n_items, nsub)](
                q, k, v, pos, plan.perm, ch.it_bg, ch.it_blk, ch.it_start, ch.it_end, opart, lpart, docs.ptr,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), docs.stride_b,
                ch.t0, cq, sk, g, G, d, scale * LOG2E,
                KSEL=K, NSUB=nsub, BLOCK=block_size, BN=bn, GP=GP, QP=QP, DP=DP,
                DOT_PREC=prec, UPCAST=up, HAS_DOC=docs.on, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
            )
        _fwd_combine_kernel[(triton.cdiv(nt, TQ), b * g)](
            opart, lpart, ch.bidx, out, lse,
            out.stride(0), out.stride(1), out.stride(2),
            ch.t0, cq, nt, sq, g, G, d,
            KSEL=K, NSUB=nsub, GP=GP, TQ=TQ, DP=DP, num_warps=8,
        )
        del opart, lpart
    return (out, lse, plan) if return_plan else (out, lse)


def _delta(out: Tensor, do: Tensor) -> Tensor:
    b, sq, hq, d = out.shape
    delta = _alloc((b, hq, sq), torch.float32, out.device)
    if sq:
        HP, DP = _next_pow2(hq), _next_pow2(d)
        TD = max(1, 8192 // (HP * DP))
        _delta_kernel[(triton.cdiv(sq, TD), b)](
            out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
            sq, hq, d, HP=HP, TD=TD, DP=DP, num_warps=4,
        )
    return delta


def sparse_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, deterministic: bool = True, dq_partial_dtype: Optional[torch.dtype] = None,
    config: Optional[KernelConfig] = None, plan: Optional[Plan] = None, kl: Optional[FusedKL] = None,
    compute_dq: bool = True, return_delta: bool = False, doc_start: Optional[Tensor] = None,
    csr: Optional[SelectionCSR] = None, extra_resident_bytes: int = 0,
):
    """Sparse main-branch backward: (dq, dk, dv) in the inputs' dtypes; dK/dV of a KV head sum
    over its group's query heads.

    ``compute_dq=False``: dK/dV only (the kernel without its dQ half, no dQ partials, no
    combine): dq is returned as None (the v2 split backward takes dQ from the union tile).
    ``return_delta``: also return delta = rowsum(out * dout) (fp32 [b, hq, sq]) as a 4th item.

    ``kl``: also the indexer KL over the same selection, fused into the same tiles (the teacher
    is the head-mean of the P the backward recomputes): returns ``(dq, dk, dv, FusedKLResult)``.
    The KL's d_iq / d_ik use fp32 atomics (not bitwise reproducible, as the separate KL kernel).

    ``deterministic=True`` (default): dQ partials per (query, slot) in ``dq_partial_dtype``
    (default fp32, or q's dtype with ``KernelConfig.dq_partial_lowp``: half the memory traffic
    at one extra rounding) summed in slot order; bitwise reproducible. ``False``: fp32 atomics into a dQ accumulator (faster, order
    of additions varies run to run).

    ``doc_start``: packed documents, as :func:`sparse_attention_fwd` (also masks the fused KL).
    ``csr``: the selection's reverse index (ops/csr.py), used when the plan is (re)built here.
    ``extra_resident_bytes``: what the caller holds besides this call's tensors (the op: the
    index branch's iq, ik and their gradients), for :func:`partial_budget`. The plan is
    released (as far as the caller lets go of it) and dK/dV are cast one at a time before
    returning: at 1M the fp32 accumulators and their casts never coexist with the partials."""
    cfg = config or default_config()
    b, sq, hq, d, sk, g, K = _check_inputs(q, k, v, block_idx, block_size)
    if do.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"do {tuple(do.shape)} and out {tuple(out.shape)} must match q {tuple(q.shape)}")
    if lse.shape != (b, hq, sq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [b={b}, hq={hq}, sq={sq}], got {lse.dtype} {tuple(lse.shape)}")
    G = hq // g
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pos = _positions(q_pos, sq, sk, q.device)
    docs = _docs(doc_start, b, sq, pos)
    if dq_partial_dtype is None:
        dq_partial_dtype = q.dtype if cfg.dq_partial_lowp else torch.float32
    if dq_partial_dtype not in _DTYPES:
        raise TypeError(f"dq_partial_dtype must be one of {_DTYPES}, got {dq_partial_dtype}")
    do = do if do.stride(-1) == 1 else do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    lse = lse.contiguous()
    block_idx = block_idx.contiguous()
    DP = _next_pow2(d)
    if kl is not None:
        if not compute_dq:
            raise ValueError("sparse_attention_bwd: kl= needs compute_dq=True (the fused KL lives in the dQ kernel)")
        kiq, kik, kilse, di, kl_norm = _check_fused_kl(kl, q, sk, g)
    need = partial_bytes_per_pos(q, g, K, block_size, fwd=False, bwd=compute_dq, deterministic=deterministic,
                                 dq_partial_dtype=dq_partial_dtype, config=cfg, kl_di=di if kl is not None else 0)
    resident = main_resident_bytes(q.shape, k.shape, K, q.dtype, bwd=True, fp32_dkdv=compute_dq) + extra_resident_bytes
    if kl is not None:  # the fused KL's fp32 d_iq / d_ik
        resident += (b * sq * g + b * sk) * di * 4
    if (plan is None or plan.key != _plan_key(block_idx, sk, block_size)
            or not _plan_fits(plan, need, q.device, cfg, resident)):
        # a plan built for another need (a forward-only plan, another dQ partial dtype)
        plan = build_plan(block_idx, sk, block_size, need, cfg, resident_bytes=resident, csr=csr)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    if kl is not None:
        DIP = max(16, _next_pow2(di))
        d_iq32 = torch.zeros((b, sq, g, di), dtype=torch.float32, device=q.device)
        d_ik32 = torch.zeros((b, sk, di), dtype=torch.float32, device=q.device)
        kl_args = (kiq, kik, kilse, d_iq32, d_ik32)
        kl_strides = (kiq.stride(0), kiq.stride(1), kiq.stride(2), kik.stride(0), kik.stride(1),
                      kilse.stride(0), kilse.stride(1))
        kl_scalars = (float(kl.index_scale), float(kl.index_scale) / kl_norm)
        kl_parts = []
    else:
        di, DIP = 16, 16
        kl_args = (dummy,) * 5
        kl_strides = (0,) * 7
        kl_scalars = (1.0, 1.0)
    QP, bn = kv_tiles("bwd", q.dtype, d, G, block_size, cfg, kl_di=di if kl is not None else 0)
    stages = cfg.kl_bwd_stages if kl is not None else cfg.bwd_stages
    nsub = block_size // bn
    GP = _next_pow2(G)
    prec, up = _dot_prec(q.dtype), _upcast(q)
    dq = _alloc((b, sq, hq, d), q.dtype, q.device) if compute_dq else None
    # One chunk: every (block, sub-tile) has one writer (its item, or the reduce of its split
    # items), so dK/dV are stored in the output dtype from registers (zeros where no query
    # selected the block): no fp32 accumulators (4 GiB + 2 GiB of casts at 1M, paper layout).
    direct = len(plan.chunks) <= 1
    acc_dtype = (k.dtype, v.dtype) if direct else (torch.float32, torch.float32)
    dk_acc = torch.zeros((b, sk, g, d), dtype=acc_dtype[0], device=q.device)
    dv_acc = torch.zeros((b, sk, g, d), dtype=acc_dtype[1], device=q.device)
    if sq == 0:
        if kl is not None:
            zero = torch.zeros((), dtype=torch.float32, device=q.device)
            res = FusedKLResult(zero, d_iq32, d_ik32, {"index_entropy": zero.clone(), "main_entropy": zero.clone()})
            return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), res
        if return_delta:
            return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), torch.zeros((b, hq, 0), dtype=torch.float32, device=q.device)
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    delta = _delta(out, do)
    TQ = _combine_tq(GP, DP)
    for ch in plan.chunks:
        cq, nt = ch.cq, ch.t1 - ch.t0
        npairs = ch.bidx.numel()
        if not compute_dq:
            dqbuf = dummy
        elif deterministic:
            dqbuf = _alloc((npairs * nsub * G, d), dq_partial_dtype, q.device)
        else:
            dqbuf = torch.zeros((b, cq, hq, d), dtype=torch.float32, device=q.device)
        if ch.n_split_items:
            dkpart = _alloc((ch.n_split_items, block_size, d), torch.float32, q.device)
            dvpart = _alloc((ch.n_split_items, block_size, d), torch.float32, q.device)
        else:
            dkpart = dvpart = dummy
        klpart = dummy
        if kl is not None and ch.n_items:  # (KL, sum Q ln Q, sum P log2 P) per (item, sub-tile)
            klpart = _alloc((ch.n_items * nsub, 3), torch.float32, q.device)
            kl_parts.append(klpart)
        for part in ((3,) if not compute_dq else (1, 2) if cfg.bwd_split else (0,)):
            if not ch.n_items:
                break
            _bwd_kv_kernel[(ch.n_items, nsub)](
                q, k, v, do, lse, delta, pos, plan.perm, ch.it_bg, ch.it_blk, ch.it_start, ch.it_end, ch.it_pslot,
                dqbuf, dk_acc, dv_acc, dkpart, dvpart, *kl_args, klpart, docs.ptr,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                do.stride(0), do.stride(1), do.stride(2), *kl_strides, docs.stride_b,
                ch.t0, cq, sq, sk, g, G, d, scale, scale * LOG2E, *kl_scalars,
                KSEL=K, NSUB=nsub, BLOCK=block_size, BN=bn, GP=GP, QP=QP, DP=DP,
                DQ_ATOMIC=not deterministic, DOT_PREC=prec, UPCAST=up, PART=part, DIRECT=direct,
                KL=kl is not None, KLJ=_kl_group(QP), DI=di, DIP=DIP, HAS_DOC=docs.on,
                num_warps=cfg.bwd_warps, num_stages=stages,
            )
        if ch.n_split_segs:
            rb = min(32, _next_pow2(block_size))  # rows per reduce program: no register spills
            _bwd_reduce_kernel[(ch.n_split_segs, triton.cdiv(block_size, rb))](
                dkpart, dvpart, dk_acc, dv_acc, ch.sg_bg, ch.sg_blk, ch.sg_p0, ch.sg_p1,
                sk, g, d, BLOCK=block_size, BN=rb, DP=DP, DIRECT=direct, num_warps=8,
            )
        if not compute_dq:
            pass
        elif deterministic:
            _dq_combine_kernel[(triton.cdiv(nt, TQ), b * g)](
                dqbuf, ch.bidx, dq, dq.stride(0), dq.stride(1), dq.stride(2),
                ch.t0, cq, nt, g, G, d, KSEL=K, NSUB=nsub, GP=GP, TQ=TQ, DP=DP, num_warps=8,
            )
        else:
            dq[:, ch.t0:ch.t1] = dqbuf[:, :nt].to(q.dtype)
        del dqbuf, dkpart, dvpart
    # release the plan (reverse index, chunk-major selection, work items: ~0.5 GiB at 1M) and
    # delta, then cast the fp32 accumulators one at a time (one fp32 + one output alive, not four)
    plan = ch = None
    if not return_delta:
        delta = None
    dk = dk_acc.to(k.dtype)
    del dk_acc
    dv = dv_acc.to(v.dtype)
    del dv_acc
    if kl is None:
        if return_delta:
            return dq, dk, dv, delta
        return dq, dk, dv
    sums = torch.cat(kl_parts).sum(0) if kl_parts else torch.zeros(3, dtype=torch.float32, device=q.device)
    stats = {"index_entropy": -sums[1] / kl_norm, "main_entropy": -LN2 * sums[2] / (kl_norm * G)}
    return dq, dk, dv, FusedKLResult(sums[0] / kl_norm, d_iq32, d_ik32, stats)


# ----------------------------------------------------------------------------- autograd
class SparseAttentionFn(torch.autograd.Function):
    """out, lse = sparse attention; differentiable w.r.t. q, k, v (lse is not differentiable).

    ``config.main_impl`` picks the kernels per call (``auto``: by the mean union size, see
    ``triton_union.resolve_main_impl``): ``union`` = union-tile forward + split backward
    (KV-outer dK/dV without dQ, union-tile dQ); ``kv`` = the KV-outer forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, q_pos, softmax_scale, config, deterministic, doc_start=None,
                csr=None, extra_resident_bytes=0):
        cfg = config or default_config()
        _kv_outer_only(cfg)
        ctx.extra = extra_resident_bytes
        b, sq, hq, d = q.shape
        block_idx = block_idx.contiguous()
        grad = any(ctx.needs_input_grad[:3])
        plan = None
        ctx.lists = None
        if sq:
            from . import triton_union as _tu

            _check_inputs(q, k, v, block_idx, block_size)
            impl, lists = _tu.resolve_main_impl(cfg, block_idx, hq // k.shape[2], q.dtype, d=d, fwd_only=not grad)
            if impl == "union":
                out, lse = _tu.union_attention_fwd(q, k, v, block_idx, block_size, q_pos, softmax_scale, config=cfg,
                                                   lists=lists, doc_start=doc_start)
                ctx.save_for_backward(q, k, v, out, lse, block_idx, q_pos if q_pos is not None else torch.empty(0))
                ctx.has_pos = q_pos is not None
                ctx.block_size, ctx.scale, ctx.cfg, ctx.plan, ctx.det = block_size, softmax_scale, cfg, None, deterministic
                ctx.lists = lists
                ctx.doc_start = doc_start
                ctx.csr = csr if grad else None  # the dK/dV pass's reverse index (a caller's CSR)
                ctx.mark_non_differentiable(lse)
                return out, lse
        if grad and sq:  # one reverse index for the forward and the backward
            _check_inputs(q, k, v, block_idx, block_size)
            need = partial_bytes_per_pos(q, k.shape[2], block_idx.shape[-1], block_size, fwd=True, bwd=True,
                                         deterministic=deterministic, config=cfg,
                                         dq_partial_dtype=q.dtype if cfg.dq_partial_lowp else torch.float32)
            # sized for the backward too (its dQ partials and fp32 dK/dV accumulators): the
            # backward reuses this plan as it is (same shapes, same budget)
            resident = main_resident_bytes(q.shape, k.shape, block_idx.shape[-1], q.dtype, bwd=True)
            plan = build_plan(block_idx, k.shape[1], block_size, need, cfg, resident_bytes=resident + extra_resident_bytes,
                              csr=csr)
        out, lse = sparse_attention_fwd(q, k, v, block_idx, block_size, q_pos, softmax_scale, config=cfg, plan=plan,
                                        doc_start=doc_start, csr=csr)
        ctx.doc_start = doc_start
        ctx.csr = csr if grad and plan is None else None  # the plan holds what the backward needs of it
        ctx.save_for_backward(q, k, v, out, lse, block_idx, q_pos if q_pos is not None else torch.empty(0))
        ctx.has_pos = q_pos is not None
        ctx.block_size, ctx.scale, ctx.cfg, ctx.plan, ctx.det = block_size, softmax_scale, cfg, plan, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, block_idx, q_pos = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if ctx.lists is not None:
            from . import triton_union as _tu

            # the dK/dV pass (no dQ partials: one chunk) over the caller's CSR, as it would build it
            plan = None if ctx.csr is None else build_plan(block_idx, k.shape[1], ctx.block_size, 0, ctx.cfg,
                                                           csr=ctx.csr)
            dq, dk, dv = _tu.union_attention_bwd(
                dout, q, k, v, out, lse, block_idx, ctx.block_size, q_pos if ctx.has_pos else None, ctx.scale,
                config=ctx.cfg, lists=ctx.lists, plan=plan, doc_start=ctx.doc_start)
            return dq, dk, dv, None, None, None, None, None, None, None, None, None
        # the plan is handed over (not kept in ctx) so the backward frees it before its dK/dV
        # casts (0.7 GiB at 1M); a second backward (retain_graph) builds it again
        dq, dk, dv = sparse_attention_bwd(
            dout, q, k, v, out, lse, block_idx, ctx.block_size, q_pos if ctx.has_pos else None, ctx.scale,
            deterministic=ctx.det, config=ctx.cfg, plan=_take(ctx, "plan"), doc_start=ctx.doc_start, csr=ctx.csr,
            extra_resident_bytes=ctx.extra,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _take(ctx, name: str):
    """``getattr(ctx, name)``, then set to None: the caller's argument is the only reference."""
    value = getattr(ctx, name)
    setattr(ctx, name, None)
    return value


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
    q_pos: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
    *, config: Optional[KernelConfig] = None, deterministic: bool = True, doc_start: Optional[Tensor] = None,
    csr: Optional[SelectionCSR] = None, extra_resident_bytes: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Autograd-aware sparse main branch: (out, lse), same contract as the reference
    (``doc_start``: packed documents, keys before each query's document start invisible).
    ``csr``: the selection's reverse index when the caller built it (the op shares the index
    branch's, ops/csr.py); otherwise built here, once for the forward and the backward.
    ``extra_resident_bytes``: what the caller holds through the backward besides q, k, v, out,
    dout and their gradients (the op: iq, ik and their gradients), for :func:`partial_budget`."""
    return SparseAttentionFn.apply(q, k, v, block_idx, block_size, q_pos, softmax_scale, config, deterministic,
                                   doc_start, csr, extra_resident_bytes)


__all__ = [
    "FusedKL", "FusedKLResult", "KernelConfig", "PARTIAL_MAX_BYTES", "PARTIAL_MIN_BYTES", "Plan", "SparseAttentionFn",
    "build_plan", "default_config", "main_resident_bytes", "partial_budget", "partial_bytes_per_pos", "sparse_attention",
    "sparse_attention_bwd", "sparse_attention_fwd",
]

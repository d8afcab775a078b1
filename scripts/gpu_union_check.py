#!/usr/bin/env python
"""GPU check + benchmark of the v2 main branch (union tile) against today's KV-outer path.

    OUT=/tmp/out python scripts/gpu_union_check.py            # check, bench, 1m: ~4-6 min on one H100
    python scripts/gpu_union_check.py --parts check,bench     # skip the 1M part
    python scripts/gpu_union_check.py --parts sweep           # tile-config sweep only (~2-3 min)
    python scripts/gpu_union_check.py --aot                   # no GPU: sm_90a compile report (regs/spills/smem)
    python scripts/gpu_union_check.py --cpu-smoke             # tiny sizes, Triton interpreter (tests the script)

Paper layout: 64 q / 4 KV heads, d = di = 128, block 128, top-16, bf16, batch 1. Needs only
torch (2.11) + triton (3.6) and this checkout (no megatron). Writes ``$OUT/union_check.md`` and
``$OUT/union_check.json`` (``--out`` overrides ``$OUT``; default ./gpu_union_out).

Parts:
  check  16K and 32K, two selections (``random``: index_select on random iq/ik, the locality-free
         worst case; ``pool20``: every 128-query window draws 20 earlier blocks, each query
         picks 15 of them + its own block): the union path (fwd, split bwd, dQ + fused KL, op)
         against the KV-outer path (+ separate KL kernel) on the same inputs, and both against
         the fp32 reference on a slice of rows given as q_pos (also checks arbitrary q_pos).
         Tolerances (relative Frobenius): union vs KV-outer out 1e-2, lse 1e-4, dq 2e-2, dk/dv
         1e-2, kl 1e-3, d_iq/d_ik 3e-2, entropies 1e-3; vs the fp32 reference out 1e-2, lse 1e-4,
         dq/dk/dv 2e-2. Bit-equal reruns (determinism) for the union dQ + KL.
  bench  128K: U8 (mean union of 8 positions) per selection (pool 15 = FlexAttention's
         pattern, pool 20, pool 32, random); ms (triton.testing.do_bench median) of: fwd
         (KV-outer incl. its reverse index; union incl. its union lists), bwd (KV-outer plan
         given; split union bwd incl. the dK/dV reverse index), main fwd+bwd through autograd
         (main_impl kv / union), op fwd+bwd (msa_attention_triton with the selection given:
         index LSE + main + KL; kv = separate KL kernel, union = KL inside the dQ pass) and
         the index selection itself (to add for a full op step); FlexAttention block-sparse
         on the pool-15 pattern (fwd, fwd+bwd; its output is also compared with the union
         forward's).
  sweep  union fwd / dQ / dQ+KL / dK/dV tile configs (block_n, warps, stages, union_rows=64 i.e. P = 4)
         on pool 20 (``--sweep-selections pool20,pool32``: also U8 ~32, like trained) at 128K.
  1m     1M tokens, pool-20 selection given: op fwd+bwd (union; then KV-outer) peak memory
         (torch.cuda.max_memory_allocated) and time of the second call.

Success: every row of the check table says ok, the JSON has "failed": [], and the bench table
holds numbers for every (selection, path). Exit status 1 when a check fails. ``--budget-s``
(default 330): parts and bench rows that would start after that many seconds are skipped and
listed under "skipped", so one call stays within the device limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16
DEV = "cuda"
CHECKS: list = []  # dicts: part, L, sel, metric, value, tol, ok
BENCH: list = []  # dicts
MEM: list = []
FAILED: list = []
SKIPPED: list = []
PROFILES: list = []
T_START = time.time()
BUDGET_S = 330.0


def over_budget(what: str) -> bool:
    if time.time() - T_START > BUDGET_S:
        SKIPPED.append(what)
        print(f"[skip] {what}: past the {BUDGET_S:.0f} s budget", flush=True)
        return True
    return False
TOL = {"out": 1e-2, "lse": 1e-4, "dq": 2e-2, "dk": 1e-2, "dv": 1e-2, "kl": 1e-3, "d_iq": 3e-2, "d_ik": 3e-2,
       "entropy": 1e-3, "ref_out": 1e-2, "ref_lse": 1e-4, "ref_grad": 2e-2}


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rel_finite(a, b) -> float:
    m = torch.isfinite(b) & torch.isfinite(a)
    return rel(a[m], b[m])


def record(part, L, sel, metric, value, tol, ok=None):
    ok = (value <= tol) if ok is None else ok
    ok = bool(ok) and not math.isnan(value)
    CHECKS.append(dict(part=part, L=L, sel=sel, metric=metric, value=value, tol=tol, ok=ok))
    if not ok:
        FAILED.append(f"{part} L={L} {sel} {metric}={value:.3g} (tol {tol:.3g})")


def guarded(name: str, fn) -> None:
    if over_budget(name):
        return
    t0 = time.time()
    try:
        fn()
    except Exception as exc:  # recorded; the other parts still run
        traceback.print_exc(limit=8)
        FAILED.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
    if DEV == "cuda":
        torch.cuda.empty_cache()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(shape, seed, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV, generator=gen(seed)) * scale).to(dtype)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, rep=150, warmup=30) -> float:
    if DEV != "cuda":
        t0 = time.time()
        fn()
        return (time.time() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


# ----------------------------------------------------------------------------- selections
def pool_selection(L: int, C: int, seed: int) -> torch.Tensor:
    """[1, g, L, K] int32: each 128-query window (one block) draws C distinct earlier blocks (the
    same for all groups), each query keeps K-1 of them at random + its own block. C = K-1 is
    FlexAttention's per-tile pattern (every query of a window selects the same blocks)."""
    nb = math.ceil(L / B)
    g = gen(seed)
    w = torch.arange(nb, device=DEV)
    sc = torch.rand(nb, nb, device=DEV, generator=g)
    sc.masked_fill_(w[None, :] >= w[:, None], -1.0)
    cc = min(C, nb)
    pval, pool = torch.topk(sc, cc, dim=-1)  # [nb windows, C]
    pool = torch.where(pval >= 0, pool, torch.full_like(pool, -1))
    out = torch.empty((1, HKV, L, K), dtype=torch.int32, device=DEV)
    chunk = max(1, (1 << 26) // (HKV * cc))
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        own = torch.arange(s0, s1, device=DEV) // B
        pl = pool[own]  # [n, C]
        r = torch.rand(HKV, s1 - s0, cc, device=DEV, generator=g)
        r = torch.where(pl[None] >= 0, r, torch.full_like(r, -1.0))
        kk = min(K - 1, cc)
        val, pick = torch.topk(r, kk, dim=-1)
        blk = torch.gather(pl[None].expand(HKV, -1, -1), -1, pick)
        blk = torch.where(val >= 0, blk, torch.full_like(blk, nb))
        blk = torch.cat([blk, own[None, :, None].expand(HKV, -1, 1),
                         torch.full((HKV, s1 - s0, K - 1 - kk), nb, device=DEV, dtype=blk.dtype)], -1)
        blk = torch.sort(blk, dim=-1).values
        out[0, :, s0:s1] = torch.where(blk == nb, -1, blk).to(torch.int32)
    return out


def index_inputs(L: int, seed: int, grad: bool = False):
    iq = randn((1, L, HKV, DI), seed).requires_grad_(grad)
    ik = randn((1, L, DI), seed + 1).requires_grad_(grad)
    return iq, ik


def msa_cfg():
    from msa_megatron.config import MSAConfig

    return MSAConfig(block_size=B, topk=K, index_dim=DI)


def random_selection(L: int, seed: int) -> torch.Tensor:
    """index_select on random iq/ik: the project's locality-free benchmark selection."""
    from msa_megatron.ops import triton_index as TI

    iq, ik = index_inputs(L, seed)
    return TI.index_select(iq, ik, msa_cfg())[0]


def make_selection(kind: str, L: int, seed: int) -> torch.Tensor:
    if kind == "random":
        return random_selection(L, seed)
    return pool_selection(L, int(kind[4:]), seed)


def u8(sel) -> dict:
    from msa_megatron.ops import triton_union as U

    return U.union_stats(sel, 8)


# ----------------------------------------------------------------------------- part: check
def check_pair(L: int, kind: str) -> None:
    from msa_megatron.ops import naive as R
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U
    from msa_megatron.ops.triton_op import msa_attention_triton

    cfg = msa_cfg()
    sel = make_selection(kind, L, 7)
    st = u8(sel)
    record("check", L, kind, "U8 (info)", st["mean"], float("inf"))
    la, lb = U.build_union_lists(sel, 8), U.build_union_lists_triton(sel, 8)
    same = all(torch.equal(getattr(la, n), getattr(lb, n)) for n in ("blk", "msk", "cnt", "off", "order"))
    record("check", L, kind, "union lists: Triton kernel == torch", 0.0 if same else 1.0, 0.0)
    del la, lb
    q, k, v, do = randn((1, L, HQ, D), 1), randn((1, L, HKV, D), 2), randn((1, L, HKV, D), 3), randn((1, L, HQ, D), 4)
    iq, ik = index_inputs(L, 5)
    kv, un = T.KernelConfig(main_impl="kv"), T.KernelConfig(main_impl="union")
    # kernels: fwd, split bwd, dQ + fused KL vs KV-outer (+ separate KL kernel)
    o1, l1 = T.sparse_attention_fwd(q, k, v, sel, B, config=kv)
    o2, l2 = U.union_attention_fwd(q, k, v, sel, B, config=un)
    record("check", L, kind, "fwd out", rel(o2, o1), TOL["out"])
    record("check", L, kind, "fwd lse", rel_finite(l2, l1), TOL["lse"])
    record("check", L, kind, "lse -inf rows equal", float((torch.isinf(l1) != torch.isinf(l2)).sum()), 0.0)
    g1 = T.sparse_attention_bwd(do, q, k, v, o1, l1, sel, B, config=kv)
    g2 = U.union_attention_bwd(do, q, k, v, o2, l2, sel, B, config=un)
    for name, a, b_ in zip(("dq", "dk", "dv"), g2, g1):
        record("check", L, kind, f"bwd {name}", rel(a, b_), TOL[name])
    ilse = TI.selected_lse(iq, ik, sel, cfg)
    kl1, diq1, dik1, st1 = TI.sparse_kl_backward(q, k, iq, ik, sel, l1, ilse, cfg, return_stats=True)
    fk = T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale)
    dq2, res = U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=un, kl=fk)
    dq3, res3 = U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=un, kl=fk)
    record("check", L, kind, "dq+KL bit-equal rerun", 0.0, 0.0, ok=torch.equal(dq2, dq3) and torch.equal(
        res.d_iq, res3.d_iq) and torch.equal(res.d_ik, res3.d_ik) and torch.equal(res.kl, res3.kl))
    record("check", L, kind, "dq (KL pass) vs dq", rel(dq2, g2[0]), 5e-3)  # another compiled kernel: bf16 roundings may differ
    record("check", L, kind, "kl", abs(res.kl.item() - kl1.item()) / max(1.0, abs(kl1.item())), TOL["kl"])
    record("check", L, kind, "d_iq", rel(res.d_iq, diq1), TOL["d_iq"])
    record("check", L, kind, "d_ik", rel(res.d_ik, dik1), TOL["d_ik"])
    for key in ("index_entropy", "main_entropy"):
        a, b_ = res.stats[key].item(), st1[key].item()
        record("check", L, kind, key, abs(a - b_) / max(1.0, abs(b_)), TOL["entropy"])
    del g1, g2, dq2, dq3, res, res3, diq1, dik1
    # op level: msa_attention_triton with the selection given, kv (separate KL) vs union (KL fused)
    outs = {}
    for name, kc in (("kv", kv), ("union", un)):
        qq, kk_, vv = (x.detach().requires_grad_() for x in (q, k, v))
        iqq, ikk = (x.detach().requires_grad_() for x in (iq, ik))
        out, aux = msa_attention_triton(qq, kk_, vv, iqq, ikk, cfg, block_idx=sel, kernel_config=kc)
        ((out.float() * do.float()).sum() + aux.kl).backward()
        outs[name] = (out.detach(), aux.kl.detach().clone(), {k_: float(v_) for k_, v_ in aux.stats.items()},
                      [x.grad for x in (qq, kk_, vv, iqq, ikk)])
    (oa, ka, sa, ga), (ob, kb, sb, gb) = outs["kv"], outs["union"]
    record("check", L, kind, "op out", rel(ob, oa), TOL["out"])
    record("check", L, kind, "op kl", abs(kb.item() - ka.item()) / max(1.0, abs(ka.item())), TOL["kl"])
    for name, a, b_ in zip(("dq", "dk", "dv", "d_iq", "d_ik"), gb, ga):
        record("check", L, kind, f"op {name}", rel(a, b_), TOL[name])
    for key in ("index_entropy", "main_entropy"):
        record("check", L, kind, f"op {key}", abs(sb[key] - sa[key]) / max(1.0, abs(sa[key])), TOL["entropy"])
    del outs, oa, ob, ga, gb
    # fp32 reference on a slice of rows passed as q_pos (context-parallel style positions)
    S = 48 if DEV == "cuda" else 8
    pos = torch.unique(torch.cat([torch.arange(4, device=DEV), torch.randint(0, L, (S,), device=DEV, generator=gen(9)),
                                  torch.arange(L - 4, L, device=DEV)]))
    qs, dos = q[:, pos].contiguous(), do[:, pos].contiguous()
    ss = sel[:, :, pos].contiguous()
    os_, ls_ = U.union_attention_fwd(qs, k, v, ss, B, q_pos=pos, config=un)
    dqs, dks, dvs = U.union_attention_bwd(dos, qs, k, v, os_, ls_, ss, B, q_pos=pos, config=un)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, k, v))
    ro, rl = R.sparse_attention(qf, kf, vf, ss, B, pos)
    rdq, rdk, rdv = torch.autograd.grad(ro, [qf, kf, vf], dos.float())
    record("check", L, kind, "q_pos slice vs fp32 ref: out", rel(os_, ro), TOL["ref_out"])
    record("check", L, kind, "q_pos slice vs fp32 ref: lse", rel(ls_, rl), TOL["ref_lse"])
    for name, a, b_ in zip(("dq", "dk", "dv"), (dqs, dks, dvs), (rdq, rdk, rdv)):
        record("check", L, kind, f"q_pos slice vs fp32 ref: {name}", rel(a, b_), TOL["ref_grad"])


def part_check(lengths) -> None:
    for L in lengths:
        for kind in ("random", "pool20"):
            guarded(f"check L={L} {kind}", lambda: check_pair(L, kind))


# ----------------------------------------------------------------------------- part: bench
def flex_pool15(L: int, sel, q, k, v, do, o_union):
    """FlexAttention on the pool-15 pattern: per 128-query tile, the diagonal block (causal) +
    the window's pool blocks (full); the selection is tile-constant, so Flex computes the same
    attention as the MSA kernels."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nb = math.ceil(L / B)
    s0 = sel[0, 0, ::B]  # [nb, K]: the tile's blocks (identical for all positions and groups)
    i = torch.arange(nb, device=DEV)
    fullm = (s0 >= 0) & (s0 != i[:, None])
    full_num = fullm.sum(-1).to(torch.int32).view(1, 1, nb)
    full_idx = torch.zeros(1, 1, nb, nb, dtype=torch.int32, device=DEV)
    srt = torch.sort(torch.where(fullm, s0, torch.full_like(s0, nb)), dim=-1).values
    full_idx[0, 0, :, :K] = torch.where(srt == nb, 0, srt).to(torch.int32)
    part_num = torch.ones(1, 1, nb, dtype=torch.int32, device=DEV)
    part_idx = torch.zeros(1, 1, nb, nb, dtype=torch.int32, device=DEV)
    part_idx[0, 0, :, 0] = i.to(torch.int32)
    table = torch.zeros(nb, nb, dtype=torch.bool, device=DEV)
    table[i, i] = True
    rows = i[:, None].expand_as(s0)
    table[rows[s0 >= 0], s0[s0 >= 0].long()] = True

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & table[qi // B, ki // B]

    mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=B, mask_mod=mask_mod,
                                    seq_lengths=(L, L))
    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    with torch.no_grad():
        of = flex(qt, kt, vt, block_mask=mask, enable_gqa=True)
    err = rel(of.transpose(1, 2), o_union)

    def fwd():
        with torch.no_grad():
            flex(qt, kt, vt, block_mask=mask, enable_gqa=True)

    def fwdbwd():
        for x in (qt, kt, vt):
            x.grad = None
        flex(qt, kt, vt, block_mask=mask, enable_gqa=True).backward(dot)

    return bench_ms(fwd), bench_ms(fwdbwd), err


def profile_kernels(fn, top: int = 14) -> dict:
    """Device time per kernel name (ms) of one call after a warm-up call (torch.profiler)."""
    if DEV != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    tot = {}
    for ka in prof.key_averages():
        t = getattr(ka, "self_device_time_total", None)
        if t is None:
            t = getattr(ka, "self_cuda_time_total", 0.0)
        if t > 0:
            name = ka.key if len(ka.key) < 60 else ka.key[:57] + "..."
            tot[name] = tot.get(name, 0.0) + t / 1e3
    items = sorted(tot.items(), key=lambda kv: -kv[1])
    out = dict(items[:top])
    out["(total)"] = sum(v for _, v in items)
    return out


def bench_selection(L: int, kind: str) -> None:
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U
    from msa_megatron.ops.triton_op import msa_attention_triton

    cfg = msa_cfg()
    sel = make_selection(kind, L, 11)
    st = u8(sel)
    row = dict(L=L, sel=kind, U8=st["mean"], U8_p90=st["p90"])
    q, k, v, do = randn((1, L, HQ, D), 1), randn((1, L, HKV, D), 2), randn((1, L, HKV, D), 3), randn((1, L, HQ, D), 4)
    iq, ik = index_inputs(L, 5)
    kv, un = T.KernelConfig(main_impl="kv"), T.KernelConfig(main_impl="union")
    row["kv_fwd"] = bench_ms(lambda: T.sparse_attention_fwd(q, k, v, sel, B, config=kv))
    row["union_lists"] = bench_ms(lambda: U.union_lists_for(sel, HQ // HKV, q.dtype, un))
    row["union_lists_triton"] = bench_ms(lambda: U.build_union_lists_triton(sel, 8))
    row["union_fwd"] = bench_ms(lambda: U.union_attention_fwd(q, k, v, sel, B, config=un))
    o1, l1, plan = T.sparse_attention_fwd(q, k, v, sel, B, config=kv, return_plan=True)
    o2, l2, lists = U.union_attention_fwd(q, k, v, sel, B, config=un, return_lists=True)
    row["kv_bwd"] = bench_ms(lambda: T.sparse_attention_bwd(do, q, k, v, o1, l1, sel, B, config=kv, plan=plan))
    row["kv_dkdv_only"] = bench_ms(lambda: T.sparse_attention_bwd(do, q, k, v, o1, l1, sel, B, config=kv, plan=plan,
                                                                  compute_dq=False))
    row["union_dq"] = bench_ms(lambda: U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=un, lists=lists))
    delta = T._delta(o2, do)
    row["union_dkdv"] = bench_ms(lambda: U.union_attention_dkdv(do, q, k, v, l2, delta, sel, B, config=un, lists=lists))
    row["union_bwd"] = bench_ms(lambda: U.union_attention_bwd(do, q, k, v, o2, l2, sel, B, config=un, lists=lists))
    un_kv = T.KernelConfig(main_impl="union", union_dkdv="kv")
    row["union_bwd_kvdkdv"] = bench_ms(lambda: U.union_attention_bwd(do, q, k, v, o2, l2, sel, B, config=un_kv,
                                                                      lists=lists))
    ilse = TI.selected_lse(iq, ik, sel, cfg)
    fk = T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale)
    row["kl_separate"] = bench_ms(lambda: TI.sparse_kl_backward(q, k, iq, ik, sel, l1, ilse, cfg))
    row["union_dq_kl"] = bench_ms(lambda: U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=un, lists=lists,
                                                               kl=fk))
    del o1, l1, plan
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    iqg, ikg = (x.detach().requires_grad_() for x in (iq, ik))

    def main_fb(kc):
        def fn():
            for x in (qg, kg, vg):
                x.grad = None
            out, _ = T.sparse_attention(qg, kg, vg, sel, B, config=kc)
            out.backward(do)
        return fn

    def op_fb(kc):
        def fn():
            for x in (qg, kg, vg, iqg, ikg):
                x.grad = None
            out, aux = msa_attention_triton(qg, kg, vg, iqg, ikg, cfg, block_idx=sel, kernel_config=kc)
            torch.autograd.backward([out, aux.kl], [do, torch.ones_like(aux.kl)])
        return fn

    row["kv_main_fwdbwd"] = bench_ms(main_fb(kv))
    row["union_main_fwdbwd"] = bench_ms(main_fb(un))
    row["union_main_fwdbwd_kvdkdv"] = bench_ms(main_fb(un_kv))
    row["kv_op_fwdbwd"] = bench_ms(op_fb(kv))
    row["union_op_fwdbwd"] = bench_ms(op_fb(un))
    if kind in ("pool15", "pool32"):  # where the time goes (one call each)
        for name, kc in (("kv", kv), ("union", un)):
            try:
                prof = profile_kernels(op_fb(kc))
                PROFILES.append(dict(L=L, sel=kind, path=f"{name} op fwd+bwd", kernels=prof))
                print(f"profile {name} op fwd+bwd: {json.dumps(prof)}", flush=True)
            except Exception as exc:
                print(f"profile {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if kind == "random":
        iqs, iks = index_inputs(L, 5)
        row["index_select"] = bench_ms(lambda: TI.index_select(iqs, iks, cfg))
    if kind == "pool15" and DEV == "cuda":
        try:
            row["flex_fwd"], row["flex_fwdbwd"], row["flex_vs_union_out"] = flex_pool15(L, sel, q, k, v, do, o2)
            record("bench", L, kind, "flex out vs union out", row["flex_vs_union_out"], TOL["out"])
        except Exception as exc:
            traceback.print_exc(limit=6)
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    BENCH.append(row)
    print(json.dumps(row), flush=True)


def sweep_selection(L: int, kind: str, what=("fwd", "dq", "kl", "dkdv", "kv")) -> None:
    """Union kernels under several tile configs (one compile each) on one selection."""
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U

    cfg = msa_cfg()
    sel = make_selection(kind, L, 11)
    q, k, v, do = randn((1, L, HQ, D), 1), randn((1, L, HKV, D), 2), randn((1, L, HKV, D), 3), randn((1, L, HQ, D), 4)
    iq, ik = index_inputs(L, 5)
    un = T.KernelConfig(main_impl="union")
    o2, l2, lists = U.union_attention_fwd(q, k, v, sel, B, config=un, return_lists=True)
    fk = T.FusedKL(iq, ik, TI.selected_lse(iq, ik, sel, cfg), cfg.index_softmax_scale)
    # union_rows=64: P = 4 positions per tile (64-row wgmma tiles) for less union work on
    # trained-like selections (U4 22.7 vs U8 29.9 on the bench's trained generator at 128K)
    specs_f = ["union_block_n=64,union_fwd_warps=8,union_fwd_stages=2", "union_fwd_block_n=128",
               "union_fwd_stages=3", "union_fwd_warps=4", "union_rows=64", "union_rows=64,union_fwd_warps=4"]
    specs_b = ["union_block_n=64,union_dq_warps=8,union_dq_stages=2", "union_dq_stages=1", "union_dq_stages=3",
               "union_block_n=128", "union_rows=64", "union_rows=64,union_dq_warps=4"]
    specs_k = ["union_kl_stages=1", "union_kl_stages=2", "union_kl_stages=3", "union_dik_item_entries=0",
               "union_dik_item_entries=1024", "union_rows=64"]
    specs_kv = ["union_dkdv_block_n=128,union_dkdv_rows=32,union_dkdv_warps=8,union_dkdv_stages=2",
                "union_dkdv_stages=3", "union_dkdv_block_n=64,union_dkdv_warps=4", "union_dkdv_rows=16",
                "union_dkdv_item_entries=8", "union_dkdv_item_entries=128", "union_dkdv_item_entries=0"]
    delta = T._delta(o2, do)
    for spec in specs_kv if "dkdv" in what else []:
        c = T.KernelConfig.from_spec("main_impl=union," + spec)
        ls = U.union_lists_for(sel, HQ // HKV, q.dtype, c, lists, D)  # built outside the timing (P may differ)
        _sweep(L, kind, "union_dkdv", spec, lambda: U.union_attention_dkdv(do, q, k, v, l2, delta, sel, B, config=c,
                                                                          lists=ls))
    for spec in specs_f if "fwd" in what else []:
        c = T.KernelConfig.from_spec("main_impl=union," + spec)
        ls = U.union_lists_for(sel, HQ // HKV, q.dtype, c, lists, D)
        _sweep(L, kind, "union_fwd", spec, lambda: U.union_attention_fwd(q, k, v, sel, B, config=c, lists=ls))
    for spec in specs_b if "dq" in what else []:
        c = T.KernelConfig.from_spec("main_impl=union," + spec)
        ls = U.union_lists_for(sel, HQ // HKV, q.dtype, c, lists, D)
        _sweep(L, kind, "union_dq", spec, lambda: U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=c,
                                                                      lists=ls))
    for spec in specs_k if "kl" in what else []:
        c = T.KernelConfig.from_spec("main_impl=union," + spec)
        ls = U.union_lists_for(sel, HQ // HKV, q.dtype, c, lists, D)
        _sweep(L, kind, "union_dq_kl", spec, lambda: U.union_attention_dq(do, q, k, v, o2, l2, sel, B, config=c,
                                                                         lists=ls, kl=fk))
    # the KV-outer dK/dV-only kernel (the split backward's other half): 128-row tiles now that the
    # dQ dot and stores are gone (kernel_study.md 6.3 step 3); plan built once
    plan = T.build_plan(sel, L, B, 0, T.KernelConfig())
    for spec in ["", "bwd_rows=128,bwd_block_n=64,bwd_stages=1", "bwd_block_n=64", "bwd_rows=32"] if "kv" in what else []:
        c = T.KernelConfig.from_spec(spec)
        _sweep(L, kind, "kv_dkdv_only", spec or "(default)",
               lambda: T.sparse_attention_bwd(do, q, k, v, o2, l2, sel, B, config=c, plan=plan, compute_dq=False))

def _sweep(L, kind, what, spec, fn):
    if over_budget(f"sweep {what} {spec}"):
        return
    try:
        ms = bench_ms(fn, rep=80)
    except Exception as exc:
        ms = float("nan")
        print(f"sweep {what} {spec}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    BENCH.append(dict(L=L, sel=kind, sweep=what, spec=spec, ms=ms))
    print(f"sweep {what:12s} {spec:55s} {ms:8.2f} ms", flush=True)


def part_bench(L: int, kinds=("pool15", "pool20", "pool32", "random")) -> None:
    for kind in kinds:
        guarded(f"bench L={L} {kind}", lambda: bench_selection(L, kind))


# ----------------------------------------------------------------------------- part: 1M
def part_1m(L: int, impls) -> None:
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops.triton_op import msa_attention_triton

    cfg = msa_cfg()
    sel = pool_selection(L, 20, 13)
    st = u8(sel)
    for impl in impls:
        def run():
            q = randn((1, L, HQ, D), 1).requires_grad_()
            k, v = randn((1, L, HKV, D), 2).requires_grad_(), randn((1, L, HKV, D), 3).requires_grad_()
            iq, ik = index_inputs(L, 5, grad=True)
            do = randn((1, L, HQ, D), 4)
            kc = T.KernelConfig(main_impl=impl)
            times = []
            for it in range(2):
                for x in (q, k, v, iq, ik):
                    x.grad = None
                sync()
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                out, aux = msa_attention_triton(q, k, v, iq, ik, cfg, block_idx=sel, kernel_config=kc)
                sync()
                t1 = time.time()
                torch.autograd.backward([out, aux.kl], [do, torch.ones_like(aux.kl)])
                sync()
                t2 = time.time()
                times.append((t1 - t0, t2 - t1))
                kl = float(aux.kl.detach())
                del out, aux
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
            row = dict(L=L, impl=impl, sel="pool20", U8=st["mean"], fwd_s=times[-1][0], bwd_s=times[-1][1],
                       peak_gib=peak, kl=kl, kl_finite=math.isfinite(kl),
                       total_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if DEV == "cuda" else 0)
            MEM.append(row)
            print(json.dumps(row), flush=True)
            record("1m", L, f"pool20 {impl}", "kl finite", 0.0 if math.isfinite(kl) else 1.0, 0.0)
        guarded(f"1M {impl}", run)


# ----------------------------------------------------------------------------- AOT (no GPU)
def aot_report(arch: int = 90, spec: str = "") -> int:
    """--aot: compile the v2 kernels for sm_<arch>a with Triton's ptxas (no device needed) and
    print registers / spills / shared memory; exit 1 on a compile error or > 227 KB smem."""

    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from msa_megatron.bench.aot import compile_report

    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U

    F, I, P = "*fp32", "*i32", "*bf16"
    div16 = {"D", "G", "sq", "sk", "nt"}
    kernels = []
    for sp in (spec.split(";") if spec else ["", "union_fwd_block_n=128,union_dq_stages=3", "union_fwd_warps=4,union_dq_warps=4",
                                                 "union_fwd_stages=3,union_kl_stages=2"]):
        cfg = T.KernelConfig.from_spec(sp)
        Pn = U.union_positions(16, torch.bfloat16, cfg)
        bn = U._bn(B, cfg, torch.bfloat16)
        common = dict(UMAX=Pn * K, P=Pn, GP=16, BLOCK=B, BN=bn, NSUB=B // bn, DP=D, DOT_PREC=None, UPCAST=False)
        io = dict(Q=P, K=P, V=P, DO=P, OUT=P, LSE=F, DELTA=F, DQ=P, IQ=P, IK=P, ILSE=F, DIQ=F, DSBUF=P, KLPART=F,
                  PBUF=F, ENTM=F, UOFF="*i64", qk_scale="fp32", sm_scale="fp32", iscale="fp32", kl_coef="fp32")
        fbn = U._bn(B, cfg, torch.bfloat16, forward=True)
        kernels.append((f"union_fwd [{sp}]", U._union_fwd_kernel, io, dict(common, BN=fbn, NSUB=B // fbn),
                        cfg.union_fwd_warps, cfg.union_fwd_stages))
        kernels.append((f"union_dq [{sp}]", U._union_dq_kernel, io, dict(common, KL=False),
                        cfg.union_dq_warps, cfg.union_dq_stages))
        kernels.append((f"union_dq + KL teacher [{sp}]", U._union_dq_kernel, io, dict(common, KL=True),
                        cfg.union_dq_warps, cfg.union_dq_stages))
    kernels.append(("union_kl (student, 16 rows x 64 keys)", U._union_kl_kernel, io,
                    dict(UMAX=8 * K, P=8, BLOCK=B, BN=64, NSUB=B // 64, DI=DI, DIP=DI, PPAD=16, DOT_PREC=None,
                         UPCAST=False), 4, cfg.union_kl_stages))
    L64_ = "*i64"
    dkdv_io = dict(io, DK=P, DV=P, DKVPART=F, ENT_ORD=L64_, IT_ORD=L64_, IT_SEG=L64_, IT_START=L64_, IT_END=L64_,
                   IT_PSLOT=L64_, NTOT=L64_)
    for sp in (spec.split(";") if spec else ["", "union_dkdv_block_n=64,union_dkdv_warps=4",
                                             "union_dkdv_rows=64", "union_dkdv_stages=3"]):
        cfg = T.KernelConfig.from_spec(sp)
        kernels.append((f"union_dkdv [{sp}]", U._union_dkdv_kernel, dkdv_io,
                        dict(UMAX=8 * K, P=8, GP=16, RM=cfg.union_dkdv_rows, BLOCK=B, BN=cfg.union_dkdv_block_n, DP=D,
                             DOT_PREC=None, UPCAST=False), cfg.union_dkdv_warps, cfg.union_dkdv_stages))
    L64 = "*i64"
    kernels.append(("union_dik", U._union_dik_kernel, dict(DSBUF=P, IQ=P, DIK=F, DIKPART=F, ENT_ORD=L64, IT_ORD=L64,
                                                           IT_SEG=L64, IT_START=L64, IT_END=L64, IT_PSLOT=L64,
                                                           NTOT=L64, UOFF=L64),
                    dict(UMAX=8 * K, P=8, PK=16, BLOCK=B, BN=64, DI=DI, DIP=DI, DOT_PREC=None, UPCAST=False), 4, 2))
    kernels.append(("union_dik_reduce", U._union_dik_reduce_kernel, dict(DIKPART=F, DIK=F, SEG_FIRST=L64, SEG_NIT=L64,
                                                                         IT_PSLOT=L64),
                    dict(BLOCK=B, BN=64, DI=DI, DIP=DI), 4, 1))
    kernels.append(("union_lists (P=8, K=16)", U._union_lists_kernel, dict(BIDX=I, SCR=I, UBLK=I, UMSK=I, UCNT=I, DUPS=I),
                    dict(P=8, KSEL=K, UMAX=8 * K, UP=8 * K), 4, 1))
    cfg = T.KernelConfig()
    qpb, bnb = T.kv_tiles("bwd", torch.bfloat16, D, 16, B, cfg)
    bwd_types = dict(Q=P, K=P, V=P, DO=P, LSE=F, DELTA=F, DQ=F, DKACC=F, DVACC=F, DKPART=F, DVPART=F, sm_scale="fp32",
                     qk_scale="fp32", IQ=P, IK=P, ILSE=F, DIQ=F, DIK=F, KLPART=F, iscale="fp32", kl_coef="fp32")
    kernels.append(("bwd_kv part=3 (dK/dV only)", T._bwd_kv_kernel, bwd_types,
                    dict(KSEL=K, BLOCK=B, GP=16, DP=D, DOT_PREC=None, UPCAST=False, NSUB=B // bnb, BN=bnb, QP=qpb,
                         DQ_ATOMIC=False, PART=3, KL=False, KLJ=1, DI=16, DIP=16, DIRECT=True), cfg.bwd_warps,
                    cfg.bwd_stages))
    # packed documents (docs/packed.md): plain variants with HAS_DOC=False (unchanged numbers),
    # then the HAS_DOC=True variants of the default-config kernels as "+doc"
    plain = [(n, fn, t, dict(c, HAS_DOC=False) if "HAS_DOC" in fn.arg_names else c, nw, ns)
             for n, fn, t, c, nw, ns in kernels]
    docs = [(n + " +doc", fn, t, dict(c, HAS_DOC=True), nw, ns) for n, fn, t, c, nw, ns in kernels
            if "HAS_DOC" in fn.arg_names and ("[]" in n or n.startswith("bwd_kv"))]
    kernels = plain + docs
    print(f"AOT compile for sm_{arch}a, triton {triton.__version__}")
    bad = 0
    for name, fn, types, consts, nw, ns in kernels:
        bad += not compile_report(name, fn, dict(types, DS="*i64"), consts, nw, ns, arch=arch, ptr_default=I,
                                  div16=div16)
    return 1 if bad else 0


# ----------------------------------------------------------------------------- report
def write_report(out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "union_check.json").write_text(json.dumps(dict(meta=meta, checks=CHECKS, bench=BENCH, mem=MEM,
                                                              failed=FAILED, skipped=SKIPPED, profiles=PROFILES), indent=1,
                                                              default=str))
    lines = [f"# Union-tile main branch check ({meta['device']}, {meta['date']}, commit {meta['commit']})", ""]
    if CHECKS:
        lines += ["## Correctness", "", "| part | L | selection | metric | value | tol | ok |", "|---|---:|---|---|---:|---:|---|"]
        for c in CHECKS:
            lines.append(f"| {c['part']} | {c['L']} | {c['sel']} | {c['metric']} | {c['value']:.3g} | {c['tol']:.3g} | "
                         f"{'ok' if c['ok'] else 'FAIL'} |")
        lines.append("")
    main_rows = [r for r in BENCH if "sweep" not in r]
    if main_rows:
        cols = ["U8", "U8_p90", "kv_fwd", "union_lists", "union_lists_triton", "union_fwd", "kv_bwd", "kv_dkdv_only", "union_dkdv", "union_dq",
                "union_bwd", "union_bwd_kvdkdv", "kl_separate", "union_dq_kl", "kv_main_fwdbwd", "union_main_fwdbwd",
                "union_main_fwdbwd_kvdkdv", "kv_op_fwdbwd", "union_op_fwdbwd",
                "index_select", "flex_fwd", "flex_fwdbwd"]
        lines += ["## Timing (ms, do_bench median)", "",
                  "kv = today's KV-outer path; union = v2. op = msa_attention_triton fwd+bwd with the selection given "
                  "(index LSE + main + KL; add index_select for a full step).", "",
                  "| L | selection | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        for r in main_rows:
            lines.append(f"| {r['L']} | {r['sel']} | " + " | ".join(
                f"{r[c]:.2f}" if isinstance(r.get(c), float) else "" for c in cols) + " |")
        lines.append("")
        errs = [r for r in main_rows if "flex_error" in r]
        for r in errs:
            lines.append(f"Flex error: {r['flex_error']}")
    sw = [r for r in BENCH if "sweep" in r]
    if sw:
        from msa_megatron.ops.tuning import KernelConfig

        dc = KernelConfig()
        defaults = ", ".join(f"{n}={getattr(dc, n)}" for n in ("union_rows", "union_block_n", "union_fwd_block_n",
                                                                 "union_fwd_warps",
                                                                 "union_fwd_stages", "union_dq_warps", "union_dq_stages",
                                                                 "union_kl_stages", "union_dik_item_entries"))
        lines += ["## Sweep", "", f"Each config changes these defaults: {defaults}.", "",
                  "| selection | L | kernel | config | ms |",
                  "|---|---:|---|---|---:|"]
        lines += [f"| {r['sel']} | {r['L']} | {r['sweep']} | {r['spec']} | {r['ms']:.2f} |" for r in sw]
        lines.append("")
    for pr in (p_ for p_ in PROFILES if p_["kernels"]):
        lines += [f"## Kernel split: {pr['path']} (L={pr['L']}, {pr['sel']}; torch.profiler, ms)", "",
                  "| kernel | ms |", "|---|---:|"] + [f"| `{k}` | {v:.2f} |" for k, v in pr["kernels"].items()] + [""]
    if MEM:
        lines += ["## 1M op fwd+bwd (one GPU)", "", "| L | impl | U8 | fwd s | bwd s | peak GiB | device GiB | kl |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['L']} | {r['impl']} | {r['U8']:.1f} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | {r['peak_gib']:.2f} | "
                  f"{r['total_gib']:.1f} | {r['kl']:.4g} |" for r in MEM]
        lines.append("")
    lines += ["## Failed", ""] + ([f"- {f}" for f in FAILED] or ["none"])
    lines += ["", "## Skipped (time budget)", ""] + ([f"- {f}" for f in SKIPPED] or ["none"])
    lines += ["", f"wall {meta.get('wall_s', 0):.0f} s"]
    (out_dir / "union_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    global HQ, HKV, D, DI, B, K, DEV
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="check,bench,1m")
    p.add_argument("--check-lengths", default="16K,32K")
    p.add_argument("--bench-L", default="128K")
    p.add_argument("--bench-kinds", default="pool15,pool20,pool32,random", help="selections of the bench part")
    p.add_argument("--sweep-what", default="fwd,dq,kl,dkdv,kv", help="kernel groups of the sweep part")
    p.add_argument("--sweep-selections", default="pool20",
                   help="comma list of selections the sweep runs on (pool15, pool20, pool32, random)")
    p.add_argument("--long-L", default="1M")
    p.add_argument("--long-impls", default="union,kv")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what would start after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_union_out"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny layout on CPU via the Triton interpreter")
    p.add_argument("--aot", nargs="?", const="", default=None,
                   help="no GPU: compile the v2 kernels for sm_90a (optional ';'-separated KernelConfig specs)")
    a = p.parse_args()
    if a.aot is not None:
        return aot_report(spec=a.aot)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        HQ, HKV, D, DI, B, K, DEV = 8, 2, 16, 16, 16, 3, "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device (use --cpu-smoke to test the script)")
        return 2
    from msa_megatron.ops import triton_sparse_attn as T

    T.POISON_OUTPUTS = a.cpu_smoke  # NaN-poison outputs in the smoke run (unwritten elements show up)
    import subprocess

    commit = os.environ.get("MSA_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    meta = dict(device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (interpreter)",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit,
                torch=torch.__version__, triton=__import__("triton").__version__,
                layout=dict(hq=HQ, hkv=HKV, d=D, di=DI, block=B, topk=K, dtype="bf16"))
    global T_START, BUDGET_S
    parts = set(a.parts.split(","))
    bad_sel = [k for k in a.sweep_selections.split(",") if not (k == "random" or (k.startswith("pool") and k[4:].isdigit()))]
    if bad_sel:
        print(f"--sweep-selections: unknown {bad_sel}; allowed: random, pool<C> (e.g. pool15, pool20, pool32)")
        return 2
    bad = parts - {"check", "bench", "1m", "sweep"}
    if bad:
        print(f"--parts: unknown {sorted(bad)}; allowed: check, bench, 1m, sweep")
        return 2
    T_START, BUDGET_S = time.time(), a.budget_s
    try:
        if "check" in parts:
            part_check([parse_length(x) for x in a.check_lengths.split(",")])
        if "bench" in parts:
            part_bench(parse_length(a.bench_L), a.bench_kinds.split(","))
        if "1m" in parts:
            part_1m(parse_length(a.long_L), a.long_impls.split(","))
        if "sweep" in parts:
            for kind in a.sweep_selections.split(","):
                guarded(f"sweep {kind}", lambda kind=kind: sweep_selection(parse_length(a.bench_L), kind,
                                                                           a.sweep_what.split(",")))
    finally:
        meta["wall_s"] = time.time() - T_START
        write_report(Path(a.out), meta)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

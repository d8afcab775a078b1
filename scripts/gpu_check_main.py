#!/usr/bin/env python
"""GPU correctness check of MSA's main-branch kernels and of the whole MSA op (H100/H200).

    python scripts/gpu_check_main.py [--quick] [--lengths 8K,32K,128K] [--index-backend triton]
    python scripts/gpu_check_main.py --tune [--tune-L 128K] [--tune-configs "fwd_rows=64;bwd_block_n=64"]

Paper layout (64 q / 4 KV heads, d 128, block 128, top-16), bf16 inputs, per-token random
block selections. Every kernel output is NaN-poisoned before the kernels run
(``POISON_OUTPUTS``), so an element a kernel fails to write shows up as NaN.

The fp32 reference cannot run whole 128K sequences, so it runs on a slice of S query rows
(first, last and random middle positions, via ``q_pos``) and is compared with the kernels'
full-length run on those rows: out, lse and dq of a row only depend on that row. For dK/dV
the backward is run a second time with dout zero outside the slice: then dK/dV are exactly
the slice's contribution, which the reference computes (dq must then be 0 off the slice).

Tolerances (relative Frobenius error vs the fp32 reference on the same bf16 values): out
1e-2, lse 1e-4, dq/dk/dv 2e-2; the op adds kl 1e-2, d_iq 3e-2, d_ik 3e-2, the entropy
statistics (index_entropy, main_entropy, from the KL kernel: track_entropy on) 1e-3 (they
inherit the main LSE's error) and >= 99% of (row, group) selections identical to
``reference.select`` (fp32 near-ties may differ).
Exit status 1 if any check fails or errors; each check is guarded so one failure does not
hide the others.

``--aot`` needs no GPU: it compiles every kernel of the default config for sm_90a (paper
layout) with Triton's ptxas and prints registers / spills / shared memory per kernel.

``--tune`` skips the checks and times the main branch (forward incl. reverse index, and
backward) at one length for a list of kernel configs (``KernelConfig`` fields as in
``MSA_MAIN_KERNEL``, plus ``det=0`` for atomic dQ), one compile each, so one GPU call can
pick the tile sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from msa_megatron import reference as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402

TOL = {"out": 1e-2, "lse": 1e-4, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "kl": 1e-2, "d_iq": 3e-2, "d_ik": 3e-2,
       "fp32": 1e-4, "same": 5e-3, "entropy": 1e-3}
HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16
DEV = "cuda"
ROWS: list = []  # (check, L, metric, value, tol, ok)
FAILED: list = []


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def record(check: str, L: int, metric: str, value: float, tol: float, ok=None) -> None:
    ok = (value <= tol) if ok is None else ok
    ok = bool(ok) and not math.isnan(value)
    ROWS.append((check, L, metric, value, tol, ok))
    if not ok:
        FAILED.append(f"{check} L={L} {metric}={value:.3g} (tol {tol:.3g})")


def no_nan(check: str, L: int, **tensors) -> None:
    for name, t in tensors.items():
        n = int(torch.isnan(t.float()).sum())
        record(check, L, f"NaN in {name}", float(n), 0.0, ok=n == 0)


def guarded(check: str, L: int, fn) -> None:
    t0 = time.time()
    try:
        fn()
    except Exception as exc:  # recorded; the remaining checks still run
        traceback.print_exc(limit=6)
        ROWS.append((check, L, f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:90]}", float("nan"), 0.0, False))
        FAILED.append(f"{check} L={L}: {type(exc).__name__}: {exc}")
    print(f"  {check:18s} L={L:>7d} done in {time.time() - t0:6.1f} s", flush=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def cpu_smoke_layout() -> None:
    """--cpu-smoke: tiny layout on CPU through the Triton interpreter (tests this script)."""
    global HQ, HKV, D, DI, B, K, DEV
    HQ, HKV, D, DI, B, K, DEV = 4, 2, 32, 16, 16, 4, "cpu"
    os.environ["TRITON_INTERPRET"] = "1"


def randn(shape, seed, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV, generator=gen(seed)) * scale).to(dtype)


def random_selection(L: int, seed: int) -> torch.Tensor:
    """[1, g, L, K] int32: own block + K-1 distinct random earlier blocks per (query, group)."""
    nb = math.ceil(L / B)
    out = torch.full((1, HKV, L, K), -1, dtype=torch.int32, device=DEV)
    blk = torch.arange(nb, device=DEV)
    g = gen(seed)
    chunk = max(1, (1 << 27) // (HKV * nb))
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        own = torch.arange(s0, s1, device=DEV) // B
        sc = torch.rand(1, HKV, s1 - s0, nb, device=DEV, generator=g)
        sc.masked_fill_(blk[None, :] > own[:, None], -1.0).masked_fill_(blk[None, :] == own[:, None], 2.0)
        val, idx = torch.topk(sc, min(K, nb), dim=-1)
        idx = torch.sort(torch.where(val >= 0, idx, torch.full_like(idx, nb)), dim=-1).values
        out[:, :, s0:s1, : idx.shape[-1]] = torch.where(idx == nb, -1, idx).to(torch.int32)
    return out


def slice_positions(L: int, S: int, seed: int) -> torch.Tensor:
    edge = min(S // 4, L)
    mid = torch.randperm(L, generator=torch.Generator().manual_seed(seed))[: S]
    pos = torch.cat([torch.arange(edge), torch.arange(L - edge, L), mid])
    return torch.unique(pos)[:S].sort().values.to(DEV)


# ----------------------------------------------------------------------------- main-branch checks
def check_main(L: int, S: int, T) -> None:
    q = randn((1, L, HQ, D), 1).requires_grad_()
    k = randn((1, L, HKV, D), 2).requires_grad_()
    v = randn((1, L, HKV, D), 3).requires_grad_()
    do = randn((1, L, HQ, D), 4)
    bidx = random_selection(L, 5)
    pos = slice_positions(L, S, L)
    out, lse = T.sparse_attention(q, k, v, bidx, B)
    no_nan("main fwd", L, out=out, lse=lse)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], do, retain_graph=True)
    no_nan("main bwd", L, dq=dq, dk=dk, dv=dv)
    # fp32 reference on the slice
    qs = q.detach()[:, pos].float().requires_grad_()
    kf, vf = k.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    ro, rl = R.sparse_attention(qs, kf, vf, bidx[:, :, pos], B, q_pos=pos)
    record("main fwd", L, "out", rel(out[:, pos], ro), TOL["out"])
    record("main fwd", L, "lse", rel(lse[:, :, pos], rl), TOL["lse"])
    rdq, rdk, rdv = torch.autograd.grad(ro, [qs, kf, vf], do[:, pos].float())
    record("main bwd", L, "dq", rel(dq[:, pos], rdq), TOL["dq"])
    # dK/dV: dout restricted to the slice -> exactly the slice's contribution
    do_s = torch.zeros_like(do)
    do_s[:, pos] = do[:, pos]
    dq2, dk2, dv2 = torch.autograd.grad(out, [q, k, v], do_s)
    no_nan("main bwd (slice do)", L, dq=dq2, dk=dk2, dv=dv2)
    off = torch.ones(L, dtype=torch.bool, device=DEV)
    off[pos] = False
    record("main bwd (slice do)", L, "max|dq| off slice", dq2[:, off].abs().max().item() if off.any() else 0.0, 0.0)
    record("main bwd (slice do)", L, "dk", rel(dk2, rdk), TOL["dk"])
    record("main bwd (slice do)", L, "dv", rel(dv2, rdv), TOL["dv"])


def check_variants(L: int, T) -> None:
    """Determinism, atomic dQ, query-outer forward, 64-key backward tiles, fp32 inputs."""
    from dataclasses import replace

    q, k, v, do = randn((1, L, HQ, D), 11), randn((1, L, HKV, D), 12), randn((1, L, HKV, D), 13), randn((1, L, HQ, D), 14)
    bidx = random_selection(L, 15)
    out, lse = T.sparse_attention_fwd(q, k, v, bidx, B)
    g1 = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, B)
    g2 = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, B)
    record("deterministic bwd", L, "bitwise equal", 0.0, 0.0, ok=all(torch.equal(a, b) for a, b in zip(g1, g2)))
    ga = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, B, deterministic=False)
    # vs fp32 dQ partials: atomics accumulate in fp32 too (the default bf16 partials differ by
    # their rounding, ~5e-3, which is not what this check is about)
    g1f = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, B, dq_partial_dtype=torch.float32)
    for n, a, b in zip(("dq", "dk", "dv"), ga, g1f):
        record("atomic dq bwd", L, f"{n} vs det fp32", rel(a, b), TOL["same"])
    cfg = T.default_config()
    oq, lq = T.sparse_attention_fwd(q, k, v, bidx, B, config=replace(cfg, fwd_impl="q"))
    no_nan("q-outer fwd", L, out=oq, lse=lq)
    record("q-outer fwd", L, "out vs kv", rel(oq, out), TOL["same"])
    record("q-outer fwd", L, "lse vs kv", rel(lq, lse), TOL["lse"])
    g64 = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, B, config=replace(cfg, bwd_block_n=64))
    for n, a, b in zip(("dq", "dk", "dv"), g64, g1):
        record("bwd_block_n=64", L, f"{n} vs 128", rel(a, b), TOL["same"])
    # fp32 inputs (IEEE dots) on a short prefix
    Lf = min(L, 4096 if DEV == "cuda" else 64)
    qf, kf, vf, dof = (x[:, :Lf].float().contiguous() for x in (q, k, v, do))
    bf = bidx[:, :, :Lf].contiguous()
    of, lf = T.sparse_attention_fwd(qf, kf, vf, bf, B)
    pos = slice_positions(Lf, 128, 3)
    ro, rl = R.sparse_attention(qf[:, pos], kf, vf, bf[:, :, pos], B, q_pos=pos)
    record("fp32 fwd", Lf, "out", rel(of[:, pos], ro), TOL["fp32"])
    record("fp32 fwd", Lf, "lse", rel(lf[:, :, pos], rl), TOL["fp32"])


# ----------------------------------------------------------------------------- whole-op checks
def check_op(L: int, S: int, mode: str, index_backend: str, kl_fused: bool = False) -> None:
    """kl_fused: the KL inside the main backward (kernel_config kl_fused=1); its value and
    stats are read after the backward, as they must be."""
    from dataclasses import replace

    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops.triton_op import msa_attention_triton

    kc = replace(T.KernelConfig.from_env(), kl_fused=kl_fused)
    name = f"op {mode}" + (" kl_fused" if kl_fused else "")
    cfg = MSAConfig(block_size=B, topk=K, index_dim=DI, num_index_heads=HKV, track_entropy=True)
    q, k, v = randn((1, L, HQ, D), 21), randn((1, L, HKV, D), 22), randn((1, L, HKV, D), 23)
    iq, ik = randn((1, L, HKV, DI), 24), randn((1, L, DI), 25)
    do = randn((1, L, HQ, D), 26)
    leaves = [x.requires_grad_() for x in (q, k, v, iq, ik)]
    if mode == "msa":  # full-length run: every output written, finite
        out, aux = msa_attention_triton(*leaves, cfg, mode=mode, index_backend=index_backend, kernel_config=kc)
        grads = torch.autograd.grad([out, aux.kl], leaves, [do, torch.ones((), device=DEV)])
        no_nan(f"{name} full", L, out=out, lse=aux.lse, kl=aux.kl, **aux.stats,
               **dict(zip(["dq", "dk", "dv", "d_iq", "d_ik"], grads)))
        del out, aux, grads
    # slice run: sq = S queries at positions pos, all L keys, vs the fp32 reference
    pos = slice_positions(L, S, L + 1)
    qs = q.detach()[:, pos].clone().requires_grad_()
    iqs = iq.detach()[:, pos].clone().requires_grad_()
    sl = [qs, k, v, iqs, ik]
    dos = do[:, pos]
    out, aux = msa_attention_triton(qs, k, v, iqs, ik, cfg, q_pos=pos, mode=mode, index_backend=index_backend,
                                    kernel_config=kc)
    grads = torch.autograd.grad([out, aux.kl], sl, [dos, torch.ones((), device=DEV)])
    f = [x.detach().float().requires_grad_() for x in sl]
    if mode == "msa":
        sel_ref = R.select(f[3].detach(), f[4].detach(), cfg, pos)
        same = (sel_ref == aux.block_idx).all(-1).float().mean().item()
        record(name, L, "selection == ref", 1.0 - same, 0.01)
        ro, rl = R.sparse_attention(f[0], f[1], f[2], aux.block_idx, B, q_pos=pos)
        terms = R.sparse_kl_terms(f[0], f[1], f[3], f[4], aux.block_idx, cfg, pos)
    else:
        ro, rl = R.dense_attention(f[0], f[1], f[2], q_pos=pos)
        terms = R.dense_kl_terms(f[0], f[1], f[3], f[4], cfg, pos)
    rkl = terms.kl / terms.rows
    ref_stats = {"index_entropy": terms.index_entropy / terms.rows,
                 "main_entropy": terms.main_entropy / (terms.rows * (HQ // HKV))}
    rgrads = torch.autograd.grad([ro, rkl], f, [dos.float(), torch.ones((), device=DEV)])
    record(name, L, "out", rel(out, ro), TOL["out"])
    record(name, L, "lse", rel(aux.lse, rl), TOL["lse"])
    record(name, L, "kl", rel(aux.kl, rkl), TOL["kl"])
    for n, r in ref_stats.items():
        record(name, L, n, rel(aux.stats[n], r), TOL["entropy"])
    for n, a, b in zip(["dq", "dk", "dv", "d_iq", "d_ik"], grads, rgrads):
        record(name, L, n, rel(a, b), TOL[n])


DEFAULT_TUNE = ";".join([
    "",  # the defaults
    "fwd_rows=64",
    "fwd_stages=3",
    "fwd_rows=64,fwd_warps=4",
    "bwd_block_n=64",
    "bwd_rows=32",
    "bwd_rows=128,bwd_block_n=64",
    "dq_partial_lowp=1",
    "bwd_split=1",
    "chunk_queries=2048",
    "chunk_queries=8192",
    "det=0",
    "fwd_impl=q",
    "kl_fused=1",
    "kl_fused=1,kl_bwd_stages=2",
    "kl_fused=1,bwd_rows=32,kl_bwd_stages=2",
])


def tune(L: int, specs: str, reps: int = 5) -> None:
    from msa_megatron.ops import triton_sparse_attn as T

    T.POISON_OUTPUTS = False
    from msa_megatron.ops import triton_index as TI

    q, k, v, do = randn((1, L, HQ, D), 31), randn((1, L, HKV, D), 32), randn((1, L, HKV, D), 33), randn((1, L, HQ, D), 34)
    bidx = random_selection(L, 35)
    flops = 4.0 * HQ * D * float((torch.clamp(torch.arange(L) // B, max=K - 1) * B + torch.arange(L) % B + 1).sum())
    # Indexer KL inputs: "kl_fused=1" configs time the backward with the KL inside; the row
    # after the table times the separate KL kernel on the same selection, for comparison.
    kl_cfg = MSAConfig(block_size=B, topk=K, index_dim=DI, num_index_heads=HKV)
    iq, ik = randn((1, L, HKV, DI), 36), randn((1, L, DI), 37)
    ilse = TI.selected_lse(iq, ik, bidx, kl_cfg)
    fused_kl = T.FusedKL(iq, ik, ilse, kl_cfg.index_softmax_scale)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    print(f"\n| config (L={L}) | fwd ms | fwd TF/s | bwd ms | bwd TF/s | fwd+bwd ms |\n|---|---|---|---|---|---|")
    for spec in specs.split(";"):
        fields = dict(x.split("=") for x in spec.split(",") if x.strip())
        det = fields.pop("det", "1") != "0"
        try:
            cfg = T.KernelConfig.from_spec(",".join(f"{n}={v}" for n, v in fields.items()), T.KernelConfig.from_env())
            plan_need = T.partial_bytes_per_pos(q, HKV, K, B, fwd=cfg.fwd_impl == "kv", bwd=True, deterministic=det, config=cfg,
                                                dq_partial_dtype=q.dtype if cfg.dq_partial_lowp else torch.float32)
            box = {}

            def fwd():
                plan = T.build_plan(bidx, L, B, plan_need, cfg)
                box["out"], box["lse"] = T.sparse_attention_fwd(q, k, v, bidx, B, config=cfg, plan=plan)
                box["plan"] = plan

            def bwd():
                T.sparse_attention_bwd(do, q, k, v, box["out"], box["lse"], bidx, B, deterministic=det, config=cfg,
                                       plan=box["plan"], kl=fused_kl if cfg.kl_fused else None)

            tf = timed(fwd)
            tb = timed(bwd)
            print(f"| {spec or 'default'}{'' if det else ' (atomic dQ)'} | {tf:.2f} | {flops / tf / 1e9:.0f} | {tb:.2f} | "
                  f"{2.5 * flops / tb / 1e9:.0f} | {tf + tb:.2f} |", flush=True)
        except Exception as exc:  # one bad config must not stop the sweep
            print(f"| {spec} | ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | |", flush=True)
        torch.cuda.empty_cache()
    try:
        _, main_lse = T.sparse_attention_fwd(q, k, v, bidx, B)
        tk = timed(lambda: TI.sparse_kl_backward(q, k, iq, ik, bidx, main_lse, ilse, kl_cfg, return_stats=True))
        print(f"\nseparate KL kernel (sparse_kl_backward, return_stats=True): {tk:.2f} ms -- compare "
              "default bwd + this with the kl_fused=1 rows' bwd", flush=True)
    except Exception as exc:
        print(f"separate KL kernel: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)


def aot_report(arch: int = 90) -> int:
    """Compile the kernels for sm_<arch> without a device (ptxas only); exit 1 on a compile error."""
    import re
    import subprocess
    import tempfile

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from msa_megatron.ops import triton_sparse_attn as T

    cfg = T.KernelConfig.from_env()
    target = GPUTarget("cuda", arch, 32)
    div16 = {"D", "G", "sq", "sk", "hq", "cq", "t0"}  # what the JIT's value specialisation sees at this layout
    F, I = "*fp32", "*i32"
    GP = 16
    bnq = T._block_n(B, cfg.q_block_n)
    kernels = []
    for dt, d in ((torch.bfloat16, 128), (torch.float32, 128), (torch.bfloat16, 256)):
        P = "*bf16" if dt == torch.bfloat16 else "*fp32"
        DP = d
        prec = "ieee" if dt == torch.float32 else None
        common = dict(KSEL=K, BLOCK=B, GP=GP, DP=DP, DOT_PREC=prec, UPCAST=False)
        qpf, bnf = T.kv_tiles("fwd", dt, d, GP, B, cfg)
        qpb, bnb = T.kv_tiles("bwd", dt, d, GP, B, cfg)
        tag = f"{str(dt)[6:]} d={d}"
        io = dict(Q=P, K=P, V=P, DO=P)
        kernels.append((f"fwd_kv {tag} rows={qpf * GP} bn={bnf}", T._fwd_kv_kernel, dict(io, OPART=P, LPART=F, qk_scale="fp32"),
                        dict(common, NSUB=B // bnf, BN=bnf, QP=qpf), cfg.fwd_warps, cfg.fwd_stages))
        bwd_types = dict(io, LSE=F, DELTA=F, DQ=F, DKACC=F, DVACC=F, DKPART=F, DVPART=F, sm_scale="fp32", qk_scale="fp32",
                         IQ=P, IK=P, ILSE=F, DIQ=F, DIK=F, KLPART=F, iscale="fp32", kl_coef="fp32")
        no_kl = dict(KL=False, KLJ=1, DI=16, DIP=16)
        for part in ((1, 2) if cfg.bwd_split else (0,)):
            for atomic in ((False, True) if (dt, d) == (torch.bfloat16, 128) else (False,)):
                kernels.append((f"bwd_kv {tag} rows={qpb * GP} bn={bnb} part={part} atomic={int(atomic)}", T._bwd_kv_kernel,
                                bwd_types, dict(common, NSUB=B // bnb, BN=bnb, QP=qpb, DQ_ATOMIC=atomic, PART=part, **no_kl),
                                cfg.bwd_warps, cfg.bwd_stages))
        if dt == torch.bfloat16:  # the fused indexer KL (kernel_config kl_fused=1), in PART 0 or 1
            qpk, bnk = T.kv_tiles("bwd", dt, d, GP, B, cfg, kl_di=DI)
            kl_c = dict(KL=True, KLJ=T._kl_group(qpk), DI=DI, DIP=DI)
            for part in ((1,) if cfg.bwd_split else (0,)):
                for st in sorted({cfg.kl_bwd_stages, 2} if d == 128 else {cfg.kl_bwd_stages}):
                    kernels.append((f"bwd_kv+KL {tag} rows={qpk * GP} bn={bnk} part={part}", T._bwd_kv_kernel, bwd_types,
                                    dict(common, NSUB=B // bnk, BN=bnk, QP=qpk, DQ_ATOMIC=False, PART=part, **kl_c),
                                    cfg.bwd_warps, st))
        if (dt, d) != (torch.bfloat16, 128):
            continue
        kernels += [
            ("fwd_combine", T._fwd_combine_kernel, dict(OPART=P, LPART=F, OUT=P, LSE=F),
             dict(KSEL=K, NSUB=B // bnf, GP=GP, TQ=T._combine_tq(GP, DP), DP=DP), 8, 2),
            ("fwd_q", T._fwd_q_kernel, dict(io, OUT=P, LSE=F, qk_scale="fp32"),
             dict(KSEL=K, NSUB=B // bnq, BLOCK=B, BN=bnq, RP=GP, DP=DP, DOT_PREC=None, UPCAST=False), cfg.q_warps, cfg.q_stages),
            ("delta", T._delta_kernel, dict(OUT=P, DO=P, DELTA=F), dict(HP=HQ, TD=max(1, 8192 // (HQ * DP)), DP=DP), 4, 2),
            ("bwd_reduce", T._bwd_reduce_kernel, dict(DKPART=F, DVPART=F, DKACC=F, DVACC=F),
             dict(BLOCK=B, BN=min(32, B), DP=DP), 8, 2),
            ("dq_combine", T._dq_combine_kernel, dict(DQPART=F, DQ=P),
             dict(KSEL=K, NSUB=B // bnb, GP=GP, TQ=T._combine_tq(GP, DP), DP=DP), 8, 2),
        ]
    print(f"AOT compile for sm_{arch}a, triton {triton.__version__}, config {cfg}")
    bad = 0
    for name, fn, types, consts, nw, ns in kernels:
        is_ptr = lambda n: n.isupper() and n not in ("D", "G")  # noqa: E731  (kernel naming convention)
        sig = {n: ("constexpr" if n in consts else types.get(n, I if is_ptr(n) else "i32")) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in div16)}
        try:
            ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                                options=dict(num_warps=nw, num_stages=ns))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ck.asm["ptx"])
            log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
            os.unlink(f.name)
            regs = re.search(r"Used (\d+) registers", log)
            spill = re.search(r"(\d+) bytes spill stores", log)
            too_big = ck.metadata.shared > 232448  # sm_90 maximum dynamic shared memory per block
            bad += int(too_big)
            print(f"  {name:44s} warps={nw} stages={ns} regs={regs.group(1) if regs else '?'} "
                  f"spill={spill.group(1) if spill else '?'}B smem={ck.metadata.shared}B "
                  f"wgmma={len(re.findall('wgmma.mma_async', ck.asm['ptx']))}{'  SMEM OVER 227 KB' if too_big else ''}",
                  flush=True)
        except Exception as exc:
            bad += 1
            print(f"  {name:44s} COMPILE ERROR {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8K and 32K main branch, 8K op (about a minute)")
    p.add_argument("--lengths", default=None, help="main-branch lengths (default 8K,32K,128K; quick 8K,32K)")
    p.add_argument("--slice", type=int, default=256, help="query rows compared with the reference")
    p.add_argument("--index-backend", default="triton", choices=["triton", "reference"])
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tune", action="store_true", help="time kernel configs instead of checking")
    p.add_argument("--aot", action="store_true", help="compile for sm_90a without a GPU; print regs/spills")
    p.add_argument("--tune-L", type=parse_length, default=parse_length("128K"))
    p.add_argument("--tune-configs", default=DEFAULT_TUNE, help="';'-separated KernelConfig specs")
    args = p.parse_args()
    if args.aot:
        return aot_report()
    if args.cpu_smoke:
        cpu_smoke_layout()
    elif not torch.cuda.is_available():
        print("gpu_check_main needs a CUDA device", file=sys.stderr)
        return 2
    from msa_megatron.ops import triton_sparse_attn as T

    if args.tune:
        tune(args.tune_L, args.tune_configs)
        return 0
    T.POISON_OUTPUTS = True
    lengths = [parse_length(x) for x in (args.lengths or ("8K,32K" if args.quick else "8K,32K,128K")).split(",")]
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (interpreter)'} | torch {torch.__version__} | lengths {lengths} | "
          f"kernel config {T.default_config()}", flush=True)
    t0 = time.time()
    for L in lengths:
        guarded("main", L, lambda: check_main(L, args.slice, T))
    guarded("variants", lengths[0], lambda: check_variants(lengths[0], T))
    op_lengths = [lengths[0]] if args.quick else sorted({lengths[0], lengths[-1]})
    for L in op_lengths:
        guarded("op msa", L, lambda: check_op(L, args.slice, "msa", args.index_backend))
    guarded("op msa_warmup", lengths[0], lambda: check_op(lengths[0], args.slice, "msa_warmup", args.index_backend))
    if args.index_backend == "triton":
        for L in op_lengths:
            guarded("op msa kl_fused", L, lambda: check_op(L, args.slice, "msa", args.index_backend, kl_fused=True))
    print(f"\n| check | L | metric | value | tol | ok |\n|---|---|---|---|---|---|")
    for check, L, metric, value, tol, ok in ROWS:
        print(f"| {check} | {L} | {metric} | {value:.3g} | {tol:.3g} | {'ok' if ok else 'FAIL'} |")
    print(f"\n{len(ROWS) - len(FAILED)}/{len(ROWS)} checks passed in {time.time() - t0:.0f} s")
    for f in FAILED:
        print(f"FAIL: {f}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

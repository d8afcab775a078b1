"""The main-branch kernels (``ops/triton_sparse_attn.py``) and the whole op at the paper layout
(64 q / 4 KV heads, d 128, block 128, top-16), bf16, per-token random selections: the
comparisons of the former ``scripts/gpu_check_main.py`` (that script now runs these tests).
Every kernel output is NaN-poisoned.

The fp32 reference runs on a slice of S query rows (first, last and random positions, via
q_pos) and is compared with the kernels' full-length run on those rows (out, lse, dq of a row
depend only on that row). For dK/dV the backward runs again with dout zero outside the slice:
then dK/dV are exactly the slice's contribution (and dq must be 0 off the slice).

Tolerances (relative Frobenius error vs the fp32 reference on the same bf16 values): out 1e-2,
lse 1e-4, dq/dk/dv 2e-2; the op adds kl 1e-2, d_iq 3e-2, d_ik 3e-2, the entropy statistics 1e-3
(they inherit the main LSE's error) and >= 99% of (row, group) selections identical to
``naive.select`` (fp32 near-ties may differ); variants (deterministic bitwise, atomic dQ,
query-outer forward, 64-key backward tiles) 5e-3 against the default; fp32 inputs 1e-4.

Lengths: ``MSA_GPU_MAIN_LENGTHS`` (default 4096; "8K,32K,128K" for the long check), slice
``MSA_GPU_SLICE`` (default 256). The CPU subset runs the same code on a tiny layout under the
interpreter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from msa_megatron.ops import naive as R
from msa_megatron.config import MSAConfig
from tests.helpers import poisoned_outputs, random_block_selection

TOL = {"out": 1e-2, "lse": 1e-4, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "kl": 1e-2, "d_iq": 3e-2, "d_ik": 3e-2,
       "fp32": 1e-4, "same": 5e-3, "entropy": 1e-3}


@dataclass
class Layout:
    HQ: int
    HKV: int
    D: int
    DI: int
    B: int
    K: int
    DEV: str


PAPER = Layout(64, 4, 128, 128, 128, 16, "cuda")
TINY = Layout(4, 2, 32, 16, 16, 4, "cpu")
HQ = HKV = D = DI = B = K = 0
DEV = "cuda"


def use_layout(lay: Layout) -> None:
    """The checks below read the layout from module globals (as the script did)."""
    global HQ, HKV, D, DI, B, K, DEV
    HQ, HKV, D, DI, B, K, DEV = lay.HQ, lay.HKV, lay.D, lay.DI, lay.B, lay.K, lay.DEV


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Recorder:
    """(check, L, metric, value, tol, ok) rows; the test fails listing every failed row."""

    def __init__(self):
        self.rows, self.failed = [], []

    def __call__(self, check: str, L: int, metric: str, value: float, tol: float, ok=None) -> None:
        ok = (value <= tol) if ok is None else ok
        ok = bool(ok) and not math.isnan(value)
        self.rows.append((check, L, metric, value, tol, ok))
        if not ok:
            self.failed.append(f"{check} L={L} {metric}={value:.3g} (tol {tol:.3g})")

    def no_nan(self, check: str, L: int, **tensors) -> None:
        for name, t in tensors.items():
            n = int(torch.isnan(t.float()).sum())
            self(check, L, f"NaN in {name}", float(n), 0.0, ok=n == 0)

    def verdict(self) -> None:
        for check, L, metric, value, tol, ok in self.rows:
            print(f"| {check} | {L} | {metric} | {value:.3g} | {tol:.3g} | {'ok' if ok else 'FAIL'} |")
        assert not self.failed, "; ".join(self.failed)


record: Recorder = Recorder()


def no_nan(check, L, **tensors):
    record.no_nan(check, L, **tensors)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(shape, seed, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV, generator=gen(seed)) * scale).to(dtype)


def random_selection(L: int, seed: int) -> torch.Tensor:
    """[1, g, L, K] int32: own block + K-1 distinct random earlier blocks per (query, group)."""
    return random_block_selection(L, seed, HKV, B, K, DEV)


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
    from msa_megatron.bench.qouter import qouter_attention_fwd  # the query-outer baseline (out of ops/)

    oq, lq = qouter_attention_fwd(q, k, v, bidx, B, config=replace(cfg, fwd_impl="q"))
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



GPU_LENGTHS = [parse_length(x) for x in os.environ.get("MSA_GPU_MAIN_LENGTHS", "4096").split(",")]
SLICE = int(os.environ.get("MSA_GPU_SLICE", "256"))
LAYOUTS = [pytest.param(PAPER, L, SLICE, marks=pytest.mark.gpu, id=f"gpu-paper-L{L}") for L in GPU_LENGTHS] + [
    pytest.param(TINY, 200, 24, id="cpu-tiny-L200")]


@pytest.fixture
def recorder():
    global record
    record = Recorder()
    with poisoned_outputs():
        yield record


@pytest.mark.parametrize("lay,L,S", LAYOUTS)
def test_main_branch(recorder, lay, L, S):
    from msa_megatron.ops import triton_sparse_attn as T

    use_layout(lay)
    check_main(L, S, T)
    recorder.verdict()


@pytest.mark.parametrize("lay,L,S", LAYOUTS[:1] + [pytest.param(TINY, 200, 24, id="cpu-tiny-L200",
                                                               marks=pytest.mark.slow)])
def test_main_variants(recorder, lay, L, S):
    from msa_megatron.ops import triton_sparse_attn as T

    use_layout(lay)
    check_variants(L, T)
    recorder.verdict()


OP_CASES = [("msa", False), ("msa_warmup", False), ("msa", True)]


@pytest.mark.parametrize("mode,kl_fused", OP_CASES, ids=["msa", "msa_warmup", "msa-kl_fused"])
@pytest.mark.parametrize("lay,L,S", LAYOUTS[:1] + LAYOUTS[-1:])
def test_op_paper_layout(recorder, lay, L, S, mode, kl_fused):
    use_layout(lay)
    check_op(L, S, mode, os.environ.get("MSA_INDEX_BACKEND", "triton"), kl_fused=kl_fused)
    recorder.verdict()

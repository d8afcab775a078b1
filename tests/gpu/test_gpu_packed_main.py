"""Main-branch kernels and the op with packed documents (``doc_start``) on the GPU, against the
fp32 reference (docs/packed.md).

Kernels: paper layout (64 q / 4 KV heads, d 128, block 128, top-16), bf16, one packed sequence
of L tokens (``packed_doc_ids`` of test_gpu_packed_index.py: log-normal lengths plus a run of
documents shorter than a block), selection by the Triton index kernel with the same
``doc_start``; the KV-outer and union paths (fwd + bwd, and the fused KL of each) run on a
subset of query rows (q_pos, a third at document boundaries) so the fp32 reference fits.
Op: ``msa_attention_triton(doc_start=)`` in every mode at a small layout vs
``naive.msa_attention`` (fp32 reference on the bf16 values).

Tolerances: those of tests/gpu/test_gpu_main.py (out 1e-2, lse 1e-4, dq/dk/dv 2e-2, kl 1e-2,
d_iq/d_ik 3e-2, relative Frobenius norm). ``MSA_GPU_PACKED_LENGTHS`` (default 8192),
``MSA_GPU_INDEX_ROWS`` (default 128). Unmarked tests: the same code at a tiny layout on CPU
(interpreter), skipped when CUDA is present."""

from __future__ import annotations

import os

import pytest
import torch

from tests.gpu.test_gpu_index import PAPER, parse_length, rel
from tests.gpu.test_gpu_packed_index import packed_doc_ids
from tests.helpers import poisoned_outputs

TOL = {"out": 1e-2, "lse": 1e-4, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "kl": 1e-2, "d_iq": 3e-2, "d_ik": 3e-2}
TINY_MAIN = dict(hq=4, g=2, d=16, di=16, B=16, K=3)


def check_main(L: int, n_rows: int, seed: int, dev: str, layout: dict) -> list:
    """Returns the failed (path, metric, value, tol) rows; prints every row."""
    from msa_megatron.ops import naive as R
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as TU

    hq, g, d, di, B, K = (layout[x] for x in ("hq", "g", "d", "di", "B", "K"))
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, num_index_heads=g)
    gen = torch.Generator(device=dev).manual_seed(seed + L)
    bf = torch.bfloat16 if dev == "cuda" else torch.float32
    mk = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(bf)  # noqa: E731
    ds_all = R.doc_start_from_doc_ids(packed_doc_ids(L, B, gen, dev))  # [1, L]
    starts = torch.unique(ds_all)
    edge = torch.cat([starts, (starts - 1).clamp_min(0)])
    edge = edge[torch.randperm(edge.numel(), device=dev, generator=gen)[: n_rows // 3]]
    extra = torch.randperm(L, device=dev, generator=gen)[: max(0, n_rows - edge.numel())]
    rows = torch.sort(torch.unique(torch.cat([edge, extra]))).values
    n = rows.numel()
    ds = ds_all[:, rows]
    q, k, v, do = mk(1, n, hq, d), mk(1, L, g, d), mk(1, L, g, d), mk(1, n, hq, d)
    iq, ik = mk(1, n, g, di), mk(1, L, di)
    sel, ilse = TI.index_select(iq, ik, cfg, q_pos=rows, doc_start=ds)[:2]
    fails = []

    def record(path, metric, value, tol):
        ok = value <= tol
        print(f"| {path} | L={L} rows={n} | {metric} | {value:.3g} | {tol:.3g} | {'ok' if ok else 'FAIL'} |")
        if not ok:
            fails.append((path, metric, value, tol))

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ro, rl = R.sparse_attention(qf, kf, vf, sel, B, rows, doc_start=ds)
    rdq, rdk, rdv = torch.autograd.grad(ro, [qf, kf, vf], do.float())
    iq_r, ik_r = iq.float().requires_grad_(), ik.float().requires_grad_()
    terms = R.sparse_kl_terms(q.float(), k.float(), iq_r, ik_r, sel, cfg, rows, doc_start=ds)
    (terms.kl / terms.rows).backward()
    rkl = terms.kl.detach() / terms.rows
    fk = T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale)
    with poisoned_outputs():
        kc = T.KernelConfig(main_impl="kv")
        out, lse = T.sparse_attention_fwd(q, k, v, sel, B, rows, config=kc, doc_start=ds)
        dq, dk, dv, res = T.sparse_attention_bwd(do, q, k, v, out, lse, sel, B, rows, config=kc, kl=fk, doc_start=ds)
        uo, ul = TU.union_attention_fwd(q, k, v, sel, B, rows, config=kc, doc_start=ds)
        udq, udk, udv, ures = TU.union_attention_bwd(do, q, k, v, uo, ul, sel, B, rows, config=kc, kl=fk, doc_start=ds)
    for path, o, l_, g3, r in (("kv", out, lse, (dq, dk, dv), res), ("union", uo, ul, (udq, udk, udv), ures)):
        record(path, "out", rel(o, ro), TOL["out"])
        record(path, "lse", rel(l_, rl), TOL["lse"])
        for name, a, b in zip(("dq", "dk", "dv"), g3, (rdq, rdk, rdv)):
            record(path, name, rel(a, b), TOL[name])
        record(path + " fused KL", "kl", rel(r.kl, rkl), TOL["kl"])
        record(path + " fused KL", "d_iq", rel(r.d_iq, iq_r.grad), TOL["d_iq"])
        record(path + " fused KL", "d_ik", rel(r.d_ik, ik_r.grad), TOL["d_ik"])
    return fails


def check_op(dev: str, seed: int, L: int = 1024) -> list:
    from msa_megatron.ops import naive as R
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_op as OP

    gen = torch.Generator(device=dev).manual_seed(seed)
    B = 64 if dev == "cuda" else 16
    L = L if dev == "cuda" else 80
    hq, g, d, di = (8, 2, 64, 32) if dev == "cuda" else (4, 2, 16, 16)
    bf = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = MSAConfig(block_size=B, topk=4 if dev == "cuda" else 2, index_dim=di)
    ds = R.doc_start_from_doc_ids(packed_doc_ids(L, B, gen, dev)).expand(2, -1)
    fails = []
    for mode in ("dense", "msa_warmup", "msa"):
        mk = lambda *s: torch.randn(*s, device=dev, generator=gen).to(bf).requires_grad_()  # noqa: E731
        q, k, v, iq, ik = mk(2, L, hq, d), mk(2, L, g, d), mk(2, L, g, d), mk(2, L, g, di), mk(2, L, di)
        leaves = [q, k, v] + ([iq, ik] if mode != "dense" else [])
        out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode=mode, doc_start=ds)
        dout = torch.randn(out.shape, device=dev, generator=gen).to(bf)
        gr = torch.autograd.grad((out.float() * dout.float()).sum() + (aux.kl if aux.kl is not None else 0.0), leaves)
        fl = [x.detach().float().requires_grad_() for x in (q, k, v, iq, ik)]
        ro, raux = R.msa_attention(*fl, cfg, mode=mode, doc_start=ds)
        rleaves = fl[:3] + (fl[3:] if mode != "dense" else [])
        rgr = torch.autograd.grad((ro * dout.float()).sum() + (raux.kl if raux.kl is not None else 0.0), rleaves)
        errs = {"out": rel(out, ro)}
        errs.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "d_iq", "d_ik"), gr, rgr)})
        if mode != "dense":
            errs["kl"] = rel(aux.kl, raux.kl)
        for n, e in errs.items():
            ok = e <= TOL[n]
            print(f"| op {mode} | L={L} | {n} | {e:.3g} | {TOL[n]:.3g} | {'ok' if ok else 'FAIL'} |")
            if not ok:
                fails.append((mode, n, e))
    return fails


@pytest.mark.gpu
def test_gpu_packed_main_kernels():
    rows = int(os.environ.get("MSA_GPU_INDEX_ROWS", "128"))
    fails = []
    for s in os.environ.get("MSA_GPU_PACKED_LENGTHS", "8192").split(","):
        fails += check_main(parse_length(s), rows, seed=0, dev="cuda", layout=PAPER)
    assert not fails, fails


@pytest.mark.gpu
def test_gpu_packed_op():
    fails = check_op("cuda", seed=1)
    assert not fails, fails


def test_packed_main_cpu_subset():
    """The same code at a tiny layout through the interpreter (CPU suite only)."""
    assert not check_main(96, 24, seed=0, dev="cpu", layout=TINY_MAIN)


def test_packed_op_cpu_subset():
    assert not check_op("cpu", seed=1)

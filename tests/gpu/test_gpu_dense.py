"""The dense main branch (modes dense / msa_warmup) on each of its kernels, forced, against the
fp64 reference: torch's flash op (fp16/bf16, square causal), torch's memory-efficient op
(is_causal, and an explicit mask for q_pos / sq != sk), and the Triton kernel with the full
selection. Head dims 16..256, GQA 1..8, odd lengths; out, lse (natural log), d(q, k, v), with the
gradient taken twice from one retained graph.

Tolerances vs fp64 on the same rounded inputs: fp32 1e-4 (lse 1e-5); bf16 out/grads 3e-2 (P and
dS rounded to bf16 before the second matmul), lse 1e-4; fp16 out/grads 1e-2, lse 1e-4."""

import pytest
import torch

from msa_megatron.ops import naive as R
from tests.helpers import check_errors, poisoned_outputs, random_positions, rel_err

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(out=1e-4, lse=1e-5, grad=1e-4), BF16: dict(out=3e-2, lse=1e-4, grad=3e-2),
       F16: dict(out=1e-2, lse=1e-4, grad=1e-2)}

# (impl, dtype, b, T, hq, g, d, positions, seed)
GPU_CASES = [
    ("flash", BF16, 2, 78, 4, 1, 32, "default", 1),
    ("flash", F16, 1, 257, 8, 1, 16, "default", 2),
    ("flash", BF16, 1, 543, 16, 2, 128, "default", 3),
    ("flash", F16, 2, 94, 6, 3, 256, "default", 4),
    ("flash", BF16, 1, 192, 8, 8, 64, "prefix", 5),
    ("efficient", F32, 1, 94, 2, 1, 32, "default", 6),
    ("efficient", F32, 1, 543, 8, 2, 48, "default", 7),
    ("efficient", F32, 2, 257, 4, 4, 256, "default", 8),
    ("efficient", BF16, 1, 300, 8, 1, 128, "subset", 9),
    ("efficient", F16, 2, 257, 4, 2, 48, "suffix", 10),
    ("efficient", F32, 1, 192, 8, 1, 16, "subset", 11),
    ("triton", BF16, 1, 257, 8, 2, 64, "default", 12),
]
CPU_CASES = [("triton", F32, 1, 78, 4, 2, 16, "default", 1), ("triton", F32, 2, 90, 2, 1, 32, "subset", 2)]


def _id(c):
    return f"{c[0]}-{str(c[1])[6:]}-b{c[2]}T{c[3]}-{c[4]}q{c[5]}kv-d{c[6]}-{c[7]}"


PARAMS = ([pytest.param(*c, "cuda", marks=pytest.mark.gpu, id="gpu-" + _id(c)) for c in GPU_CASES]
          + [pytest.param(*c, "cpu", id="cpu-" + _id(c)) for c in CPU_CASES])


@pytest.mark.parametrize("impl,dtype,b,T,hq,g,d,pos,seed,dev", PARAMS)
def test_dense_impl_vs_reference(impl, dtype, b, T, hq, g, d, pos, seed, dev):
    from msa_megatron.ops import triton_op as OP

    sq, q_pos = T, None
    if pos == "subset":
        sq = T // 3
        q_pos = random_positions(sq, T, seed, dev)
    elif pos == "suffix":
        sq = T // 2
    elif pos == "prefix":
        sq = T // 2
        q_pos = torch.arange(sq, device=dev)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen).to(dev, dtype).requires_grad_()
               for s in ((b, sq, hq, d), (b, T, g, d), (b, T, g, d)))
    dout = torch.randn(b, sq, hq, d, generator=gen).to(dev, dtype)
    scale = d ** -0.5
    p = R._positions(q_pos, sq, T, q.device)
    with poisoned_outputs():
        out, lse = OP.dense_attention_triton(q, k, v, p, q_pos is None, scale, 16, impl=impl)
        g1 = torch.autograd.grad(out, [q, k, v], dout, retain_graph=True)
        g2 = torch.autograd.grad(out, [q, k, v], dout)
    f = [x.detach().double().requires_grad_() for x in (q, k, v)]
    r_out, r_lse = R.dense_attention(*f, q_pos, scale)
    rg = torch.autograd.grad(r_out, f, dout.double())
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq) and not lse.requires_grad
    t = TOL[dtype]
    errs = {"out": rel_err(out, r_out), "lse": rel_err(lse, r_lse)}
    tol = {"out": t["out"], "lse": t["lse"]}
    for n, a, a2, r in zip("qkv", g1, g2, rg):
        errs[f"d{n}"], errs[f"d{n} (2nd)"] = rel_err(a, r), rel_err(a2, r)
        tol[f"d{n}"] = tol[f"d{n} (2nd)"] = t["grad"]
    check_errors(errs, tol, _id((impl, dtype, b, T, hq, g, d, pos)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,pos,impl", [(BF16, 64, "default", "flash"), (F32, 32, "default", "efficient"),
                                              (BF16, 32, "subset", "efficient"), (F16, 48, "default", "flash")])
def test_auto_plan_on_cuda(dtype, d, pos, impl):
    """What impl=auto picks on this GPU for the common cases (the CPU table is in tests/ops)."""
    from msa_megatron.ops import triton_op as OP

    cap = torch.cuda.get_device_capability()
    square = pos == "default"
    assert OP.dense_plan("cuda", dtype, d, 100 if square else 30, 100, square, cap).impl == impl

"""The end-to-end MSA op on the Triton kernels (``msa_attention_triton``) vs
``reference.msa_attention``, on CPU through Triton's interpreter.

Checked per mode (dense / msa_warmup / msa) on fresh random fp32 inputs: out, lse, kl,
block_idx, entropy stats, and the gradients of loss = <out, dout> + c * kl w.r.t. q, k, v, iq,
ik, all within 2e-5 relative (IEEE fp32 dots); gradient isolation (the KL reaches only iq/ik,
the attention output only q/k/v); both index backends (the Triton one when
``ops/triton_index.py`` is in the checkout). With the Triton index backend the reference KL
functions are made to raise during the op call: the KL value, gradients and entropy stats
must all come from the kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from msa_megatron import reference as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_op as OP  # noqa: E402
from msa_megatron.ops import triton_sparse_attn as T  # noqa: E402

TOL = 2e-5
HAS_TRITON_INDEX = importlib.util.find_spec("msa_megatron.ops.triton_index") is not None
BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        not HAS_TRITON_INDEX, reason="msa_megatron/ops/triton_index.py (branch kernel-index) is not in this checkout")),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(b, sq, sk, hq, g, d, di, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).requires_grad_()  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, g, d), mk(b, sk, g, d), mk(b, sq, g, di), mk(b, sk, di)


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} called on the Triton index path")
    return fail


def run_both(mode, backend, b=1, sq=90, sk=None, hq=4, g=2, d=16, di=16, block=16, topk=3, q_pos=None, seed=0):
    sk = sk or sq
    q, k, v, iq, ik = inputs(b, sq, sk, hq, g, d, di, seed)
    cfg = MSAConfig(block_size=block, topk=topk, index_dim=di)
    r_out, r_aux = R.msa_attention(q, k, v, iq, ik, cfg, q_pos=q_pos, mode=mode)
    with pytest.MonkeyPatch.context() as mp:
        if backend == "triton":  # no reference KL pass on the Triton path (it was the slow entropy source)
            for name in ("sparse_kl_terms", "dense_kl_terms"):
                mp.setattr(R, name, _forbidden(name))
            mp.setattr(OP, "_kl_reference", _forbidden("_kl_reference"))
        out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, q_pos=q_pos, mode=mode, index_backend=backend)
    dout = torch.randn_like(r_out)
    leaves = [q, k, v, iq, ik]

    def grads(o, a):
        loss = (o * dout).sum() + (3.0 * a.kl if a.kl is not None else 0.0)
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    return (out, aux, grads(out, aux)), (r_out, r_aux, grads(r_out, r_aux))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "msa_warmup", "msa"])
def test_op_matches_reference(mode, backend):
    (out, aux, gr), (r_out, r_aux, r_gr) = run_both(mode, backend, seed={"dense": 1, "msa_warmup": 2, "msa": 3}[mode])
    assert not torch.isnan(out).any()
    errs = {"out": rel(out, r_out), "lse": rel(aux.lse, r_aux.lse)}
    names = ["dq", "dk", "dv", "d_iq", "d_ik"]
    for n, x, y in zip(names, gr, r_gr):
        if y is None:
            assert x is None or not x.abs().any(), f"{n}: the reference has no gradient here"
        else:
            errs[n] = rel(x, y)
    if mode == "dense":
        assert aux.kl is None and aux.block_idx is None and r_gr[3] is None
    else:
        assert torch.equal(aux.block_idx, r_aux.block_idx)
        errs["kl"] = rel(aux.kl, r_aux.kl)
        for key in ("index_entropy", "main_entropy"):
            errs[key] = rel(aux.stats[key], r_aux.stats[key])
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"{mode}/{backend}: relative errors above {TOL}: {bad} (all {errs})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_query_subset_and_groups(backend):
    # sq < sk with explicit positions, G = 4, batch 2.
    gen = torch.Generator().manual_seed(4)
    pos = torch.sort(torch.randperm(150, generator=gen)[:50]).values
    (out, aux, gr), (r_out, r_aux, r_gr) = run_both("msa", backend, b=2, sq=50, sk=150, hq=8, g=2, q_pos=pos, seed=4)
    errs = {"out": rel(out, r_out), "kl": rel(aux.kl, r_aux.kl)}
    errs.update({n: rel(aux.stats[n], r_aux.stats[n]) for n in ("index_entropy", "main_entropy")})
    errs.update({n: rel(x, y) for n, x, y in zip(["dq", "dk", "dv", "d_iq", "d_ik"], gr, r_gr)})
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_gradient_isolation():
    q, k, v, iq, ik = inputs(1, 64, 64, 4, 2, 16, 16, seed=8)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", index_backend="reference")
    g_kl = torch.autograd.grad(aux.kl, [q, k, v, iq, ik], allow_unused=True, retain_graph=True)
    assert all(x is None for x in g_kl[:3]), "the KL must not send gradient to q, k, v"
    assert g_kl[3] is not None and g_kl[3].abs().sum() > 0 and g_kl[4].abs().sum() > 0
    g_out = torch.autograd.grad(out.sum(), [q, k, v, iq, ik], allow_unused=True)
    assert g_out[3] is None and g_out[4] is None, "the attention output must not send gradient to iq, ik"
    assert all(x is not None and x.abs().sum() > 0 for x in g_out[:3])


def test_no_grad_and_recall():
    q, k, v, iq, ik = inputs(1, 64, 64, 4, 2, 16, 16, seed=9)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    with torch.no_grad():
        out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", compute_recall=True,
                                           index_backend="reference")
        r_out, r_aux = R.msa_attention(q, k, v, iq, ik, cfg, mode="msa", compute_recall=True)
    assert aux.kl.grad_fn is None and not aux.kl.requires_grad
    assert rel(out, r_out) < TOL and rel(aux.kl, r_aux.kl) < TOL
    assert abs(aux.stats["recall"].item() - r_aux.stats["recall"].item()) < 1e-6


def test_bf16_op():
    q, k, v, iq, ik = inputs(1, 80, 80, 4, 2, 32, 16, seed=10, dtype=torch.bfloat16)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", index_backend="reference")
    f = [x.detach().float() for x in (q, k, v, iq, ik)]
    r_out, r_aux = R.msa_attention(*f, cfg, mode="msa")
    assert out.dtype == torch.bfloat16 and torch.equal(aux.block_idx, r_aux.block_idx)
    assert rel(out, r_out) < 2e-2 and rel(aux.lse, r_aux.lse) < 1e-3 and rel(aux.kl, r_aux.kl) < 1e-3


def test_op_errors():
    q, k, v, iq, ik = inputs(1, 32, 32, 2, 1, 16, 16, seed=0)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    with pytest.raises(ValueError, match="mode"):
        OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="sparse")
    with pytest.raises(ValueError, match="needs the index branch"):
        OP.msa_attention_triton(q, k, v, None, None, cfg, mode="msa")
    with pytest.raises(ValueError, match="index backend"):
        OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", index_backend="cuda")
    with pytest.raises(ValueError, match="index heads"):
        OP.msa_attention_triton(q, k, v, iq.expand(-1, -1, 2, -1), ik, cfg, mode="msa", index_backend="reference")


def test_op_accepts_precomputed_selection():
    """Context parallelism selects first (ops.msa_select), then runs the op with block_idx."""
    import msa_megatron.reference as R
    from msa_megatron import MSAConfig
    from msa_megatron.ops.triton_op import msa_attention_triton

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 70, 4, 16), torch.randn(1, 70, 2, 16), torch.randn(1, 70, 2, 16)
    iq, ik = torch.randn(1, 70, 2, 16, requires_grad=True), torch.randn(1, 70, 16, requires_grad=True)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    blk = R.select(iq.detach(), ik.detach(), cfg)
    out, aux = msa_attention_triton(q, k, v, iq, ik, cfg, block_idx=blk)
    aux.kl.backward()  # main_impl auto -> union path: the KL value is filled in by the backward
    ref, raux = R.msa_attention(q, k, v, iq, ik, cfg, block_idx=blk)
    assert torch.equal(aux.block_idx, blk)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(aux.kl, raux.kl, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block_idx must be int32"):
        msa_attention_triton(q, k, v, iq, ik, cfg, block_idx=blk.long())


@pytest.mark.skipif(not HAS_TRITON_INDEX, reason="kl_fused needs msa_megatron/ops/triton_index.py")
def test_op_fused_kl_matches_reference(caplog):
    """kernel_config kl_fused=1: the KL runs inside the main backward. Before that backward
    aux.kl and the stats are NaN placeholders (never a stale or made-up value); after it they
    and every gradient match the reference (fp32, TOL). Batch 2, G = 4, a q_pos subset, row
    tiles of 4 positions (student groups over 4 tiles). The path is logged once."""
    gen = torch.Generator().manual_seed(11)
    pos = torch.sort(torch.randperm(100, generator=gen)[:40]).values
    q, k, v, iq, ik = inputs(2, 40, 100, 8, 2, 16, 16, seed=11)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    kc = T.KernelConfig.from_spec("kl_fused=1,bwd_rows=16")
    r_out, r_aux = R.msa_attention(q, k, v, iq, ik, cfg, q_pos=pos, mode="msa")
    OP._announced.discard("kl-fused")
    with caplog.at_level("WARNING", logger="msa_megatron.ops"), pytest.MonkeyPatch.context() as mp:
        for name in ("sparse_kl_terms", "dense_kl_terms"):
            mp.setattr(R, name, _forbidden(name))
        mp.setattr(OP._index_module(), "sparse_kl_backward", _forbidden("sparse_kl_backward"))
        out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, q_pos=pos, mode="msa", kernel_config=kc)
        assert torch.isnan(aux.kl) and all(torch.isnan(aux.stats[n]) for n in ("index_entropy", "main_entropy"))
        dout = torch.randn_like(out)
        leaves = [q, k, v, iq, ik]
        gr = torch.autograd.grad((out * dout).sum() + 3.0 * aux.kl, leaves)
    assert sum("fused into the main backward" in r.getMessage() for r in caplog.records) == 1
    r_gr = torch.autograd.grad((r_out * dout).sum() + 3.0 * r_aux.kl, leaves)
    errs = {"out": rel(out, r_out), "lse": rel(aux.lse, r_aux.lse), "kl": rel(aux.kl, r_aux.kl)}
    errs.update({n: rel(aux.stats[n], r_aux.stats[n]) for n in ("index_entropy", "main_entropy")})
    errs.update({n: rel(x, y) for n, x, y in zip(["dq", "dk", "dv", "d_iq", "d_ik"], gr, r_gr)})
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all {errs})"
    # The separate kernel stays the path without a backward (the value is needed now), for the
    # dense-teacher warmup and by default; the reference index backend cannot fuse.
    assert OP._kl_path("msa", "triton", False, kc) == "separate"
    assert OP._kl_path("msa_warmup", "triton", True, kc) == "separate"
    assert OP._kl_path("msa", "triton", True, T.KernelConfig()) == "separate"
    assert OP._kl_path("msa", "reference", True, T.KernelConfig()) == "separate"
    with pytest.raises(ValueError, match="kl_fused=1 needs the Triton index backend"):
        OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", kernel_config=kc, index_backend="reference")

"""Sparse main-branch Triton kernels vs the pure-PyTorch reference, on CPU through Triton's
interpreter (tiny sizes: block 16, d 16-32, a few hundred tokens).

Tolerances: inputs in fp32 -> the kernels run IEEE fp32 dots, so out/lse/dq/dk/dv must match
the fp32 reference to 2e-5 relative (Frobenius norm); bf16 inputs (upcast for the dots under
the interpreter; bf16 partial outputs and bf16 P / dS roundings as on the GPU) must match the
fp32 reference run on the same bf16 values to 2e-2, fp16 to 5e-3. Every output buffer is
NaN-poisoned before the kernels run, so an unwritten element fails the test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_sparse_attn as T  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(b, sq, sk, hq, g, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, sk, g, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, sk, g, d, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(b, sq, hq, d, generator=gen).to(dtype)
    return q, k, v, do


def selection(b, sq, sk, g, block, topk, q_pos, seed, di=16):
    gen = torch.Generator().manual_seed(seed + 1)
    iq, ik = torch.randn(b, sq, g, di, generator=gen), torch.randn(b, sk, di, generator=gen)
    return R.select(iq, ik, MSAConfig(block_size=block, topk=topk, index_dim=di), q_pos)


def reference_grads(q, k, v, do, block_idx, block, q_pos, dense=False):
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    if dense:
        out, lse = R.dense_attention(qf, kf, vf, q_pos)
    else:
        out, lse = R.sparse_attention(qf, kf, vf, block_idx, block, q_pos)
    grads = torch.autograd.grad(out, [qf, kf, vf], do.float())
    return out.detach(), lse, grads


def check(q, k, v, do, block_idx, block, q_pos=None, config=None, deterministic=True, dense_too=False, fn=None):
    tol = TOL[q.dtype]
    # these tests are about the KV-outer kernels: pin them (tests/ops/test_triton_union.py covers main_impl=union)
    config = replace(config or T.KernelConfig(), main_impl="kv")
    fn = fn or T.sparse_attention
    out, lse = fn(q, k, v, block_idx, block, q_pos, config=config, deterministic=deterministic)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], do)
    for t in (out, lse, dq, dk, dv):
        assert not torch.isnan(t).any(), "a kernel left an output element unwritten (NaN poison) or produced NaN"
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and dq.dtype == q.dtype and dk.dtype == k.dtype
    refs = [reference_grads(q, k, v, do, block_idx, block, q_pos)]
    if dense_too:
        refs.append(reference_grads(q, k, v, do, block_idx, block, q_pos, dense=True))
    for r_out, r_lse, (r_dq, r_dk, r_dv) in refs:
        errs = dict(out=rel(out, r_out), lse=rel(lse, r_lse), dq=rel(dq, r_dq), dk=rel(dk, r_dk), dv=rel(dv, r_dv))
        bad = {n: e for n, e in errs.items() if not e <= tol}
        assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return out, lse, dq, dk, dv


@pytest.mark.parametrize(
    "b,sq,hq,g,d,K,dtype",
    [
        (2, 173, 4, 2, 32, 4, torch.float32),  # G=2, batch 2, odd length (partial last block)
        (1, 211, 4, 4, 16, 3, torch.float32),  # G=1
        (1, 150, 8, 2, 32, 5, torch.float32),  # G=4
        (2, 131, 4, 1, 32, 4, torch.bfloat16),  # G=4 bf16
        (1, 97, 4, 2, 16, 3, torch.float16),  # fp16
    ],
)
def test_matches_reference(b, sq, hq, g, d, K, dtype):
    q, k, v, do = make(b, sq, sq, hq, g, d, dtype, seed=sq)
    bidx = selection(b, sq, sq, g, 16, K, None, seed=sq)
    assert (bidx >= 0).sum(-1).max() == K  # the selection really is sparse here
    check(q, k, v, do, bidx, 16)


def test_full_budget_equals_dense():
    # K >= number of blocks: every visible block is selected -> dense causal attention.
    b, s, hq, g, d = 1, 120, 4, 2, 16
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=3)
    bidx = selection(b, s, s, g, 16, 12, None, seed=3)
    assert math.ceil(s / 16) <= 12
    check(q, k, v, do, bidx, 16, dense_too=True)


@pytest.mark.parametrize("sorted_pos", [True, False])
def test_query_subset_positions(sorted_pos):
    # sq < sk with explicit positions (context parallelism passes non-monotonic ones).
    b, sq, sk, hq, g, d = 2, 60, 190, 4, 2, 16
    gen = torch.Generator().manual_seed(11)
    pos = torch.randperm(sk, generator=gen)[:sq]
    pos = torch.sort(pos).values if sorted_pos else pos
    q, k, v, do = make(b, sq, sk, hq, g, d, torch.float32, seed=12)
    bidx = selection(b, sq, sk, g, 16, 4, pos, seed=12)
    check(q, k, v, do, bidx, 16, q_pos=pos)


def test_default_positions_with_fewer_queries():
    b, sq, sk, hq, g, d = 1, 40, 100, 4, 2, 16
    q, k, v, do = make(b, sq, sk, hq, g, d, torch.float32, seed=5)
    check(q, k, v, do, selection(b, sq, sk, g, 16, 3, None, seed=5), 16)


def test_arbitrary_block_lists():
    # Unsorted slots, -1 anywhere, repeated blocks (counted twice, as the reference does).
    b, s, hq, g, d, K, B = 1, 100, 4, 2, 16, 5, 16
    gen = torch.Generator().manual_seed(21)
    own = (torch.arange(s) // B).view(1, 1, s, 1).expand(b, g, s, 1)
    rnd = (torch.rand(b, g, s, K - 1, generator=gen) * (own + 1)).long()
    rnd = torch.where(torch.rand(b, g, s, K - 1, generator=gen) < 0.3, torch.full_like(rnd, -1), rnd)
    bidx = torch.cat([rnd[..., :2], own, rnd[..., 2:]], -1).to(torch.int32)
    assert (bidx == -1).any() and (bidx[..., 0] >= 0).any()
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=22)
    check(q, k, v, do, bidx, B)


def test_chunks_and_split_blocks():
    # Tiny partial budget and work items -> several query chunks and hot blocks split over
    # several programs (partial dK/dV reduced by the second kernel).
    b, s, hq, g, d, K = 1, 190, 4, 2, 16, 4
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=7)
    bidx = selection(b, s, s, g, 16, K, None, seed=7)
    cfg = T.KernelConfig(item_pairs=24, chunk_queries=64, fwd_rows=32, bwd_rows=16)
    plan = T.build_plan(bidx, s, 16, T.partial_bytes_per_pos(q, g, K, 16, bwd=True, config=cfg), cfg)
    last = plan.chunks[-1]
    assert len(plan.chunks) == 3 and last.t1 - last.t0 < last.cq  # last chunk padded
    assert sum(c.n_split_segs for c in plan.chunks) > 0
    check(q, k, v, do, bidx, 16, config=cfg)
    # the memory budget alone also cuts chunks
    cfg2 = T.KernelConfig(partial_bytes=60 * T.partial_bytes_per_pos(q, g, K, 16, bwd=True))
    assert len(T.build_plan(bidx, s, 16, T.partial_bytes_per_pos(q, g, K, 16, bwd=True), cfg2).chunks) == 4


@pytest.mark.parametrize("block,spec", [(48, ""), (32, "fwd_block_n=16,bwd_block_n=16,bwd_split=1,dq_partial_lowp=1")])
def test_block_sub_tiles_and_variants(block, spec):
    # block_size not a power of 2 (48 -> 3 sub-tiles of 16); forced 16-key sub-tiles with the
    # split backward (dV and dK+dQ launches) and low-precision dQ partials.
    b, s, hq, g, d = 1, 170, 4, 2, 16
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=block)
    bidx = selection(b, s, s, g, block, 2, None, seed=block)
    check(q, k, v, do, bidx, block, config=T.KernelConfig.from_spec(spec))


def test_query_outer_forward():
    """The query-outer baseline (msa_megatron/bench/qouter.py, issue 16: out of ops/) + the
    production backward; ops itself refuses fwd_impl='q' with a pointer to it."""
    from msa_megatron.bench.qouter import qouter_attention

    b, s, hq, g, d = 1, 40, 4, 2, 16
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=9)
    sel = selection(b, s, s, g, 16, 3, None, seed=9)
    check(q, k, v, do, sel, 16, config=T.KernelConfig(fwd_impl="q"), fn=qouter_attention)
    with pytest.raises(ValueError, match="KernelConfig.fwd_impl='q'.*msa_megatron.bench.qouter"):
        T.sparse_attention(q, k, v, sel, 16, config=T.KernelConfig(fwd_impl="q"))


def test_atomic_dq_and_determinism():
    b, s, hq, g, d = 1, 120, 4, 2, 16
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=13)
    bidx = selection(b, s, s, g, 16, 3, None, seed=13)
    check(q, k, v, do, bidx, 16, deterministic=False)
    out, lse = T.sparse_attention_fwd(q.detach(), k.detach(), v.detach(), bidx, 16)
    g1 = T.sparse_attention_bwd(do, q.detach(), k.detach(), v.detach(), out, lse, bidx, 16)
    g2 = T.sparse_attention_bwd(do, q.detach(), k.detach(), v.detach(), out, lse, bidx, 16)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2)), "deterministic backward is not bitwise reproducible"


def test_softmax_scale_and_functional_api():
    b, s, hq, g, d = 1, 64, 2, 1, 16
    q, k, v, do = make(b, s, s, hq, g, d, torch.float32, seed=17)
    bidx = selection(b, s, s, g, 16, 2, None, seed=17)
    out, lse = T.sparse_attention_fwd(q.detach(), k.detach(), v.detach(), bidx, 16, softmax_scale=0.37)
    r_out, r_lse = R.sparse_attention(q.detach(), k.detach(), v.detach(), bidx, 16, softmax_scale=0.37)
    assert rel(out, r_out) < 2e-5 and rel(lse, r_lse) < 2e-5


def test_empty_queries():
    q = torch.zeros(1, 0, 4, 16, requires_grad=True)
    k, v = torch.randn(1, 32, 2, 16, requires_grad=True), torch.randn(1, 32, 2, 16, requires_grad=True)
    out, lse = T.sparse_attention(q, k, v, torch.zeros(1, 2, 0, 3, dtype=torch.int32), 16)
    assert out.shape == (1, 0, 4, 16) and lse.shape == (1, 4, 0)
    out.sum().backward()
    assert k.grad is not None and not k.grad.any()


def test_clear_errors():
    q, k, v, _ = make(1, 32, 32, 2, 1, 16, torch.float32, seed=0)
    bidx = selection(1, 32, 32, 1, 16, 2, None, seed=0)
    with pytest.raises(TypeError, match="int32"):
        T.sparse_attention_fwd(q, k, v, bidx.long(), 16)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        T.sparse_attention_fwd(q, k, v, bidx + 5, 16)
    with pytest.raises(ValueError, match="head dim"):
        T.sparse_attention_fwd(q[..., :12], k[..., :12], v[..., :12], bidx, 16)
    with pytest.raises(TypeError, match="dtype"):
        T.sparse_attention_fwd(q.double(), k.double(), v.double(), bidx, 16)
    with pytest.raises(ValueError, match="KernelConfig.fwd_impl"):
        T.KernelConfig(fwd_impl="bogus")
    with pytest.raises(ValueError, match="unknown field"):
        T.KernelConfig.from_spec("fwd_rowz=64")


# ----------------------------------------------------------------------------- fused indexer KL
# (b, sq, sk, hq, g, d, di, block, K, dtype, q_pos kind, kernel config): J = student groups of
# >= 16 pairs over several row tiles (bwd_rows=16 -> 4 pairs per tile at G = 4) or one tile;
# chunks + split items; the split backward with 16-key sub-tiles of a 48-token block.
FUSED_CASES = [
    (1, 100, 100, 8, 2, 16, 16, 16, 3, torch.float32, "default", "bwd_rows=16"),
    (2, 45, 130, 4, 2, 32, 16, 16, 4, torch.bfloat16, "subset", "partial_bytes=30000,item_pairs=16"),
    (1, 110, 110, 3, 3, 16, 32, 48, 2, torch.float32, "default", "bwd_split=1,bwd_block_n=16"),
]
FUSED_KL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}  # as the separate KL kernel's tests
FUSED_ENT_RTOL = 1e-5


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{str(c[9])[6:]}-G{c[3] // c[4]}-{c[10]}-{c[11]}")
def test_fused_kl_backward_matches_reference(case):
    """sparse_attention_bwd(kl=FusedKL): the KL value, its d_iq / d_ik and both entropy stats
    match naive.sparse_kl_terms (+ autograd), and dq / dk / dv are bit-identical to the
    backward without the KL (the fused part only reads the tile's P)."""
    b, sq, sk, hq, g, d, di, block, K, dtype, qk, spec = case
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # fresh inputs every run; pytest shows it on failure
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.sort(torch.randperm(sk, generator=gen)[:sq]).values if qk == "subset" else None
    q, k, v, do = (x.detach() for x in make(b, sq, sk, hq, g, d, dtype, int(torch.randint(1 << 30, (1,), generator=gen))))
    iq, ik = torch.randn(b, sq, g, di, generator=gen).to(dtype), torch.randn(b, sk, di, generator=gen).to(dtype)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = R.select(iq.float(), ik.float(), cfg, q_pos)
    ilse = R.selected_index_lse(iq.float(), ik.float(), sel, cfg, q_pos)
    kc = T.KernelConfig.from_spec(spec)
    out, lse = T.sparse_attention_fwd(q, k, v, sel, block, q_pos, config=kc)
    plain = T.sparse_attention_bwd(do, q, k, v, out, lse, sel, block, q_pos, config=kc)
    dq, dk, dv, res = T.sparse_attention_bwd(do, q, k, v, out, lse, sel, block, q_pos, config=kc,
                                             kl=T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale))
    for name, a, p in zip(("dq", "dk", "dv"), (dq, dk, dv), plain):
        assert torch.equal(a, p), f"{name} changed by the fused KL"
    iq_r, ik_r = iq.float().requires_grad_(), ik.float().requires_grad_()
    terms = R.sparse_kl_terms(q.float(), k.float(), iq_r, ik_r, sel, cfg, q_pos)
    (terms.kl / terms.rows).backward()
    ref_kl = terms.kl.item() / terms.rows
    assert abs(res.kl.item() - ref_kl) <= 1e-4 * max(1.0, abs(ref_kl)), (res.kl.item(), ref_kl)
    ref_stats = {"index_entropy": terms.index_entropy.item() / terms.rows,
                 "main_entropy": terms.main_entropy.item() / (terms.rows * (hq // g))}
    for key, r in ref_stats.items():
        assert abs(res.stats[key].item() - r) <= FUSED_ENT_RTOL * max(1.0, abs(r)), (key, res.stats[key].item(), r)
    assert res.d_iq.dtype == torch.float32 and res.d_iq.shape == iq.shape and res.d_ik.shape == ik.shape
    assert rel(res.d_iq, iq_r.grad) <= FUSED_KL_RTOL[dtype], rel(res.d_iq, iq_r.grad)
    assert rel(res.d_ik, ik_r.grad) <= FUSED_KL_RTOL[dtype], rel(res.d_ik, ik_r.grad)


def test_fused_kl_input_errors():
    q, k, v, do = (x.detach() for x in make(1, 20, 20, 2, 1, 16, torch.float32, 0))
    sel = selection(1, 20, 20, 1, 16, 2, None, 0)
    out, lse = T.sparse_attention_fwd(q, k, v, sel, 16)
    iq, ik, ilse = torch.randn(1, 20, 1, 16), torch.randn(1, 20, 16), torch.zeros(1, 1, 20)
    bad = [(T.FusedKL(iq[:, :10], ik, ilse, 0.25), "FusedKL.iq"), (T.FusedKL(iq, ik[..., :8], ilse, 0.25), "FusedKL.ik"),
           (T.FusedKL(iq, ik, ilse.double(), 0.25), "index_lse"), (T.FusedKL(iq, ik, ilse, 0.25, normalizer=0), "normalizer")]
    for kl, msg in bad:
        with pytest.raises(ValueError, match=msg):
            T.sparse_attention_bwd(do, q, k, v, out, lse, sel, 16, kl=kl)
    with pytest.raises(TypeError, match="q's dtype"):
        T.sparse_attention_bwd(do, q, k, v, out, lse, sel, 16, kl=T.FusedKL(iq.bfloat16(), ik.bfloat16(), ilse, 0.25))


# ----------------------------------------------------------------------------- v2 split backward / memory hygiene
def test_dkdv_only_backward_is_bit_identical():
    """compute_dq=False (the KV-outer half of the v2 split backward): dK/dV bit-identical to
    the full backward's, no dQ, and delta returned on request."""
    b, s, hq, g, d = 1, 100, 8, 2, 16
    q, k, v, do = (x.detach() for x in make(b, s, s, hq, g, d, torch.float32, seed=31))
    bidx = selection(b, s, s, g, 16, 3, None, seed=31)
    out, lse = T.sparse_attention_fwd(q, k, v, bidx, 16)
    full = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16)
    dq, dk, dv, delta = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16, compute_dq=False, return_delta=True)
    assert dq is None and torch.equal(dk, full[1]) and torch.equal(dv, full[2])
    ref_delta = (out.float() * do.float()).sum(-1).transpose(1, 2)
    assert rel(delta, ref_delta) < 1e-6
    with pytest.raises(ValueError, match="compute_dq"):
        T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16, compute_dq=False,
                               kl=T.FusedKL(torch.zeros(b, s, g, 16), torch.zeros(b, s, 16), torch.zeros(b, g, s), 0.25))


def test_backward_resizes_forward_plan_at_use_time(monkeypatch):
    """A plan cut for a large budget (as in a forward with much free memory) is rebuilt in the
    backward when its dQ partial buffers exceed the budget at that time (the 1M OOM fix)."""
    b, s, hq, g, d, K = 1, 120, 4, 2, 16, 3
    q, k, v, do = (x.detach() for x in make(b, s, s, hq, g, d, torch.float32, seed=33))
    bidx = selection(b, s, s, g, 16, K, None, seed=33)
    per_pos = T.partial_bytes_per_pos(q, g, K, 16, fwd=False, bwd=True)
    big = T.build_plan(bidx, s, 16, per_pos, T.KernelConfig(partial_bytes=per_pos * s))
    assert len(big.chunks) == 1
    small = T.KernelConfig(partial_bytes=per_pos * 40)
    assert not T._plan_fits(big, per_pos, q.device, small) and T._plan_fits(big, per_pos, q.device, T.KernelConfig())
    out, lse = T.sparse_attention_fwd(q, k, v, bidx, 16)
    ref = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16)
    built = []
    orig = T.build_plan
    monkeypatch.setattr(T, "build_plan", lambda *a, **kw: built.append(orig(*a, **kw)) or built[-1])
    got = T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16, plan=big, config=small)
    assert len(built) == 1 and len(built[0].chunks) == 3  # rebuilt for the budget at use time
    for a, r in zip(got, ref):
        assert rel(a, r) < 1e-6
    T.sparse_attention_bwd(do, q, k, v, out, lse, bidx, 16, plan=big)  # fits: reused, not rebuilt
    assert len(built) == 1

"""v2 main branch (union tile: ops/triton_union.py) vs the pure-PyTorch reference, on CPU
through Triton's interpreter (tiny sizes), plus GPU variants at realistic sizes.

Tolerances (relative Frobenius norm unless said): fp32 inputs run IEEE fp32 dots, so out / lse
/ dq / dk / dv must match the fp32 reference to 2e-5; bf16 inputs (upcast for the dots under
the interpreter; bf16 P / dS roundings as on the GPU) must match the fp32 reference on the
same bf16 values to 2e-2. KL value: 1e-4 x max(1, |kl|); d_iq / d_ik: 1e-4 (fp32) and 1.5e-2
(bf16: dS_student is rounded to bf16 as on the GPU); entropies 1e-5 relative; as the fused-KL
tests of the KV-outer kernel. Outputs are NaN-poisoned before the kernels run, so an element
a kernel fails to write fails the test. The union path's dQ, d_iq, d_ik and KL are
deterministic: two runs must be bit-equal.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_sparse_attn as T  # noqa: E402
from msa_megatron.ops import triton_union as U  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
KL_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}
UNION = T.KernelConfig(main_impl="union")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tensors(b, sq, sk, hq, g, d, di, dtype, seed, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, device=device).to(dtype)

    return rn(b, sq, hq, d), rn(b, sk, g, d), rn(b, sk, g, d), rn(b, sq, hq, d), rn(b, sq, g, di), rn(b, sk, di)


def selection(kind, b, g, sq, sk, block, K, q_pos, seed, iq=None, ik=None, cfg=None):
    """block_idx [b, g, sq, K] int32, duplicate-free per row:
    index  - reference top-K on random index scores (own block forced; -1 while < K visible);
    tile   - tile-shared: every position of a key block's window gets that window's blocks;
    pad    - random visible blocks with random -1 slots, unsorted;
    dense  - every visible block (K >= number of blocks: dense causal attention)."""
    gen = torch.Generator().manual_seed(seed)
    pos = q_pos if q_pos is not None else torch.arange(sk - sq, sk)
    nb = math.ceil(sk / block)
    own = (pos // block).long()
    if kind == "index":
        return R.select(iq.float(), ik.float(), cfg, q_pos)
    if kind == "dense":
        assert K >= nb
        blk = torch.arange(K)
        sel = torch.where(blk[None, :] <= own[:, None], blk[None, :], -1)
        return sel.to(torch.int32).expand(b, g, -1, -1).contiguous()
    if kind == "tile":  # one score row per window (own block), shared by its positions
        sc = torch.rand(b, g, nb, nb, generator=gen)[:, :, own]
    else:
        sc = torch.rand(b, g, sq, nb, generator=gen)
    blk = torch.arange(nb)
    sc = sc.masked_fill(blk > own[:, None], -1.0).masked_fill(blk == own[:, None], 2.0)
    val, idx = torch.topk(sc, min(K, nb), dim=-1)
    idx = torch.where(val >= 0, idx, -1)
    if kind == "pad":
        drop = (torch.rand(idx.shape, generator=gen) < 0.3) & (idx != own[:, None])
        idx = torch.where(drop, -1, idx)
        idx = idx[..., torch.randperm(idx.shape[-1], generator=gen)]
    if idx.shape[-1] < K:
        idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
    return idx.to(torch.int32).contiguous()


def run_union(q, k, v, do, iq, ik, sel, block, q_pos, cfg, kc=UNION):
    ilse = R.selected_index_lse(iq.float(), ik.float(), sel, cfg, q_pos)
    out, lse = U.union_attention_fwd(q, k, v, sel, block, q_pos, config=kc)
    dq, dk, dv, res = U.union_attention_bwd(do, q, k, v, out, lse, sel, block, q_pos, config=kc,
                                            kl=T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale))
    return out, lse, dq, dk, dv, res


def check_against_reference(q, k, v, do, iq, ik, sel, block, q_pos, cfg, kc=UNION, with_kl=True):
    dtype = q.dtype
    out, lse, dq, dk, dv, res = run_union(q, k, v, do, iq, ik, sel, block, q_pos, cfg, kc)
    for name, t in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, d_iq=res.d_iq, d_ik=res.d_ik).items():
        assert not torch.isnan(t).any(), f"{name}: unwritten element (NaN poison) or NaN"
    qf, kf, vf = (x.detach().float().clone().requires_grad_() for x in (q, k, v))
    r_out, r_lse = R.sparse_attention(qf, kf, vf, sel, block, q_pos)
    r_dq, r_dk, r_dv = torch.autograd.grad(r_out, [qf, kf, vf], do.float())
    errs = dict(out=rel(out, r_out), lse=rel(lse, r_lse), dq=rel(dq, r_dq), dk=rel(dk, r_dk), dv=rel(dv, r_dv))
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all: {errs})"
    if not with_kl:
        return res
    iq_r, ik_r = (x.detach().float().clone().requires_grad_() for x in (iq, ik))
    terms = R.sparse_kl_terms(q.float(), k.float(), iq_r, ik_r, sel, cfg, q_pos)
    (terms.kl / terms.rows).backward()
    ref_kl = terms.kl.item() / terms.rows
    assert abs(res.kl.item() - ref_kl) <= 1e-4 * max(1.0, abs(ref_kl)), (res.kl.item(), ref_kl)
    G = q.shape[2] // k.shape[2]
    ref_stats = {"index_entropy": terms.index_entropy.item() / terms.rows,
                 "main_entropy": terms.main_entropy.item() / (terms.rows * G)}
    for key, r in ref_stats.items():
        assert abs(res.stats[key].item() - r) <= 1e-5 * max(1.0, abs(r)), (key, res.stats[key].item(), r)
    assert rel(res.d_iq, iq_r.grad) <= KL_GRAD_TOL[dtype], rel(res.d_iq, iq_r.grad)
    assert rel(res.d_ik, ik_r.grad) <= KL_GRAD_TOL[dtype], rel(res.d_ik, ik_r.grad)
    return res


# (b, sq, sk, hq, g, d, di, block, K, dtype, selection kind, q_pos kind)
CASES = [
    (1, 83, 83, 4, 4, 16, 16, 16, 3, torch.float32, "index", None),  # G=1, odd length
    (2, 71, 71, 4, 2, 16, 16, 32, 2, torch.bfloat16, "tile", None),  # G=2 bf16, batch 2, tile-shared
    (1, 90, 90, 8, 2, 32, 16, 16, 4, torch.float32, "pad", None),  # G=4, -1 padding, unsorted slots
    (1, 45, 130, 8, 1, 16, 32, 16, 3, torch.bfloat16, "index", "subset"),  # G=8, q_pos (sq < sk)
    (1, 77, 77, 4, 2, 16, 16, 64, 2, torch.float32, "dense", None),  # block 64, K >= nb: dense
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[9])[6:]}-G{c[3] // c[4]}-B{c[7]}-{c[10]}-{c[11]}")
def test_union_matches_reference(case):
    b, sq, sk, hq, g, d, di, block, K, dtype, kind, qk = case
    seed = sq * 31 + hq
    q_pos = torch.sort(torch.randperm(sk, generator=torch.Generator().manual_seed(seed))[:sq]).values \
        if qk == "subset" else None
    q, k, v, do, iq, ik = tensors(b, sq, sk, hq, g, d, di, dtype, seed)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = selection(kind, b, g, sq, sk, block, K, q_pos, seed, iq, ik, cfg)
    check_against_reference(q, k, v, do, iq, ik, sel, block, q_pos, cfg)


def test_unsorted_positions_several_chunks_and_heavy_order():
    # Context-parallel style non-monotonic q_pos; a tiny dS budget -> several KL chunks (the
    # owner-side d_ik pass adds chunk by chunk); both launch orders; 32-key steps of a 64 block.
    b, sq, sk, hq, g, d, di, block, K = 1, 50, 150, 4, 2, 16, 16, 64, 2
    q_pos = torch.randperm(sk, generator=torch.Generator().manual_seed(3))[:sq]
    q, k, v, do, iq, ik = tensors(b, sq, sk, hq, g, d, di, torch.float32, 4)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = selection("index", b, g, sq, sk, block, K, q_pos, 4, iq, ik, cfg)
    for items in (2, 0):  # d_ik work items of <= 2 union entries (hot blocks split + ordered reduce) / one per block
        kc = T.KernelConfig(main_impl="union", partial_bytes=3 * 16 * block * 4, union_block_n=32,
                            union_heavy_first=False, union_dik_item_entries=items)
        L = U.union_lists_for(sel, hq // g, q.dtype, kc)
        assert len(U._dsbuf_chunks(L, L.P * block * 4, kc.partial_bytes)) > 2
        check_against_reference(q, k, v, do, iq, ik, sel, block, q_pos, cfg, kc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_block_n_apart_from_dq(dtype):
    # union_fwd_block_n: the forward steps 64 keys (one step per block), dQ + KL 16 (four):
    # the same results as the reference (tolerances TOL / KL_GRAD_TOL above)
    b, sq, sk, hq, g, d, di, block, K = 1, 70, 70, 8, 2, 16, 16, 64, 2
    q, k, v, do, iq, ik = tensors(b, sq, sk, hq, g, d, di, dtype, 11)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = selection("index", b, g, sq, sk, block, K, None, 11, iq, ik, cfg)
    kc = T.KernelConfig(main_impl="union", union_block_n=16, union_fwd_block_n=64)
    fwd_bn = U._bn(block, kc, dtype, forward=True)
    assert U._bn(block, kc, dtype) == 16 and fwd_bn == (64 if dtype != torch.float32 else 32)
    check_against_reference(q, k, v, do, iq, ik, sel, block, None, cfg, kc)
    with pytest.raises(T.KernelConfigError, match="union_fwd_block_n"):
        T.KernelConfig(union_fwd_block_n=24)


@pytest.mark.parametrize("dkdv", ["union_dkdv=union,union_dkdv_item_entries=1,union_dkdv_rows=16,union_dkdv_block_n=16",
                                  "union_dkdv=union,union_dkdv_item_entries=2", "union_dkdv=union,union_dkdv_item_entries=0",
                                  "union_dkdv=kv"])
def test_dkdv_hot_blocks_row_steps_and_kv_alternative(dkdv):
    # dK/dV per key block over its union entries: items of 1-2 entries split every shared block
    # (fp32 partials reduced in item order), 16-row steps through a tile, 16-key sub-tiles; the
    # KV-outer dK/dV ("kv") must give the same gradients. bf16, G = 4, a q_pos subset (sq < sk).
    b, sq, sk, hq, g, d, di, block, K = 2, 61, 97, 8, 2, 16, 16, 32, 2
    q_pos = torch.sort(torch.randperm(sk, generator=torch.Generator().manual_seed(8))[:sq]).values
    q, k, v, do, iq, ik = tensors(b, sq, sk, hq, g, d, di, torch.bfloat16, 9)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = selection("tile", b, g, sq, sk, block, K, q_pos, 9)
    kc = T.KernelConfig.from_spec("main_impl=union," + dkdv)
    check_against_reference(q, k, v, do, iq, ik, sel, block, q_pos, cfg, kc, with_kl=False)


def test_dik_work_items():
    seg_cnt = torch.tensor([0, 5, 1, 0, 9, 2])
    it = U._segment_work_items(seg_cnt, int(seg_cnt.sum()), 4)
    n = int(it["total"])
    assert n == 2 + 1 + 3 + 1
    spans = sorted((int(s), int(a), int(b)) for s, a, b in zip(it["seg"][:n], it["start"][:n], it["end"][:n]))
    assert spans == [(1, 0, 4), (1, 4, 5), (2, 5, 6), (4, 6, 10), (4, 10, 14), (4, 14, 15), (5, 15, 17)]
    split = [int(p) for s, p in zip(it["seg"][:n], it["pslot"][:n]) if int(s) in (1, 4)]
    assert sorted(split) == list(range(5)) and it["n_part"] >= 5
    assert all(int(p) == -1 for s, p in zip(it["seg"][:n], it["pslot"][:n]) if int(s) in (2, 5))
    assert int(it["end"][it["order"][0]] - it["start"][it["order"][0]]) == 4  # largest first
    one = U._segment_work_items(seg_cnt, int(seg_cnt.sum()), 0)
    assert int(one["total"]) == 4 and one["n_part"] == 0 and (one["pslot"] == -1).all()


def test_deterministic_bit_equal():
    b, sq, hq, g, d, di, block, K = 1, 70, 8, 2, 16, 16, 16, 3
    q, k, v, do, iq, ik = tensors(b, sq, sq, hq, g, d, di, torch.bfloat16, 5)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = selection("index", b, g, sq, sq, block, K, None, 5, iq, ik, cfg)
    r1 = run_union(q, k, v, do, iq, ik, sel, block, None, cfg)
    r2 = run_union(q, k, v, do, iq, ik, sel, block, None, cfg)
    for a, c in zip(r1[:5] + (r1[5].kl, r1[5].d_iq, r1[5].d_ik), r2[:5] + (r2[5].kl, r2[5].d_iq, r2[5].d_ik)):
        assert torch.equal(a, c), "union path is not bitwise reproducible"


def test_union_lists_match_python_sets():
    gen = torch.Generator().manual_seed(1)
    b, g, sq, K, nb, P = 2, 3, 37, 5, 9, 8
    sel = torch.rand(b, g, sq, nb, generator=gen).argsort(-1)[..., :K].to(torch.int32)  # duplicate-free rows
    sel = torch.where(torch.rand(sel.shape, generator=gen) < 0.25, -1, sel)
    assert not bool(U.build_union_lists(sel, P).dups)
    sel[0, 0, 0, :2] = 4  # a duplicate within a row
    L = U.build_union_lists(sel, P)
    assert bool(L.dups)
    nt = math.ceil(sq / P)
    cnts = []
    for bg in range(b * g):
        for t in range(nt):
            w = bg * nt + t
            rows = sel.view(b * g, sq, K)[bg, t * P:(t + 1) * P]
            want = sorted({int(x) for x in rows.flatten() if x >= 0})
            n = int(L.cnt[w])
            assert L.blk[w, :n].tolist() == want and (L.blk[w, n:] == -1).all()
            for u, blk in enumerate(want):
                bits = sum(1 << p for p in range(rows.shape[0]) if blk in rows[p].tolist())
                assert int(L.msk[w, u]) == bits, (w, blk)
            assert int(L.off[w]) == sum(cnts)
            cnts.append(n)
    assert abs(L.mean.item() - sum(cnts) / len(cnts)) < 1e-6
    assert sorted(L.cnt[L.order.long()].tolist(), reverse=True) == L.cnt[L.order.long()].tolist()


def test_union_lists_triton_kernel_equals_torch():
    gen = torch.Generator().manual_seed(2)
    b, g, sq, K, nb, P = 1, 2, 21, 3, 7, 8
    sel = torch.rand(b, g, sq, nb, generator=gen).argsort(-1)[..., :K].to(torch.int32)
    sel = torch.where(torch.rand(sel.shape, generator=gen) < 0.25, -1, sel)
    for dup in (False, True):
        if dup:
            sel[0, 1, 9, :2] = 5
        a, t = U.build_union_lists(sel, P), U.build_union_lists_triton(sel, P)
        for name in ("blk", "msk", "cnt", "off", "order"):
            assert torch.equal(getattr(a, name), getattr(t, name)), name
        assert bool(a.dups) == bool(t.dups) == dup and a.mean.item() == t.mean.item()
    kc = T.KernelConfig(main_impl="union", union_lists_kernel=True)
    assert U.union_lists_for(sel, 16, torch.bfloat16, kc).blk.shape == (b * g * 3, 8 * K)  # G = 16: P = 8


def test_dispatch_auto_union_kv_and_errors():
    b, s, hq, g, d, block, K = 1, 96, 4, 2, 16, 16, 3
    tile = selection("tile", b, g, s, s, block, K, None, 7)
    rnd = selection("pad", b, g, s, s, block, K, None, 7)
    G = hq // g
    mean_tile = U.union_lists_for(tile, G, torch.float32, UNION).mean.item()
    mean_rnd = U.union_lists_for(rnd, G, torch.float32, UNION).mean.item()
    assert mean_tile < mean_rnd
    thr = (mean_tile + mean_rnd) / 2 * 16 / K  # union_max_blocks is per K = 16
    auto = T.KernelConfig(main_impl="auto", union_max_blocks=thr)
    assert U.resolve_main_impl(auto, tile, G, torch.float32)[0] == "union"
    assert U.resolve_main_impl(auto, rnd, G, torch.float32)[0] == "kv"
    fwd_wide = T.KernelConfig(main_impl="auto", union_max_blocks=thr, union_max_blocks_fwd=mean_rnd * 2 * 16 / K)
    assert U.resolve_main_impl(fwd_wide, rnd, G, torch.float32, fwd_only=True)[0] == "union"  # prefill threshold
    kl_wide = T.KernelConfig(main_impl="auto", union_max_blocks=thr, union_max_blocks_kl=mean_rnd * 2 * 16 / K)
    assert U.resolve_main_impl(kl_wide, rnd, G, torch.float32, with_kl=True)[0] == "union"  # op training threshold
    assert U.resolve_main_impl(kl_wide, rnd, G, torch.float32)[0] == "kv"  # same selection, cached stats
    assert U.resolve_main_impl(T.KernelConfig(main_impl="kv"), tile, G, torch.float32) == ("kv", None)
    # another selection that looks the same to the key (as one allocated at a freed selection's
    # address would) must not inherit the cached "kv" decision of rnd
    real_key = U._union_key
    try:
        U._union_key = lambda block_idx, P: ("same",)
        assert U.resolve_main_impl(auto, rnd, G, torch.float32)[0] == "kv"
        assert U.resolve_main_impl(auto, tile.clone(), G, torch.float32)[0] == "union"
    finally:
        U._union_key = real_key
    dup = tile.clone()
    dup[0, 0, 20, 0] = dup[0, 0, 20, 1]
    assert U.resolve_main_impl(auto, dup, G, torch.float32)[0] == "kv"
    with pytest.raises(ValueError, match="repeats a block"):
        U.resolve_main_impl(UNION, dup, G, torch.float32)
    with pytest.raises(ValueError, match=r"KernelConfig.main_impl='bogus': allowed values are 'auto', 'union', 'kv'"):
        T.KernelConfig(main_impl="bogus")
    with pytest.raises(ValueError, match="union_max_blocks"):
        T.KernelConfig(union_max_blocks=0)
    with pytest.raises(ValueError, match="union_rows"):
        T.KernelConfig(union_rows=100)
    c = T.KernelConfig.from_spec("main_impl=union,union_max_blocks=20.5,union_heavy_first=0,union_dq_stages=1")
    assert (c.main_impl, c.union_max_blocks, c.union_heavy_first, c.union_dq_stages) == ("union", 20.5, False, 1)


@pytest.mark.parametrize("b,g,s,K,P,kind", [(1, 2, 96, 3, 8, "tile"), (2, 3, 67, 4, 8, "pad"), (1, 1, 130, 5, 4, "pad"),
                                            (1, 2, 33, 2, 16, "tile")])
def test_union_mean_dups_equals_the_lists(b, g, s, K, P, kind):
    """The auto dispatch's two numbers without the lists: exactly what build_union_lists
    reports (mean union per tile, repeated block in a row), in any slicing, odd lengths and
    -1 entries included."""
    sel = selection(kind, b, g, s, s, 16, K, None, 3)
    assert bool((sel < 0).any()) or kind == "tile"
    ref = U.build_union_lists(sel, P)
    for slice_tiles in (1, 5, 10**6):
        mean, dups = U.union_mean_dups(sel, P, slice_tiles=slice_tiles)
        assert float(mean) == pytest.approx(float(ref.mean), rel=1e-6) and bool(dups) == bool(ref.dups) is False
    dup = sel.clone()
    row = int((dup[0, 0, :, 1] >= 0).nonzero()[-1])
    dup[0, 0, row, 0] = dup[0, 0, row, 1]
    ref = U.build_union_lists(dup, P)
    mean, dups = U.union_mean_dups(dup, P, slice_tiles=3)
    assert bool(dups) and bool(ref.dups) and float(mean) == pytest.approx(float(ref.mean), rel=1e-6)


def test_auto_dispatch_builds_lists_only_for_the_union_path(monkeypatch):
    b, s, hq, g, K = 1, 96, 4, 2, 3
    tile = selection("tile", b, g, s, s, 16, K, None, 7)
    rnd = selection("pad", b, g, s, s, 16, K, None, 7)
    G = hq // g
    mean_tile = U.union_lists_for(tile, G, torch.float32, UNION).mean.item()
    mean_rnd = U.union_lists_for(rnd, G, torch.float32, UNION).mean.item()
    auto = T.KernelConfig(main_impl="auto", union_max_blocks=(mean_tile + mean_rnd) / 2 * 16 / K)
    built = []
    real = U.union_lists_for
    monkeypatch.setattr(U, "union_lists_for", lambda *a, **k: built.append(1) or real(*a, **k))
    assert U.resolve_main_impl(auto, rnd.clone(), G, torch.float32) == ("kv", None) and not built
    impl, lists = U.resolve_main_impl(auto, tile.clone(), G, torch.float32)
    assert impl == "union" and built == [1] and float(lists.mean) == pytest.approx(mean_tile)


def test_autograd_dispatch_sparse_attention():
    # sparse_attention (SparseAttentionFn) with main_impl=union: union forward + split backward.
    b, s, hq, g, d, block, K = 1, 66, 4, 2, 16, 16, 3
    q, k, v, do, _, _ = tensors(b, s, s, hq, g, d, 16, torch.float32, 8)
    sel = selection("tile", b, g, s, s, block, K, None, 8)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = T.sparse_attention(qg, kg, vg, sel, block, config=UNION)
    grads = torch.autograd.grad(out, [qg, kg, vg], do)
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    r_out, r_lse = R.sparse_attention(qf, kf, vf, sel, block)
    r_grads = torch.autograd.grad(r_out, [qf, kf, vf], do)
    assert rel(out, r_out) < 2e-5 and rel(lse, r_lse) < 2e-5
    assert all(rel(a, r) < 2e-5 for a, r in zip(grads, r_grads)), [rel(a, r) for a, r in zip(grads, r_grads)]


def test_op_union_kl_path_matches_reference():
    # The MSA op (mode msa, iq/ik with gradients) on the v2 path: KL fused into the union dQ pass.
    from msa_megatron.ops.triton_op import msa_attention_triton

    b, sq, sk, hq, g, d, di, block, K = 1, 40, 88, 8, 2, 16, 16, 16, 3
    q_pos = torch.sort(torch.randperm(sk, generator=torch.Generator().manual_seed(2))[:sq]).values
    q, k, v, do, iq, ik = tensors(b, sq, sk, hq, g, d, di, torch.float32, 9)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    xs = [x.clone().requires_grad_() for x in (q, k, v, iq, ik)]
    out, aux = msa_attention_triton(*xs, cfg, q_pos=q_pos, kernel_config=UNION)
    assert math.isnan(aux.kl.item())  # value known after the backward (documented)
    ((out * do).sum() + aux.kl).backward()
    rs = [x.clone().requires_grad_() for x in (q, k, v, iq, ik)]
    r_out, r_aux = R.msa_attention(*rs, cfg, q_pos=q_pos)
    ((r_out * do).sum() + r_aux.kl).backward()
    assert torch.equal(aux.block_idx, r_aux.block_idx)
    assert rel(out, r_out) < 2e-5
    assert abs(aux.kl.item() - r_aux.kl.item()) < 1e-4 * max(1.0, abs(r_aux.kl.item()))
    for key in ("index_entropy", "main_entropy"):
        assert abs(aux.stats[key].item() - r_aux.stats[key].item()) < 1e-5 * max(1.0, abs(r_aux.stats[key].item()))
    for name, a, r in zip(("dq", "dk", "dv", "d_iq", "d_ik"), xs, rs):
        assert rel(a.grad, r.grad) < 1e-4, (name, rel(a.grad, r.grad))


# ----------------------------------------------------------------------------- GPU (realistic sizes)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("length", ["8K", "16K"])
def test_gpu_union_check(length, tmp_path):
    """On the GPU, paper layout (64 q / 4 KV heads, d 128, block 128, top-16, bf16): the union
    path (fwd, split bwd, dQ + KL, op, Triton union lists) against the KV-outer path + separate
    KL kernel, and a q_pos slice against the fp32 reference, on random and pool-20 selections;
    tolerances as scripts/gpu_union_check.py states them. A subprocess: tests/ops/conftest.py
    puts this process in interpreter mode."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(root / "scripts" / "gpu_union_check.py"), "--parts", "check",
                        "--check-lengths", length, "--out", str(tmp_path)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    report = json.loads((tmp_path / "union_check.json").read_text())
    assert r.returncode == 0 and report["failed"] == [] and len(report["checks"]) > 40, (r.stdout + r.stderr)[-4000:]

"""The reference's document-mask spec (docs/packed.md) against a per-query python oracle
and the properties it promises: full budget == dense attention with the document mask,
packed == documents run one by one (block-aligned documents), no document information ==
today's behaviour exactly.

Tolerances: fp32 / fp64 comparisons with an oracle in fp64: 1e-5; selections and
"no documents" equalities are exact (torch.equal)."""

import importlib.util
import math
import os
import sys

import pytest
import torch

from msa_megatron import MSAConfig
from msa_megatron.ops import naive as R


def _gen(seed=None):
    return torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


def rand_inputs(gen, b, s, hq, g, d, di, dtype=torch.float32):
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)
    return mk(b, s, hq, d), mk(b, s, g, d), mk(b, s, g, d), mk(b, s, g, di), mk(b, s, di)


def random_doc_ids(gen, b, s, layout):
    """[b, s] document ids. layouts: 'short' (many documents shorter than a block, several
    boundaries inside one block), 'mixed' (lengths 1..3 blocks), 'one' (a single document)."""
    ids = torch.zeros(b, s, dtype=torch.long)
    for bi in range(b):
        if layout == "one":
            continue
        hi = {"short": 9, "mixed": 50}[layout]
        p, doc = 0, 0
        while p < s:
            n = int(torch.randint(1, hi, (1,), generator=gen))
            ids[bi, p:p + n] = doc
            p, doc = p + n, doc + 1
    return ids


# ----------------------------------------------------------------------------- oracle
def oracle_select(iq, ik, cfg, q_pos, ds):
    """Per (b, g, t): visible keys = [ds, q_pos]; block score = max over visible keys; forced:
    own + local blocks and init blocks counted from the document's first block, kept only
    if they hold a visible key; top-k of the rest by (score desc, block asc)."""
    b, sq, g, _ = iq.shape
    sk, B, K = ik.shape[1], cfg.block_size, cfg.topk
    out = torch.full((b, g, sq, K), -1, dtype=torch.int32)
    for bi in range(b):
        for gi in range(g):
            for t in range(sq):
                p, lo = int(q_pos[t]), int(ds[bi, t])
                own, first = p // B, lo // B
                scores = {}
                for blk in range(first, own + 1):
                    keys = range(max(blk * B, lo), min((blk + 1) * B, sk, p + 1))
                    scores[blk] = max(float(iq[bi, t, gi].double() @ ik[bi, j].double()) for j in keys)
                forced = {x for x in scores if x > own - cfg.local_blocks or first <= x < first + cfg.init_blocks}
                rest = sorted((x for x in scores if x not in forced), key=lambda x: (-scores[x], x))
                chosen = sorted(forced | set(rest[: max(0, K - len(forced))]))
                out[bi, gi, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def oracle_attention(q, k, v, blk, B, q_pos, ds):
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for bi in range(b):
        for t in range(sq):
            for h in range(hq):
                gi = h // (hq // g)
                allowed = torch.zeros(sk, dtype=torch.bool)
                for x in blk[bi, gi, t].tolist():
                    if x >= 0:
                        allowed[x * B:(x + 1) * B] = True
                allowed[int(q_pos[t]) + 1:] = False
                allowed[: int(ds[bi, t])] = False
                logits = (k[bi, :, gi].double() @ q[bi, t, h].double()) / math.sqrt(d)
                out[bi, t, h] = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 0) @ v[bi, :, gi].double()
    return out


@pytest.mark.parametrize("layout,b,s,hq,g,B,K,init,local", [
    ("short", 1, 77, 4, 2, 16, 3, 0, 1),   # documents shorter than a block, odd length, G=2
    ("mixed", 2, 100, 8, 2, 16, 2, 1, 1),  # per-row layouts, an init block (document-relative)
    ("mixed", 1, 93, 8, 1, 16, 3, 0, 2),   # G=8, two local blocks
    ("one", 1, 61, 3, 1, 16, 2, 1, 1),     # one document spanning everything, G=3
])
def test_selection_and_attention_match_oracle(layout, b, s, hq, g, B, K, init, local):
    gen = _gen()
    q, k, v, iq, ik = rand_inputs(gen, b, s, hq, g, 8, 16)
    cfg = MSAConfig(block_size=B, topk=K, index_dim=16, init_blocks=init, local_blocks=local)
    ds = R.doc_start_from_doc_ids(random_doc_ids(gen, b, s, layout))
    q_pos = torch.arange(s)
    blk = R.select(iq, ik, cfg, doc_start=ds)
    assert torch.equal(blk, oracle_select(iq, ik, cfg, q_pos, ds))
    out, lse = R.sparse_attention(q, k, v, blk, B, doc_start=ds)
    torch.testing.assert_close(out.double(), oracle_attention(q, k, v, blk, B, q_pos, ds), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lse).all()
    # no selected block lies outside [doc block, own block]; the own block is always kept
    sel = blk.long()
    lo_blk = (ds // B)[:, None, :, None]
    own = (q_pos // B)[None, None, :, None]
    assert ((sel < 0) | ((sel >= lo_blk) & (sel <= own))).all()
    assert (sel == own).any(-1).all()
    # fewer visible blocks than K -> all of them, then -1 padding
    n_vis = (q_pos // B)[None, None, :] - (ds // B)[:, None, :] + 1
    n_sel = (sel >= 0).sum(-1)
    assert torch.equal(n_sel, n_vis.clamp(max=K).expand_as(n_sel))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("G", [1, 4])
def test_full_budget_equals_dense_with_document_mask(dtype, tol, G):
    gen = _gen()
    b, s, g, B = 2, 90, 2, 16
    q, k, v, iq, ik = rand_inputs(gen, b, s, g * G, g, 16, 16, dtype)
    ds = R.doc_start_from_doc_ids(random_doc_ids(gen, b, s, "mixed"))
    cfg = MSAConfig(block_size=B, topk=math.ceil(s / B), index_dim=16)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg, mode="msa", doc_start=ds, compute_recall=True)
    ref, ref_lse = R.dense_attention(q, k, v, doc_start=ds)
    # explicit masked softmax (not through dense_attention) as the ground truth
    key, qp = torch.arange(s), torch.arange(s)
    mask = (key[None, None] <= qp[None, :, None]) & (key[None, None] >= ds[:, :, None])  # [b, q, k]
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    logits = (qf @ kf.transpose(-1, -2) / math.sqrt(16)).masked_fill(~mask[:, None], float("-inf"))
    explicit = (torch.softmax(logits, -1) @ vf).transpose(1, 2)
    torch.testing.assert_close(ref.double(), explicit, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(aux.lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert abs(aux.stats["recall"].item() - 1.0) < 1e-5
    # sparse KL at full budget == warmup (dense) KL with the document mask
    _, aux_w = R.msa_attention(q, k, v, iq, ik, cfg, mode="msa_warmup", doc_start=ds)
    torch.testing.assert_close(aux.kl, aux_w.kl, rtol=1e-4, atol=1e-6)
    _, aux_d = R.msa_attention(q, k, v, None, None, cfg, mode="dense", doc_start=ds)
    torch.testing.assert_close(aux_d.lse, ref_lse)


@pytest.mark.parametrize("mode", ["msa", "msa_warmup", "dense"])
def test_packed_equals_documents_one_by_one(mode):
    """Block-aligned documents: the packed run equals each document run alone (output,
    selection shifted by the document's first block, KL sums, gradients)."""
    gen = _gen()
    B, hq, g, d, di = 16, 4, 2, 8, 16
    lens = [48, 16, 80, 32]  # multiples of B
    s = sum(lens)
    q, k, v, iq, ik = (x.requires_grad_() for x in rand_inputs(gen, 1, s, hq, g, d, di, torch.float64))
    cfg = MSAConfig(block_size=B, topk=3, index_dim=di, init_blocks=1)
    cu = torch.tensor([0] + lens).cumsum(0)
    ds = R.doc_start_from_cu_seqlens(cu, s)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg, mode=mode, doc_start=ds)
    kl_sum = aux.kl * g * s if aux.kl is not None else 0.0
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum() + kl_sum, (q, k, v, iq, ik), allow_unused=True)
    kl_parts = 0.0
    for a, n in zip(cu[:-1].tolist(), lens):
        sl = slice(a, a + n)
        parts = [x[:, sl].detach().requires_grad_() for x in (q, k, v, iq, ik)]
        o_i, aux_i = R.msa_attention(*parts, cfg, mode=mode)
        torch.testing.assert_close(o_i, out[:, sl], rtol=1e-10, atol=1e-10)
        kl_i = aux_i.kl * g * n if aux_i.kl is not None else 0.0
        if mode != "dense":
            assert torch.equal(torch.where(aux_i.block_idx >= 0, aux_i.block_idx + a // B, -1), aux.block_idx[:, :, sl])
            kl_parts = kl_parts + kl_i
        grads_i = torch.autograd.grad((o_i * w[:, sl]).sum() + kl_i, parts, allow_unused=True)
        for name, gp, gi in zip("q k v iq ik".split(), grads, grads_i):
            assert (gp is None) == (gi is None), name
            if gi is not None:  # documents are independent: the packed gradient restricted to one
                torch.testing.assert_close(gp[:, sl], gi, rtol=1e-10, atol=1e-10, msg=name)
    if mode != "dense":
        torch.testing.assert_close(kl_sum, kl_parts, rtol=1e-10, atol=1e-10)
    assert all(gr is not None for gr in grads[:3]) and (mode == "dense" or grads[3] is not None)


def test_sliding_window_with_documents_matches_masked_softmax():
    gen = _gen()
    b, s, hq, g, window = 2, 60, 4, 2, 9
    q, k, v, _, _ = rand_inputs(gen, b, s, hq, g, 8, 16)
    ds = R.doc_start_from_doc_ids(random_doc_ids(gen, b, s, "mixed"))
    out, _ = R.sliding_window_attention(q, k, v, window, doc_start=ds)
    key, qp = torch.arange(s), torch.arange(s)
    mask = (key[None, None] <= qp[None, :, None]) & (key[None, None] > qp[None, :, None] - window)
    mask = mask & (key[None, None] >= ds[:, :, None])
    G = hq // g
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    logits = (qf @ kf.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask[:, None], float("-inf"))
    torch.testing.assert_close(out.double(), (torch.softmax(logits, -1) @ vf).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_no_document_information_is_todays_behaviour_exactly():
    """doc_start=None and a single document (all zeros) give bit-identical results; where the
    main checkout's reference is at hand, so does it (today's code)."""
    gen = _gen()
    b, s, hq, g = 2, 70, 4, 2
    q, k, v, iq, ik = rand_inputs(gen, b, s, hq, g, 8, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16, init_blocks=1)
    others = []
    # the main checkout's reference: ops/naive.py, or reference.py before the move (issue 16)
    main_ref, main_pkg = next(((f, pkg) for f, pkg in (("/work/main/msa_megatron/ops/naive.py", "msa_megatron.ops"),
                                                        ("/work/main/msa_megatron/reference.py", "msa_megatron"))
                               if os.path.exists(f)), (None, None))
    if main_ref and os.path.realpath(main_ref) != os.path.realpath(R.__file__):
        spec = importlib.util.spec_from_file_location(f"{main_pkg}._main_reference", main_ref,
                                                      submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = main_pkg
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.modules.pop(spec.name, None)
        others.append(("main", lambda mode: mod.msa_attention(q, k, v, iq, ik, cfg, mode=mode, compute_recall=mode != "dense")))
    others.append(("zeros", lambda mode: R.msa_attention(q, k, v, iq, ik, cfg, mode=mode, compute_recall=mode != "dense",
                                                         doc_start=torch.zeros(b, s, dtype=torch.long))))
    for mode in ("msa", "msa_warmup", "dense"):
        out, aux = R.msa_attention(q, k, v, iq, ik, cfg, mode=mode, compute_recall=mode != "dense")
        for name, fn in others:
            o2, a2 = fn(mode)
            assert torch.equal(out, o2), (name, mode)
            assert torch.equal(aux.lse, a2.lse), (name, mode)
            if mode != "dense":
                assert torch.equal(aux.block_idx, a2.block_idx) and torch.equal(aux.kl, a2.kl), (name, mode)
                for key in aux.stats:
                    assert torch.equal(aux.stats[key], a2.stats[key]), (name, mode, key)


def test_boundary_inside_block_counts_only_same_document_part():
    """A huge index score in the previous document's part of a block must not raise the
    block's score for the next document's queries."""
    B, s, di = 16, 64, 16
    iq = torch.zeros(1, s, 1, di)
    iq[..., 0] = 1.0
    ik = torch.zeros(1, s, di)
    ik[0, 39, 0] = 100.0  # block 2 (keys 32..47), document 0 (keys 0..39)
    ik[0, 20, 0] = 5.0    # block 1
    cu = torch.tensor([0, 40, 64])
    ds = R.doc_start_from_cu_seqlens(cu, s)
    cfg = MSAConfig(block_size=B, topk=2, index_dim=di)
    scores = R.index_block_scores(iq, ik, B, doc_start=ds)
    assert scores[0, 0, 39, 2] == 100.0 and scores[0, 0, 40, 2] == 0.0  # same block, other document
    assert scores[0, 0, 50, 2] == 0.0 and scores[0, 0, 50, 1] == float("-inf")  # block 1 invisible to doc 1
    blk = R.select(iq, ik, cfg, doc_start=ds)
    assert blk[0, 0, 50].tolist() == [2, 3]  # doc 1 sees blocks 2 (partly) and 3 only
    assert blk[0, 0, 39].tolist() == [1, 2]
    assert blk[0, 0, 41].tolist() == [2, -1]  # one visible block: kept, then -1


def test_converters_and_bad_inputs():
    cu = torch.tensor([0, 3, 3, 10, 12])  # an empty document is allowed
    assert R.doc_start_from_cu_seqlens(cu, 14).tolist() == [0] * 3 + [3] * 7 + [10] * 2 + [12] * 2
    assert R.doc_start_from_cu_seqlens(cu, torch.tensor([11, 2, 5])).tolist() == [10, 0, 3]
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert R.doc_start_from_doc_ids(ids).tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    pos_ids = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])  # GPTDataset reset_position_ids
    assert torch.equal(R.doc_start_from_position_ids(pos_ids), R.doc_start_from_doc_ids(ids))
    with pytest.raises(ValueError, match="position_ids"):
        R.doc_start_from_position_ids(torch.tensor([[0, 1, 3]]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        R.doc_start_from_cu_seqlens(torch.tensor([1, 4]), 4)
    gen = _gen()
    q, k, v, iq, ik = rand_inputs(gen, 1, 20, 2, 1, 8, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    with pytest.raises(ValueError, match="doc_start must satisfy"):
        R.msa_attention(q, k, v, iq, ik, cfg, mode="msa", doc_start=torch.full((20,), 5))
    with pytest.raises(ValueError, match="doc_start must have shape"):
        R.msa_attention(q, k, v, iq, ik, cfg, mode="msa", doc_start=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        R.select(iq, ik, cfg, doc_start=torch.zeros(20))

"""Main-branch kernels and the op with packed documents (``doc_start``, docs/packed.md) vs the
pure-PyTorch reference, on CPU through Triton's interpreter (tiny sizes).

Layouts (per batch row, random every run, seed printed): ``split`` documents of 1-5 tokens
(several boundaries inside one block), ``short`` 1-12, ``mixed`` (row 0 short, row 1 documents
of 10-60 tokens), ``one`` (one document: doc_start = 0).

Tolerances (relative Frobenius norm, as tests/ops/test_triton_sparse_attn.py): fp32 inputs
(IEEE fp32 dots) 2e-5 for out / lse / dq / dk / dv / KL / d_iq / d_ik / entropies; bf16 inputs
2e-2 against the fp32 reference on the same bf16 values (bf16 P / dS roundings), fused-KL
gradients 1.5e-2. ``doc_start = 0`` must be bit-identical to ``None``. Every output buffer is
NaN-poisoned, so an unwritten element fails.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_op as OP  # noqa: E402
from msa_megatron.ops import triton_sparse_attn as T  # noqa: E402
from msa_megatron.ops import triton_union as TU  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
KL_GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fresh_gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # fresh inputs every run; pytest shows it on failure
    return torch.Generator().manual_seed(seed)


def doc_layout(gen, b, sk, layout):
    """doc_start [b, sk] for every key position (index it with q_pos for a query subset)."""
    ids = torch.zeros(b, sk, dtype=torch.long)
    for bi in range(b):
        lo, hi = {"split": (1, 6), "short": (1, 13), "mixed": ((1, 13), (10, 61))[min(bi, 1)], "one": (sk, sk + 1)}[layout]
        p, doc = 0, 0
        while p < sk:
            n = int(torch.randint(lo, hi, (1,), generator=gen))
            ids[bi, p:p + n] = doc
            p, doc = p + n, doc + 1
    return R.doc_start_from_doc_ids(ids)


def make(gen, b, sq, sk, hq, g, d, dtype):
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, g, d), mk(b, sk, g, d), mk(b, sq, hq, d)


def ref_grads(q, k, v, do, sel, block, q_pos, ds):
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    out, lse = R.sparse_attention(qf, kf, vf, sel, block, q_pos, doc_start=ds)
    return (out.detach(), lse) + tuple(torch.autograd.grad(out, [qf, kf, vf], do.float()))


def run_kernels(q, k, v, do, sel, block, q_pos, ds, config):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    fn = T.sparse_attention
    if config.fwd_impl == "q":  # the query-outer baseline: msa_megatron/bench/qouter.py
        from msa_megatron.bench.qouter import qouter_attention as fn
    out, lse = fn(q, k, v, sel, block, q_pos, config=config, doc_start=ds)
    return (out, lse) + tuple(torch.autograd.grad(out, [q, k, v], do))


# (b, sq, sk, hq, g, d, block, K, dtype, layout, impl, q positions)
CASES = [
    (2, 75, 75, 4, 2, 16, 16, 2, torch.float32, "split", "kv", "default"),
    (2, 93, 93, 3, 1, 16, 16, 3, torch.float32, "mixed", "q", "default"),
    (2, 70, 70, 4, 4, 32, 16, 2, torch.bfloat16, "short", "kv", "default"),
    (2, 40, 131, 8, 2, 16, 32, 2, torch.float32, "short", "kv", "subset"),
    (1, 77, 77, 4, 2, 16, 16, 3, torch.float32, "split", "union", "default"),
    (2, 66, 66, 6, 2, 16, 16, 2, torch.bfloat16, "mixed", "union", "default"),
    (1, 60, 60, 4, 2, 16, 16, 2, torch.float32, "one", "kv", "default"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[10]}-{c[9]}-{str(c[8])[6:]}-G{c[3] // c[4]}-{c[11]}")
def test_main_kernels_match_reference(case):
    """Forward (out, lse) and autograd backward (dq, dk, dv) of the KV-outer / query-outer /
    union kernels with documents == naive.sparse_attention(doc_start=) on a selection
    from naive.select(doc_start=)."""
    b, sq, sk, hq, g, d, block, K, dtype, layout, impl, qk = case
    gen = fresh_gen()
    q_pos = torch.sort(torch.randperm(sk, generator=gen)[:sq]).values if qk == "subset" else None
    ds_all = doc_layout(gen, b, sk, layout)
    ds = ds_all[:, q_pos] if q_pos is not None else ds_all[:, sk - sq:]
    q, k, v, do = make(gen, b, sq, sk, hq, g, d, dtype)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=16)
    sel = R.select(torch.randn(b, sq, g, 16, generator=gen), torch.randn(b, sk, 16, generator=gen), cfg, q_pos,
                   doc_start=ds)
    kc = T.KernelConfig(main_impl="union" if impl == "union" else "kv", fwd_impl="q" if impl == "q" else "kv")
    got = run_kernels(q, k, v, do, sel, block, q_pos, ds, kc)
    ref = ref_grads(q, k, v, do, sel, block, q_pos, ds)
    for t in got:
        assert not torch.isnan(t).any(), "unwritten (NaN-poisoned) or NaN output"
    errs = {n: rel(a, r) for n, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all {errs})"
    # the mask matters here: without documents the same selection gives a different answer
    if layout != "one":
        plain = R.sparse_attention(q.float(), k.float(), v.float(), sel, block, q_pos)[0]
        assert rel(got[0], plain) > 10 * TOL[dtype], "documents made no difference: the test cannot fail"


@pytest.mark.parametrize("impl", ["kv", "q", "union"])
def test_doc_start_zero_is_bit_identical(impl):
    """doc_start = 0 (one document) compiles the HAS_DOC variant; its results must equal the
    plain kernels' (None) bit for bit."""
    gen = fresh_gen()
    b, s, hq, g, d, block = 2, 70, 4, 2, 16, 16
    q, k, v, do = make(gen, b, s, s, hq, g, d, torch.float32)
    cfg = MSAConfig(block_size=block, topk=2, index_dim=16)
    sel = R.select(torch.randn(b, s, g, 16, generator=gen), torch.randn(b, s, 16, generator=gen), cfg)
    kc = T.KernelConfig(main_impl="union" if impl == "union" else "kv", fwd_impl="q" if impl == "q" else "kv")
    a = run_kernels(q, k, v, do, sel, block, None, None, kc)
    z = run_kernels(q, k, v, do, sel, block, None, torch.zeros(s, dtype=torch.int32), kc)
    for n, x, y in zip(("out", "lse", "dq", "dk", "dv"), a, z):
        assert torch.equal(x, y), f"{impl}: {n} differs between doc_start=None and doc_start=0"


@pytest.mark.parametrize("path,dtype,layout", [("kv", torch.float32, "split"), ("kv", torch.bfloat16, "mixed"),
                                               ("union", torch.float32, "short"), ("union", torch.bfloat16, "split")])
def test_fused_kl_with_documents(path, dtype, layout):
    """The fused indexer KL (KV-outer backward, union-tile dQ) with documents: value, d_iq,
    d_ik and entropies == naive.sparse_kl_terms(doc_start=) (+ autograd); the main
    gradients are unchanged by the fused part."""
    gen = fresh_gen()
    b, s, hq, g, d, di, block, K = 2, 70, 8, 2, 16, 16, 16, 2
    q, k, v, do = make(gen, b, s, s, hq, g, d, dtype)
    iq, ik = torch.randn(b, s, g, di, generator=gen).to(dtype), torch.randn(b, s, di, generator=gen).to(dtype)
    ds = doc_layout(gen, b, s, layout)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di)
    sel = R.select(iq.float(), ik.float(), cfg, doc_start=ds)
    ilse = R.selected_index_lse(iq.float(), ik.float(), sel, cfg, doc_start=ds)
    fk = T.FusedKL(iq, ik, ilse, cfg.index_softmax_scale)
    kc = T.KernelConfig(main_impl="kv", bwd_rows=16)
    out, lse = T.sparse_attention_fwd(q, k, v, sel, block, config=kc, doc_start=ds)
    plain = T.sparse_attention_bwd(do, q, k, v, out, lse, sel, block, config=kc, doc_start=ds)
    if path == "kv":
        dq, dk, dv, res = T.sparse_attention_bwd(do, q, k, v, out, lse, sel, block, config=kc, kl=fk, doc_start=ds)
        for n, x, y in zip(("dq", "dk", "dv"), (dq, dk, dv), plain):
            assert torch.equal(x, y), f"{n} changed by the fused KL"
    else:
        dq, res = TU.union_attention_dq(do, q, k, v, out, lse, sel, block, config=kc, kl=fk, doc_start=ds)
        assert rel(dq, plain[0]) <= TOL[dtype]
    iq_r, ik_r = iq.float().requires_grad_(), ik.float().requires_grad_()
    terms = R.sparse_kl_terms(q.float(), k.float(), iq_r, ik_r, sel, cfg, doc_start=ds)
    (terms.kl / terms.rows).backward()
    ref = {"kl": terms.kl / terms.rows, "index_entropy": terms.index_entropy / terms.rows,
           "main_entropy": terms.main_entropy / (terms.rows * (hq // g))}
    got = {"kl": res.kl, **res.stats}
    errs = {n: rel(got[n], ref[n].detach()) for n in ref}
    errs.update(d_iq=rel(res.d_iq, iq_r.grad), d_ik=rel(res.d_ik, ik_r.grad))
    tol = dict.fromkeys(errs, 1e-4)
    tol.update(d_iq=KL_GRAD_TOL[dtype], d_ik=KL_GRAD_TOL[dtype])
    bad = {n: e for n, e in errs.items() if not e <= tol[n]}
    assert not bad, f"{path}: errors above {tol}: {bad} (all {errs})"


def run_op(mode, ds, q_pos=None, kc=None, b=2, sq=80, sk=80, hq=4, g=2, d=16, di=16, block=16, topk=2, gen=None,
           forced_kernels=True):
    q, k, v, _ = make(gen, b, sq, sk, hq, g, d, torch.float32)
    iq, ik = torch.randn(b, sq, g, di, generator=gen), torch.randn(b, sk, di, generator=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, iq, ik)]
    cfg = MSAConfig(block_size=block, topk=topk, index_dim=di)
    r_out, r_aux = R.msa_attention(q, k, v, iq, ik, cfg, q_pos=q_pos, mode=mode, doc_start=ds)
    with pytest.MonkeyPatch.context() as mp:
        if forced_kernels:  # the KL must come from the kernels, not the reference
            for name in ("sparse_kl_terms", "dense_kl_terms"):
                mp.setattr(R, name, lambda *a, **kw: (_ for _ in ()).throw(AssertionError("reference KL called")))
        out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, q_pos=q_pos, mode=mode, kernel_config=kc,
                                           doc_start=ds)
        dout = torch.randn(r_out.shape, generator=gen)
        use = [x for x in leaves] if mode != "dense" else leaves[:3]
        gr = torch.autograd.grad((out * dout).sum() + (3.0 * aux.kl if aux.kl is not None else 0.0), use)
    r_gr = torch.autograd.grad((r_out * dout).sum() + (3.0 * r_aux.kl if r_aux.kl is not None else 0.0), use)
    return (out, aux, gr), (r_out, r_aux, r_gr)


@pytest.mark.parametrize("mode,layout,spec", [("dense", "split", ""), ("msa_warmup", "short", ""),
                                              ("msa", "mixed", "main_impl=kv,kl_fused=0"),
                                              ("msa", "split", "main_impl=kv,kl_fused=1"),
                                              ("msa", "short", "main_impl=union")])
def test_op_matches_reference(mode, layout, spec, caplog):
    """msa_attention_triton(doc_start=) == naive.msa_attention(doc_start=) in every mode and
    KL path (separate KL kernel, fused KV-outer, fused union): out, lse, block_idx, kl,
    entropies and the gradients of <out, dout> + 3 kl w.r.t. q, k, v, iq, ik (fp32, 2e-5).
    The dense path with documents says once in the log what runs."""
    gen = fresh_gen()
    ds = doc_layout(gen, 2, 80, layout)
    OP._announced.discard("dense-docs")
    with caplog.at_level("WARNING", logger="msa_megatron.ops"):
        (out, aux, gr), (r_out, r_aux, r_gr) = run_op(mode, ds, kc=T.KernelConfig.from_spec(spec), gen=gen)
    if mode != "msa":
        assert sum("packed documents" in r.getMessage() for r in caplog.records) == 1
    errs = {"out": rel(out, r_out), "lse": rel(aux.lse, r_aux.lse)}
    errs.update({n: rel(x, y) for n, x, y in zip(("dq", "dk", "dv", "d_iq", "d_ik"), gr, r_gr)})
    if mode != "dense":
        assert torch.equal(aux.block_idx, r_aux.block_idx)
        errs["kl"] = rel(aux.kl, r_aux.kl)
        errs.update({n: rel(aux.stats[n], r_aux.stats[n]) for n in ("index_entropy", "main_entropy")})
    bad = {n: e for n, e in errs.items() if not e <= TOL[torch.float32]}
    assert not bad, f"{mode}/{spec}: relative errors above 2e-5: {bad} (all {errs})"


def test_op_query_subset_and_shared_doc_start():
    """CP-like query subset (q_pos) with a [sq] doc_start shared by the batch."""
    gen = fresh_gen()
    pos = torch.sort(torch.randperm(100, generator=gen)[:37]).values
    ds = doc_layout(gen, 1, 100, "short")[0, pos]
    (out, aux, gr), (r_out, r_aux, r_gr) = run_op("msa", ds, q_pos=pos, sq=37, sk=100, hq=6, g=3, gen=gen)
    errs = {"out": rel(out, r_out), "kl": rel(aux.kl, r_aux.kl)}
    errs.update({n: rel(x, y) for n, x, y in zip(("dq", "dk", "dv", "d_iq", "d_ik"), gr, r_gr)})
    assert torch.equal(aux.block_idx, r_aux.block_idx)
    assert all(e <= 2e-5 for e in errs.values()), errs


def masked_dense(q, k, v, ds):
    """Explicit document-masked causal softmax (default positions, sq == sk)."""
    b, s, hq, d = q.shape
    G = hq // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    logits = torch.einsum("bthd,bjhd->bhtj", q, kk) / math.sqrt(d)
    j = torch.arange(s)
    vis = (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] >= ds[:, :, None])  # [b, t, j]
    p = torch.softmax(logits.masked_fill(~vis[:, None], float("-inf")), -1)
    return torch.einsum("bhtj,bjhd->bthd", p, vv)


@pytest.mark.parametrize("mode", ["msa", "dense"])
def test_full_budget_equals_masked_dense(mode):
    """K >= number of blocks: MSA == dense attention with the document mask (an explicit masked
    softmax here), and the dense path's full selection covers exactly the visible blocks."""
    gen = fresh_gen()
    b, s, block = 2, 70, 16
    ds = doc_layout(gen, b, s, "mixed")
    q, k, v, _ = make(gen, b, s, s, 4, 2, 16, torch.float32)
    cfg = MSAConfig(block_size=block, topk=8, index_dim=16)
    iq, ik = torch.randn(b, s, 2, 16, generator=gen), torch.randn(b, s, 16, generator=gen)
    out, aux = OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode=mode, doc_start=ds, compute_kl=False)
    assert rel(out, masked_dense(q, k, v, ds)) <= 2e-5
    sel = OP.full_selection(b, 2, torch.arange(s), s, block, ds)
    nb = math.ceil(s / block)
    vis = R.visible_block_mask(torch.arange(s), nb, block, ds)  # [b, s, nb]
    got = torch.zeros(b, s, nb + 1, dtype=torch.bool).scatter_(2, sel[:, 0].long().clamp_min(-1) % (nb + 1), True)
    assert torch.equal(got[..., :nb], vis), "full selection != the visible blocks"
    assert bool(((sel[..., 1:] > sel[..., :-1]) | (sel[..., 1:] < 0)).all()), "not ascending with -1 last"


def test_op_doc_start_errors():
    gen = fresh_gen()
    b, s = 1, 40
    q, k, v, _ = make(gen, b, s, s, 2, 1, 16, torch.float32)
    iq, ik = torch.randn(b, s, 1, 16, generator=gen), torch.randn(b, s, 16, generator=gen)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    for bad, msg in ((torch.zeros(s), "integers"), (torch.zeros(b, s + 1, dtype=torch.long), "shape"),
                     (torch.arange(s) + 1, "0 <= doc_start"), (torch.full((s,), -1), "0 <= doc_start")):
        with pytest.raises(ValueError, match=msg):
            OP.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", doc_start=bad)
    with pytest.raises(ValueError, match="dense impl 'flash' cannot run with doc_start"):
        OP.dense_attention_triton(q, k, v, torch.arange(s), True, 0.25, 16, impl="flash",
                                  doc_start=torch.zeros(1, s, dtype=torch.long))

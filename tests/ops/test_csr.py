"""ops/csr.py: one reverse index per selection, shared by the index/KL and the main kernels.

Checked: the CSR against a per-pair python oracle; the main kernels' work items cut from it
hold exactly the pairs, in exactly the order, of the sort-based build they replace (one
chunk and several; copied below as the oracle); the op builds the CSR once per call (sorts
counted) on every msa path; and the kernels' outputs are bit-identical with and without a
shared CSR (the deterministic ones: out, lse, dq, dk, dv, the index LSE; the KL gradients use
fp32 atomics and are compared to 1e-6 instead)."""

import itertools
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import csr as C  # noqa: E402
from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.ops import triton_index as TI  # noqa: E402
from msa_megatron.ops import triton_op as OP  # noqa: E402
from msa_megatron.ops import triton_sparse_attn as T  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)
    monkeypatch.setattr(TI, "POISON_OUTPUTS", True)


def random_selection(b, g, sq, K, nb, seed, dup=False):
    """Arbitrary block_idx with -1 holes (and, with ``dup``, repeated blocks in a row)."""
    gen = torch.Generator().manual_seed(seed)
    sel = torch.randint(-1, nb, (b, g, sq, K), generator=gen, dtype=torch.int32)
    if not dup:  # distinct per row: rank random keys
        sel = torch.argsort(torch.rand(b, g, sq, nb, generator=gen), -1)[..., :K].to(torch.int32)
        sel = torch.where(torch.rand(b, g, sq, K, generator=gen) < 0.2, -1, sel)
        sel = torch.sort(sel, -1).values
    return sel


@pytest.mark.parametrize("b, g, sq, K, nb, dup", [(1, 1, 1, 1, 1, False), (2, 3, 37, 4, 7, False),
                                                  (1, 2, 50, 3, 5, True), (2, 1, 0, 2, 3, False)])
def test_csr_matches_a_per_pair_oracle(b, g, sq, K, nb, dup):
    sel = random_selection(b, g, sq, K, nb, seed=sq + nb, dup=dup)
    csr = C.build_csr(sel, nb)
    assert csr.order.dtype == torch.int32 and csr.seg_start.shape == (b * g * nb,)
    flat = sel.reshape(-1).tolist()
    for bi, gi, blk in itertools.product(range(b), range(g), range(nb)):
        s = (bi * g + gi) * nb + blk
        want = [e for e in range(len(flat)) if flat[e] == blk and e // (sq * K) == bi * g + gi]
        got = csr.order[csr.seg_start[s]:csr.seg_end[s]].tolist()
        assert got == want, (bi, gi, blk)  # the pairs, ascending in (query, slot)
    assert int(csr.counts.sum()) == sum(x >= 0 for x in flat)
    assert C.csr_for(sel, nb, csr) is csr
    assert C.csr_for(sel, nb + 1, csr) is not csr
    if sel.numel():  # another selection (storage) -> rebuilt; empty ones share data_ptr 0 and an empty CSR
        assert C.csr_for(sel.clone(), nb, csr) is not csr


def _old_plan_runs(block_idx, nb, cq, per_item):
    """The main kernels' reverse index as built before the CSR (one stable sort of keys
    (chunk, b, g, block) over a chunk-major copy): per (chunk, b*g, block) the item runs of
    chunk-local pair ids, in launch-independent order."""
    b, g, sq, K = block_idx.shape
    nseg = b * g * nb
    nch = -(-sq // cq)
    pad = nch * cq - sq
    bp = torch.nn.functional.pad(block_idx, (0, 0, 0, pad), value=-1)
    bcat = bp.reshape(b, g, nch, cq, K).permute(2, 0, 1, 3, 4).contiguous()
    chunk_pairs = b * g * cq * K
    NS = nseg + 1
    idx = torch.arange(nch * chunk_pairs, dtype=torch.int64)
    flat = bcat.view(-1).long()
    key = (idx // chunk_pairs) * NS + torch.where(flat >= 0, ((idx // (cq * K)) % (b * g)) * nb + flat, nseg)
    _, perm = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=nch * NS)
    off = torch.cumsum(counts, 0) - counts
    runs = {}
    for c, s in itertools.product(range(nch), range(nseg)):
        o, n = int(off[c * NS + s]), int(counts[c * NS + s])
        ids = (perm[o:o + n] % chunk_pairs).tolist()
        runs[(c, s // nb, s % nb)] = [ids[i:i + per_item] for i in range(0, n, per_item)]
    return runs


def _new_plan_runs(plan, nb):
    runs = {}
    for c, ch in enumerate(plan.chunks):
        for bg, blk, st, en in zip(ch.it_bg.tolist(), ch.it_blk.tolist(), ch.it_start.tolist(), ch.it_end.tolist()):
            runs.setdefault((c, bg, blk), []).append((st, plan.perm[st:en].tolist()))
    return {k: [ids for _, ids in sorted(v)] for k, v in runs.items()}


@pytest.mark.parametrize("chunk_queries", [0, 16, 7])
def test_plan_items_equal_the_sort_based_build(chunk_queries):
    """Every work item holds the same pairs in the same order as before (so the kernels read
    the same data in the same order: bit-identical results), with one chunk and several."""
    b, g, sq, K, block, sk = 2, 2, 45, 3, 16, 100
    nb = math.ceil(sk / block)
    sel = random_selection(b, g, sq, K, nb, seed=chunk_queries)
    cfg = T.KernelConfig(item_pairs=5, chunk_queries=chunk_queries, lpt_order=False)
    plan = T.build_plan(sel, sk, block, 1, cfg)
    cq = plan.chunks[0].cq
    assert cq == (chunk_queries or sq) and len(plan.chunks) == -(-sq // cq)
    new = _new_plan_runs(plan, nb)
    old = {k: v for k, v in _old_plan_runs(sel, nb, cq, 5).items() if v}
    assert new == old
    assert plan.perm.dtype == torch.int32
    shared = T.build_plan(sel, sk, block, 1, cfg, csr=C.build_csr(sel, nb))
    assert _new_plan_runs(shared, nb) == new


def _count_csr_builds(monkeypatch):
    calls = []
    real = C.build_csr

    def counted(block_idx, nb):
        calls.append(tuple(block_idx.shape))
        return real(block_idx, nb)

    monkeypatch.setattr(C, "build_csr", counted)
    monkeypatch.setattr(OP, "build_csr", counted)
    return calls


def _op_inputs(seed, b=1, sq=70, sk=70, hq=4, g=2, d=16, di=16):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).requires_grad_()  # noqa: E731
    return [mk(b, sq, hq, d), mk(b, sk, g, d), mk(b, sk, g, d), mk(b, sq, g, di), mk(b, sk, di)]


@pytest.mark.parametrize("spec", ["main_impl=kv", "main_impl=kv,kl_fused=1", "main_impl=union",
                                  "main_impl=union,union_dkdv=union", "main_impl=kv,chunk_queries=16,item_pairs=8"])
def test_op_builds_one_csr_per_call_and_outputs_are_unchanged(monkeypatch, spec):
    """msa mode, Triton index: one CSR for the index LSE, the KL and the main forward + backward
    (separate KL, fused KL, union tile, several chunks). Against the same op with the sharing
    cut (every consumer builds its own, as before): bit-identical out, lse, dq, dk, dv, index
    selection and KL value; d_iq / d_ik (fp32 atomics) to 1e-6."""
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    kc = T.KernelConfig.from_spec(spec)
    leaves = _op_inputs(3)
    dout = torch.randn(1, 70, 4, 16, generator=torch.Generator().manual_seed(4))

    def run():
        out, aux = OP.msa_attention_triton(*leaves, cfg, mode="msa", kernel_config=kc)
        gr = torch.autograd.grad((out * dout).sum() + 3.0 * aux.kl, leaves)
        return out, aux, gr

    calls = _count_csr_builds(monkeypatch)
    out, aux, gr = run()
    assert len(calls) == 1, calls
    real_select = OP._select
    monkeypatch.setattr(OP, "_select", lambda *a, **k: real_select(*a, **k)[:3] + (None,))  # no sharing
    calls.clear()
    out2, aux2, gr2 = run()
    # the index branch's and the main kernels' own (the union dK/dV and dQ use no reverse index)
    assert len(calls) >= (1 if spec.endswith("union_dkdv=union") else 2)
    assert torch.equal(out, out2) and torch.equal(aux.lse, aux2.lse) and torch.equal(aux.block_idx, aux2.block_idx)
    torch.testing.assert_close(aux.kl, aux2.kl, rtol=1e-6, atol=0)
    for name, x, y in zip(["dq", "dk", "dv"], gr[:3], gr2[:3]):
        assert torch.equal(x, y), name
    for name, x, y in zip(["d_iq", "d_ik"], gr[3:], gr2[3:]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)
    r_out, _ = R.msa_attention(*leaves, cfg, mode="msa")
    assert ((out - r_out).norm() / r_out.norm()).item() < 2e-5


def test_given_selection_builds_one_csr(monkeypatch):
    """A selection computed earlier (context parallelism): the op builds its CSR once, for the
    index LSE, the KL kernel and the main kernels."""
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    leaves = _op_inputs(5)
    sel = TI.index_select(leaves[3].detach(), leaves[4].detach(), cfg)[0]
    calls = _count_csr_builds(monkeypatch)
    out, aux = OP.msa_attention_triton(*leaves, cfg, mode="msa", block_idx=sel,
                                       kernel_config=T.KernelConfig(main_impl="kv"))
    torch.autograd.grad(out.sum() + aux.kl, leaves)
    assert len(calls) == 1, calls


def test_reverse_index_and_lse_from_a_shared_csr():
    """The index kernels' work items cut from a given CSR equal those built from scratch; the
    index LSE is bit-identical."""
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    gen = torch.Generator().manual_seed(8)
    iq, ik = torch.randn(2, 60, 2, 16, generator=gen), torch.randn(2, 60, 16, generator=gen)
    sel, lse = TI.index_select(iq, ik, cfg)
    nb = math.ceil(60 / 16)
    csr = C.build_csr(sel, nb)
    a, b_ = TI.build_reverse_index(sel, nb, 7), TI.build_reverse_index(sel, nb, 7, csr=csr)
    assert b_.csr is csr and torch.equal(a.order, b_.order)
    for name in ("item_key", "item_start", "item_end"):
        assert torch.equal(getattr(a, name), getattr(b_, name)), name
    assert torch.equal(TI.selected_lse(iq, ik, sel, cfg, csr=csr), lse)

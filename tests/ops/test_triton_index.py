"""Triton index-branch kernels (msa_megatron/ops/triton_index.py) vs the reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (set in tests/ops/conftest.py and again
here, before triton is imported), at tiny sizes: block 16, index/head dim 16-32, a few
hundred tokens. Every test draws fresh random inputs from its own seeded generator.

Tolerances (stated once, used below):
  * Selection: identical to ``naive.select`` for every row whose reference block
    scores separate the chosen from the unchosen blocks by more than SCORE_GAP_TOL; rows
    inside that gap (fp32 near-ties: the kernel accumulates the dot products in another
    order) may differ only by swapping blocks whose scores lie within SCORE_GAP_TOL.
    Exact ties (integer-valued inputs) must match exactly: lower block index wins.
  * Index LSE: |kernel - reference| <= LSE_TOL (fp32 accumulation-order noise).
  * KL value and gradients: relative (norm-wise) error <= KL_RTOL[dtype]; bf16 inputs
    cast dS to bf16 before the gradient dots (as flash-attention backward does).
  * Entropy statistics (``return_stats=True``): index_entropy and main_entropy within
    ENT_RTOL relative of the reference's (``KLTerms`` sums / rows, / rows * G). Both sides
    see the same (bf16-valued) inputs in fp32 arithmetic: only summation order differs.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable: the Triton kernel tests need it")

from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_index as TI  # noqa: E402

SCORE_GAP_TOL = 1e-3
LSE_TOL = 2e-5
KL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}
ENT_RTOL = 1e-5


def assert_stats_match(stats, terms, G):
    """Kernel entropy means vs the reference's KLTerms sums (definitions of msa_attention)."""
    ref = {"index_entropy": terms.index_entropy.item() / terms.rows,
           "main_entropy": terms.main_entropy.item() / (terms.rows * G)}
    assert set(stats) == set(ref)
    for key, r in ref.items():
        v = stats[key]
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
        assert abs(v.item() - r) <= ENT_RTOL * max(1.0, abs(r)), (key, v.item(), r)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Outputs start as NaN / -7 so any entry a kernel fails to write shows up."""
    monkeypatch.setattr(TI, "POISON_OUTPUTS", True)


def _gen(request) -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"[{request.node.name}] seed={seed}")
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _make_q_pos(kind: str, sq: int, sk: int, gen) -> torch.Tensor:
    if kind == "default":
        return None
    if kind == "subset":  # sorted random subset of positions (sq < sk)
        return torch.sort(torch.randperm(sk, generator=gen)[:sq]).values
    if kind == "zigzag":  # context-parallel style: first and last chunks
        half = sq // 2
        return torch.cat([torch.arange(0, half), torch.arange(sk - (sq - half), sk)])
    raise ValueError(kind)


def assert_selection_ok(sel, iq, ik, cfg, q_pos, tol=SCORE_GAP_TOL):
    """Exact agreement except near-ties within ``tol``; returns the number of near-tie rows."""
    b, sq, g, _ = iq.shape
    sk = ik.shape[1]
    ref = R.select(iq, ik, cfg, q_pos)
    assert sel.dtype == torch.int32 and sel.shape == ref.shape
    qp = R._positions(q_pos, sq, sk, iq.device)
    nb = math.ceil(sk / cfg.block_size)
    own = (qp // cfg.block_size).view(1, 1, sq, 1)
    # Structure: valid entries ascending, then -1 padding, all visible, count min(K, visible).
    valid = sel >= 0
    assert bool((sel >= -1).all()) and bool((sel <= own).all()), "future or garbage block selected"
    assert bool((valid[..., :-1] | ~valid[..., 1:]).all()), "-1 padding must come last"
    v = torch.where(valid, sel, torch.full_like(sel, nb + 1))
    assert bool(((v[..., 1:] > v[..., :-1]) | ~valid[..., 1:]).all()), "selection must be strictly ascending"
    n_expect = torch.clamp(own + 1, max=cfg.topk).squeeze(-1)
    assert torch.equal(valid.sum(-1), n_expect.expand_as(valid.sum(-1)).to(valid.sum(-1).dtype))
    forced = R.forced_block_mask(qp, nb, cfg)  # [sq, nb]
    onehot = torch.zeros(b, g, sq, nb + 1, dtype=torch.bool)
    onehot.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)).long(), True)
    onehot = onehot[..., :nb]
    assert bool((onehot | ~forced).all()), "a forced (own / local / init) block is missing"
    # Agreement with the reference.
    diff_rows = (sel != ref).any(-1)
    if bool(diff_rows.any()):
        scores = R.index_block_scores(iq, ik, cfg.block_size, q_pos)
        ref_hot = torch.zeros(b, g, sq, nb + 1, dtype=torch.bool)
        ref_hot.scatter_(-1, torch.where(ref >= 0, ref, torch.full_like(ref, nb)).long(), True)
        ref_hot = ref_hot[..., :nb]
        kern_only = onehot & ~ref_hot
        ref_only = ref_hot & ~onehot
        hi = scores.masked_fill(~ref_only, float("-inf")).amax(-1)
        lo = scores.masked_fill(~kern_only, float("inf")).amin(-1)
        gap = (hi - lo)[diff_rows]
        assert bool((gap <= tol).all()), f"selection differs beyond near-ties: max score gap {gap.max().item():.3g}"
    return int(diff_rows.sum())


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# (dtype, b, sq, sk, g, G, di, d, block, K, init, local, q_pos kind)
CASES = [
    (torch.float32, 1, 200, 200, 1, 1, 16, 16, 16, 4, 0, 1, "default"),
    (torch.float32, 2, 150, 150, 2, 2, 32, 16, 16, 5, 1, 2, "default"),
    (torch.bfloat16, 2, 131, 131, 2, 4, 16, 16, 16, 4, 0, 1, "default"),
    (torch.float32, 1, 60, 237, 4, 1, 16, 16, 16, 6, 2, 2, "subset"),
    (torch.bfloat16, 1, 64, 250, 1, 2, 32, 32, 32, 3, 0, 1, "zigzag"),
    (torch.float32, 1, 120, 120, 2, 1, 16, 16, 48, 2, 0, 1, "default"),  # block 48: 3 sub-tiles of 16
]


def _case_id(c):
    return f"{str(c[0])[6:]}-b{c[1]}-sq{c[2]}-sk{c[3]}-g{c[4]}-G{c[5]}-di{c[6]}-B{c[8]}-K{c[9]}-i{c[10]}l{c[11]}-{c[12]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_select_lse_and_sparse_kl_match_reference(case, request):
    dtype, b, sq, sk, g, G, di, d, block, K, init, local, qk = case
    gen = _gen(request)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di, init_blocks=init, local_blocks=local)
    iq, ik = _randn(gen, b, sq, g, di, dtype=dtype), _randn(gen, b, sk, di, dtype=dtype)
    q, k, v = _randn(gen, b, sq, g * G, d, dtype=dtype), _randn(gen, b, sk, g, d, dtype=dtype), _randn(gen, b, sk, g, d, dtype=dtype)
    q_pos = _make_q_pos(qk, sq, sk, gen)

    sel, lse, plan = TI.index_select(iq, ik, cfg, q_pos, return_plan=True)
    assert_selection_ok(sel, iq, ik, cfg, q_pos)

    ref_lse = R.selected_index_lse(iq, ik, sel, cfg, q_pos)
    assert torch.isfinite(lse).all()
    assert (lse - ref_lse).abs().max().item() <= LSE_TOL * max(1.0, ref_lse.abs().max().item())

    _, main_lse = R.sparse_attention(q, k, v, sel, block, q_pos)
    kl, d_iq, d_ik, stats = TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, lse, cfg, q_pos, plan=plan,
                                                  return_stats=True)
    assert d_iq.dtype == dtype and d_ik.dtype == dtype and d_iq.shape == iq.shape and d_ik.shape == ik.shape
    iq_r, ik_r = iq.detach().clone().requires_grad_(), ik.detach().clone().requires_grad_()
    terms = R.sparse_kl_terms(q, k, iq_r, ik_r, sel, cfg, q_pos)
    ref_kl = terms.kl / terms.rows
    ref_kl.backward()
    assert_stats_match(stats, terms, G)
    tol = KL_RTOL[dtype]
    assert abs(kl.item() - ref_kl.item()) <= 1e-4 * max(1.0, abs(ref_kl.item())), (kl.item(), ref_kl.item())
    assert _rel(d_iq, iq_r.grad) <= tol, _rel(d_iq, iq_r.grad)
    assert _rel(d_ik, ik_r.grad) <= tol, _rel(d_ik, ik_r.grad)


def test_tie_rule_exact_ties_lower_block_wins(request):
    """Integer-valued inputs: block scores tie exactly and often; the kernel must match the
    reference bit for bit (ties -> lower block index)."""
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=5, index_dim=16, init_blocks=0, local_blocks=1)
    b, sq, g = 2, 190, 2
    iq = torch.randint(-1, 2, (b, sq, g, 16), generator=gen).float()
    ik = torch.randint(-1, 2, (b, sq, 16), generator=gen).float()
    sel, _ = TI.index_select(iq, ik, cfg)
    ref = R.select(iq, ik, cfg)
    scores = R.index_block_scores(iq, ik, 16)
    assert int((scores[..., :-1] == scores[..., 1:]).sum()) > 100, "the inputs should produce many exact ties"
    assert torch.equal(sel, ref)
    # All-equal scores: the lowest blocks win, plus the own block.
    sel0, _ = TI.index_select(iq, torch.zeros_like(ik), cfg)
    assert torch.equal(sel0, R.select(iq, torch.zeros_like(ik), cfg))
    assert torch.equal(sel0[0, 0, -1], torch.tensor([0, 1, 2, 3, (sq - 1) // 16], dtype=torch.int32))


def test_few_visible_blocks_keep_all_and_pad(request):
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=8, index_dim=16, init_blocks=1, local_blocks=1)
    iq, ik = _randn(gen, 1, 70, 2, 16), _randn(gen, 1, 70, 16)
    sel, lse = TI.index_select(iq, ik, cfg)
    assert torch.equal(sel, R.select(iq, ik, cfg))
    # 70 tokens = 5 blocks < K: query t keeps blocks 0..t//16 and pads the rest with -1.
    t = torch.arange(70)
    expect = torch.where(torch.arange(8)[None, :] <= (t // 16)[:, None], torch.arange(8)[None, :], -1).int()
    assert torch.equal(sel[0, 1], expect)
    # Every visible token is selected: the LSE is the dense causal one.
    assert (lse - TI.dense_index_lse(iq, ik, cfg)).abs().max().item() <= LSE_TOL * 10


@pytest.mark.parametrize("dtype,G,qk", [(torch.float32, 4, "default"), (torch.bfloat16, 1, "subset")])
def test_dense_kl_backward_matches_reference(dtype, G, qk, request):
    gen = _gen(request)
    b, sq, sk, g, di, d = 2, 90, 90 if qk == "default" else 150, 2, 16, 16
    sq = sq if qk == "default" else 50
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    iq, ik = _randn(gen, b, sq, g, di, dtype=dtype), _randn(gen, b, sk, di, dtype=dtype)
    q, k = _randn(gen, b, sq, g * G, d, dtype=dtype), _randn(gen, b, sk, g, d, dtype=dtype)
    q_pos = _make_q_pos(qk, sq, sk, gen)
    _, main_lse = R.dense_attention(q, k, k, q_pos)
    ilse = TI.dense_index_lse(iq, ik, cfg, q_pos)
    qp = R._positions(q_pos, sq, sk, "cpu")
    s = torch.einsum("bqgd,bkd->bgqk", iq.float(), ik.float()) * cfg.index_softmax_scale
    ref_ilse = torch.logsumexp(s.masked_fill(torch.arange(sk) > qp[:, None], float("-inf")), -1)
    assert (ilse - ref_ilse).abs().max().item() <= LSE_TOL * max(1.0, ref_ilse.abs().max().item())

    grad_scale = torch.tensor(0.7)
    kl, d_iq, d_ik, stats = TI.dense_kl_backward(q, k, iq, ik, main_lse, cfg, q_pos, grad_scale=grad_scale,
                                                 return_stats=True)
    iq_r, ik_r = iq.detach().clone().requires_grad_(), ik.detach().clone().requires_grad_()
    terms = R.dense_kl_terms(q, k, iq_r, ik_r, cfg, q_pos)
    ref_kl = terms.kl / terms.rows
    (ref_kl * 0.7).backward()
    assert_stats_match(stats, terms, G)
    assert abs(kl.item() - ref_kl.item()) <= 1e-4 * max(1.0, abs(ref_kl.item()))
    assert _rel(d_iq, iq_r.grad) <= KL_RTOL[dtype], _rel(d_iq, iq_r.grad)
    assert _rel(d_ik, ik_r.grad) <= KL_RTOL[dtype], _rel(d_ik, ik_r.grad)


def test_sparse_kl_grad_scale_and_plan_rebuild(request):
    """A float grad_scale scales the gradients; without a plan the reverse index is rebuilt;
    int64 selections and a non-contiguous main LSE are accepted."""
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    b, sq, g, G, d = 1, 100, 2, 2, 16
    iq, ik = _randn(gen, b, sq, g, 16), _randn(gen, b, sq, 16)
    q, k = _randn(gen, b, sq, g * G, d), _randn(gen, b, sq, g, d)
    sel, lse = TI.index_select(iq, ik, cfg)
    _, main_lse = R.sparse_attention(q, k, k, sel, 16)
    kl1, a1, b1 = TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, lse, cfg)
    strided_lse = main_lse.transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    kl2, a2, b2, _ = TI.sparse_kl_backward(q, k, iq, ik, sel.long(), strided_lse, lse, cfg, grad_scale=-2.5,
                                           return_stats=True)  # stats on: same value and gradients
    assert abs(kl1.item() - kl2.item()) <= 1e-6 * max(1.0, abs(kl1.item()))
    assert _rel(a2, -2.5 * a1) <= 1e-5 and _rel(b2, -2.5 * b1) <= 1e-5
    assert kl1.item() >= -1e-6  # a KL divergence


@pytest.mark.parametrize("dense", [False, True])
def test_entropy_of_uniform_distributions(dense, request):
    """Closed form, independent of the reference: iq = 0 and q = 0 make the student and every
    head's softmax uniform over a row's tokens, so both entropies are the mean over rows of
    ln(number of tokens); a normalizer rescales the means. One fp32 launch, b=2, G=2."""
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    b, sq, g, G, d = 2, 70, 2, 2, 16
    iq, ik = torch.zeros(b, sq, g, 16), _randn(gen, b, sq, 16)
    q, k = torch.zeros(b, sq, g * G, d), _randn(gen, b, sq, g, d)
    pos = torch.arange(sq)
    if dense:
        count = (pos + 1).float().expand(b, g, sq)
        main_lse = torch.log(count[:, :1].repeat_interleave(g * G, 1))
        ilse = torch.log(count).contiguous()
        res = TI.dense_kl_backward(q, k, iq, ik, main_lse, cfg, normalizer=0.5 * b * g * sq, index_lse=ilse,
                                   return_stats=True)
    else:
        sel, ilse = TI.index_select(iq, ik, cfg)
        _, valid = R.selected_token_index(sel, 16, pos, sq)
        count = valid.sum(-1).float()  # [b, g, sq]
        main_lse = torch.log(count).repeat_interleave(G, 1)
        res = TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, ilse, cfg, normalizer=0.5 * b * g * sq,
                                    return_stats=True)
    kl, _, _, stats = res
    expect = 2.0 * torch.log(count).mean().item()  # normalizer = half the rows: twice the mean
    assert abs(stats["index_entropy"].item() - expect) <= 1e-5 * expect
    assert abs(stats["main_entropy"].item() - expect) <= 1e-5 * expect
    assert abs(kl.item()) <= 1e-5  # teacher == student


def test_unsupported_inputs_raise_clear_errors(request):
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    iq, ik = _randn(gen, 1, 20, 1, 16), _randn(gen, 1, 20, 16)
    with pytest.raises(TI.UnsupportedInputError, match="float64"):
        TI.index_select(iq.double(), ik.double(), cfg)
    with pytest.raises(TI.UnsupportedInputError, match="index_dim"):
        TI.index_select(iq, ik, cfg.replace(index_dim=32))
    with pytest.raises(TI.UnsupportedInputError, match="must share a dtype"):
        TI.index_select(iq, ik.bfloat16(), cfg)
    with pytest.raises(TI.UnsupportedInputError, match="q_pos"):
        TI.index_select(iq, ik, cfg, q_pos=torch.tensor([25] * 20))
    with pytest.raises(TI.UnsupportedInputError, match="iq must be"):
        TI.index_select(iq[0], ik, cfg)
    q, k = _randn(gen, 1, 20, 2, 16), _randn(gen, 1, 20, 1, 16)
    with pytest.raises(TI.UnsupportedInputError, match="main_lse"):
        TI.dense_kl_backward(q, k, iq, ik, torch.zeros(1, 2, 20, dtype=torch.float64), cfg)


def test_branch_free_topk_update_matches(request, monkeypatch):
    """MSA_INDEX_LAZY_TOPK=0 path (top-K updated on every block) selects the same blocks."""
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16, init_blocks=1)
    iq = torch.randint(-1, 2, (1, 150, 2, 16), generator=gen).float()
    ik = torch.randint(-1, 2, (1, 150, 16), generator=gen).float()
    lazy = TI._launch_config(iq.device)
    monkeypatch.setattr(TI, "_launch_config", lambda dev: TI.IndexConfig(**{**lazy.__dict__, "lazy_topk": False}))
    sel, _ = TI.index_select(iq, ik, cfg)
    assert torch.equal(sel, R.select(iq, ik, cfg))


def test_bench_baseline_and_pair_counts(request):
    """The benchmark's plain-torch baseline selects like the reference, and the FLOP
    helpers count selected pairs exactly (checked against the reference's token mask)."""
    from msa_megatron.bench.impls_index import torch_index_select
    from msa_megatron.bench.registry import Case

    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=4, index_dim=16, init_blocks=1, local_blocks=2)
    iq, ik = _randn(gen, 2, 150, 2, 16), _randn(gen, 2, 150, 16)
    assert torch.equal(torch_index_select(iq, ik, 16, 4, 2, 1, chunk_bytes=40_000), R.select(iq, ik, cfg))
    case = Case(L=150, block=16, topk=4, device="cpu")
    sel = R.select(iq[:1, :, :1], ik[:1], cfg.replace(init_blocks=0, local_blocks=1))
    _, valid = R.selected_token_index(sel, 16, torch.arange(150), 150)
    assert case.selected_pairs() == float(valid.sum())
    assert case.causal_pairs() == 150 * 151 / 2


# ----------------------------------------------------------------------------- FP8 selection, no-LSE path, config
def _separated_inputs(gen, b, s, g, di, block):
    """Positive inputs on two disjoint halves of the index dim: every key of block n is
    (a_n w1, c_n w2), an iq row is (x, 0) or (0, x), with a_n, c_n distinct powers of 1.5.
    All products are positive, so FP8 e4m3 rounding (<= 6.25% per element on each side)
    moves a block score by < 13%, while block scores differ by >= 50%."""
    nb = -(-s // block)
    h = di // 2
    levels = 1.5 ** torch.arange(nb, dtype=torch.float32)
    a = levels[torch.randperm(nb, generator=gen)]
    c = levels[torch.randperm(nb, generator=gen)]
    blk = torch.arange(s) // block
    w = 0.5 + torch.rand(2, h, generator=gen)
    ik = torch.cat([a[blk, None] * w[0], c[blk, None] * w[1]], dim=-1).expand(b, s, di).contiguous()
    x = 0.5 + torch.rand(b, s, g, h, generator=gen)
    first = torch.randint(0, 2, (b, s, g, 1), generator=gen).bool()
    iq = torch.cat([x * first, x * ~first], dim=-1)
    return iq, ik


def test_fp8_selection_agrees_with_bf16_on_separated_scores(request):
    """FP8 (iq per-row, ik per-tensor scaled) selects exactly the bf16 / reference blocks
    when block scores are well separated; on random inputs it equals the reference run on
    the same FP8-quantised values (up to near-ties of the fp32 accumulation)."""
    if TI.FP8_DTYPE is None:
        pytest.skip("torch without float8_e4m3fn")
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=4, index_dim=32)
    iq, ik = _separated_inputs(gen, 2, 211, 2, 32, 16)
    iq, ik = iq.bfloat16(), ik.bfloat16()
    sel8 = TI.index_select_fp8(iq, ik, cfg)
    sel16, _ = TI.index_select(iq, ik, cfg)
    assert torch.equal(sel8, sel16)
    assert torch.equal(sel8, R.select(iq.float(), ik.float(), cfg))
    # random inputs: same as the reference on the quantised values
    iq, ik = _randn(gen, 1, 150, 2, 32, dtype=torch.bfloat16), _randn(gen, 1, 150, 32, dtype=torch.bfloat16)
    iq8, ik8, iq_scale, ik_scale = TI.fp8_index_inputs(iq, ik)
    assert iq8.dtype == TI.FP8_DTYPE and ik_scale.dim() == 0 and iq_scale.shape == iq.shape[:-1]
    assert _rel(iq8.float() * iq_scale[..., None], iq) < 0.05 and _rel(ik8.float() * ik_scale, ik) < 0.05
    assert_selection_ok(TI.index_select_fp8(iq, ik, cfg), iq8.float(), ik8.float(), cfg, None)


def test_selection_without_lse_and_fp8_prefill_config(request, monkeypatch):
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=4, index_dim=16)
    iq, ik = _randn(gen, 1, 130, 2, 16), _randn(gen, 1, 130, 16)
    full, lse = TI.index_select(iq, ik, cfg)
    sel, none = TI.index_select(iq, ik, cfg, with_lse=False)
    assert none is None and lse is not None and torch.equal(sel, full)
    with pytest.raises(TI.UnsupportedInputError, match="with_lse"):
        TI.index_select(iq, ik, cfg, return_plan=True, with_lse=False)
    with pytest.raises(TI.UnsupportedInputError, match="with_lse=False"):
        TI.index_select(iq, ik, cfg, fp8=True)
    assert TI.IndexConfig().sel_stages == 2 and not TI.IndexConfig().fp8_prefill
    # fp8_prefill: selections without LSE go through FP8, those with LSE stay in the input dtype
    monkeypatch.setattr(TI, "DEFAULT_INDEX_CONFIG", TI.IndexConfig(fp8_prefill=True))
    assert torch.equal(TI.index_select(iq, ik, cfg, with_lse=False)[0], TI.index_select_fp8(iq, ik, cfg))
    assert torch.equal(TI.index_select(iq, ik, cfg)[0], full)


def test_op_prefill_skips_index_lse(request, monkeypatch):
    """msa_attention_triton(compute_kl=False): selection without index LSE / reverse index."""
    from msa_megatron.ops import triton_op

    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    q, k, v = _randn(gen, 1, 70, 2, 16), _randn(gen, 1, 70, 1, 16), _randn(gen, 1, 70, 1, 16)
    iq, ik = _randn(gen, 1, 70, 1, 16), _randn(gen, 1, 70, 16)
    calls = []
    real = TI.index_select

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(TI, "index_select", spy)
    monkeypatch.setattr(TI, "selected_lse", lambda *a, **k: pytest.fail("index LSE computed without KL"))
    out, aux = triton_op.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", compute_kl=False)
    assert aux.kl is None and calls and all(c.get("with_lse") is False for c in calls)
    assert torch.equal(aux.block_idx, R.select(iq, ik, cfg))
    ref_out, _ = R.msa_attention(q, k, v, iq, ik, cfg, mode="msa")
    assert _rel(out, ref_out) < 1e-4
    # a given selection is not re-scored either
    out2, aux2 = triton_op.msa_attention_triton(q, k, v, iq, ik, cfg, mode="msa", compute_kl=False,
                                                block_idx=aux.block_idx)
    assert torch.equal(out2, out) and aux2.kl is None


# ----------------------------------------------------------------------------- packed documents (doc_start)
# Same tolerances as above. Layouts: "short" = documents of 1..12 tokens (shorter than a
# block; blocks split by several boundaries), "mixed" = 1..60 tokens, "one" = a single
# document spanning everything. Each batch row draws its own layout.
def _doc_start(gen, b, sk, layout, q_pos):
    ids = torch.zeros(b, sk, dtype=torch.long)
    if layout != "one":
        hi = {"short": 13, "mixed": 61}[layout]
        for bi in range(b):
            p, doc = 0, 0
            while p < sk:
                n = int(torch.randint(1, hi, (1,), generator=gen))
                ids[bi, p:p + n] = doc
                p, doc = p + n, doc + 1
    ds = R.doc_start_from_doc_ids(ids)  # [b, sk] per key position
    qp = R._positions(q_pos, q_pos.numel() if q_pos is not None else sk, sk, "cpu")
    return ds[:, qp]


def assert_doc_selection_ok(sel, iq, ik, cfg, q_pos, ds, tol=SCORE_GAP_TOL):
    """assert_selection_ok with documents: visible blocks are [doc block, own block]."""
    b, sq, g, _ = iq.shape
    sk = ik.shape[1]
    ref = R.select(iq, ik, cfg, q_pos, doc_start=ds)
    assert sel.dtype == torch.int32 and sel.shape == ref.shape
    qp = R._positions(q_pos, sq, sk, iq.device)
    nb = math.ceil(sk / cfg.block_size)
    own = (qp // cfg.block_size).view(1, 1, sq, 1)
    first = (ds // cfg.block_size).view(b, 1, sq, 1)
    valid = sel >= 0
    assert bool((sel >= -1).all()) and bool((sel <= own).all()), "future or garbage block selected"
    assert bool((~valid | (sel >= first)).all()), "a block before the query's document was selected"
    assert bool((valid[..., :-1] | ~valid[..., 1:]).all()), "-1 padding must come last"
    v = torch.where(valid, sel, torch.full_like(sel, nb + 1))
    assert bool(((v[..., 1:] > v[..., :-1]) | ~valid[..., 1:]).all()), "selection must be strictly ascending"
    n_expect = torch.clamp(own - first + 1, max=cfg.topk).squeeze(-1).expand(b, g, sq)
    assert torch.equal(valid.sum(-1), n_expect.to(valid.sum(-1).dtype))
    forced = R.forced_block_mask(qp, nb, cfg, doc_start=ds)[:, None]  # [b, 1, sq, nb]
    onehot = torch.zeros(b, g, sq, nb + 1, dtype=torch.bool)
    onehot.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)).long(), True)
    onehot = onehot[..., :nb]
    assert bool((onehot | ~forced).all()), "a forced (own / local / init) block is missing"
    diff_rows = (sel != ref).any(-1)
    if bool(diff_rows.any()):
        scores = R.index_block_scores(iq, ik, cfg.block_size, q_pos, doc_start=ds)
        ref_hot = torch.zeros(b, g, sq, nb + 1, dtype=torch.bool)
        ref_hot.scatter_(-1, torch.where(ref >= 0, ref, torch.full_like(ref, nb)).long(), True)
        ref_hot = ref_hot[..., :nb]
        hi = scores.masked_fill(~(ref_hot & ~onehot), float("-inf")).amax(-1)
        lo = scores.masked_fill(~(onehot & ~ref_hot), float("inf")).amin(-1)
        gap = (hi - lo)[diff_rows]
        assert bool((gap <= tol).all()), f"selection differs beyond near-ties: max score gap {gap.max().item():.3g}"
    return int(diff_rows.sum())


# (dtype, b, sq, sk, g, G, di, d, block, K, init, local, q_pos kind, layout)
DOC_CASES = [
    (torch.float32, 1, 150, 150, 1, 1, 16, 16, 16, 4, 0, 1, "default", "short"),
    (torch.float32, 2, 130, 130, 2, 3, 32, 16, 16, 3, 1, 2, "default", "mixed"),
    (torch.bfloat16, 2, 131, 131, 2, 4, 16, 16, 16, 4, 0, 1, "default", "mixed"),
    (torch.float32, 1, 60, 237, 4, 1, 16, 16, 16, 5, 2, 2, "subset", "mixed"),
    (torch.bfloat16, 1, 64, 250, 1, 2, 32, 32, 32, 3, 0, 1, "zigzag", "short"),
    (torch.float32, 1, 120, 120, 2, 1, 16, 16, 48, 2, 1, 1, "default", "one"),  # block 48: 3 sub-tiles of 16
]


@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: _case_id(c) + "-" + c[13])
def test_documents_select_lse_and_sparse_kl_match_reference(case, request):
    dtype, b, sq, sk, g, G, di, d, block, K, init, local, qk, layout = case
    gen = _gen(request)
    cfg = MSAConfig(block_size=block, topk=K, index_dim=di, init_blocks=init, local_blocks=local)
    iq, ik = _randn(gen, b, sq, g, di, dtype=dtype), _randn(gen, b, sk, di, dtype=dtype)
    q, k = _randn(gen, b, sq, g * G, d, dtype=dtype), _randn(gen, b, sk, g, d, dtype=dtype)
    q_pos = _make_q_pos(qk, sq, sk, gen)
    ds = _doc_start(gen, b, sk, layout, q_pos)

    sel, lse, plan = TI.index_select(iq, ik, cfg, q_pos, return_plan=True, doc_start=ds)
    assert_doc_selection_ok(sel, iq, ik, cfg, q_pos, ds)
    ref_lse = R.selected_index_lse(iq, ik, sel, cfg, q_pos, doc_start=ds)
    assert torch.isfinite(lse).all()
    assert (lse - ref_lse).abs().max().item() <= LSE_TOL * max(1.0, ref_lse.abs().max().item())
    # the score-only variant sees the same visible keys: its max equals the reference's
    best = TI.index_block_max(iq, ik, cfg, q_pos, doc_start=ds).view(b, sq, g)
    ref_best = R.index_block_scores(iq, ik, block, q_pos, doc_start=ds).amax(-1).permute(0, 2, 1)
    assert (best - ref_best).abs().max().item() <= 1e-4 * max(1.0, ref_best.abs().max().item())

    _, main_lse = R.sparse_attention(q, k, k, sel, block, q_pos, doc_start=ds)
    kl, d_iq, d_ik, stats = TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, lse, cfg, q_pos, plan=plan,
                                                  return_stats=True, doc_start=ds)
    iq_r, ik_r = iq.detach().clone().requires_grad_(), ik.detach().clone().requires_grad_()
    terms = R.sparse_kl_terms(q, k, iq_r, ik_r, sel, cfg, q_pos, doc_start=ds)
    ref_kl = terms.kl / terms.rows
    ref_kl.backward()
    assert_stats_match(stats, terms, G)
    assert abs(kl.item() - ref_kl.item()) <= 1e-4 * max(1.0, abs(ref_kl.item())), (kl.item(), ref_kl.item())
    assert _rel(d_iq, iq_r.grad) <= KL_RTOL[dtype], _rel(d_iq, iq_r.grad)
    assert _rel(d_ik, ik_r.grad) <= KL_RTOL[dtype], _rel(d_ik, ik_r.grad)


@pytest.mark.parametrize("dtype,G,qk,layout", [(torch.float32, 4, "default", "short"),
                                               (torch.bfloat16, 3, "subset", "mixed")])
def test_documents_dense_lse_and_dense_kl_match_reference(dtype, G, qk, layout, request):
    gen = _gen(request)
    b, g, di, d = 2, 2, 16, 16
    sq, sk = (90, 90) if qk == "default" else (50, 150)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    iq, ik = _randn(gen, b, sq, g, di, dtype=dtype), _randn(gen, b, sk, di, dtype=dtype)
    q, k = _randn(gen, b, sq, g * G, d, dtype=dtype), _randn(gen, b, sk, g, d, dtype=dtype)
    q_pos = _make_q_pos(qk, sq, sk, gen)
    ds = _doc_start(gen, b, sk, layout, q_pos)
    qp = R._positions(q_pos, sq, sk, "cpu")
    ilse = TI.dense_index_lse(iq, ik, cfg, q_pos, doc_start=ds)
    s = torch.einsum("bqgd,bkd->bgqk", iq.float(), ik.float()) * cfg.index_softmax_scale
    key = torch.arange(sk)
    hidden = (key[None, None] > qp[None, :, None]) | (key[None, None] < ds[:, :, None])  # [b, sq, sk]
    ref_ilse = torch.logsumexp(s.masked_fill(hidden[:, None], float("-inf")), -1)
    assert (ilse - ref_ilse).abs().max().item() <= LSE_TOL * max(1.0, ref_ilse.abs().max().item())

    main_lse = TI.dense_main_lse(q, k, q_pos, doc_start=ds)
    kl, d_iq, d_ik, stats = TI.dense_kl_backward(q, k, iq, ik, main_lse, cfg, q_pos, grad_scale=0.7,
                                                 return_stats=True, doc_start=ds)
    iq_r, ik_r = iq.detach().clone().requires_grad_(), ik.detach().clone().requires_grad_()
    terms = R.dense_kl_terms(q, k, iq_r, ik_r, cfg, q_pos, doc_start=ds)
    ref_kl = terms.kl / terms.rows
    (ref_kl * 0.7).backward()
    assert_stats_match(stats, terms, G)
    assert abs(kl.item() - ref_kl.item()) <= 1e-4 * max(1.0, abs(ref_kl.item()))
    assert _rel(d_iq, iq_r.grad) <= KL_RTOL[dtype], _rel(d_iq, iq_r.grad)
    assert _rel(d_ik, ik_r.grad) <= KL_RTOL[dtype], _rel(d_ik, ik_r.grad)


def test_documents_full_budget_and_single_document_reduce_exactly(request):
    """K >= blocks: every visible block is selected and the selected LSE equals the dense
    document-masked one. One document (doc_start = 0, [sq] broadcast form) gives results
    bit-identical to doc_start=None (the plain causal kernels)."""
    gen = _gen(request)
    b, sq, g, G, di = 2, 100, 2, 2, 16
    cfg = MSAConfig(block_size=16, topk=7, index_dim=di, init_blocks=1)
    iq, ik = _randn(gen, b, sq, g, di), _randn(gen, b, sq, di)
    q, k = _randn(gen, b, sq, g * G, 16), _randn(gen, b, sq, g, 16)
    ds = _doc_start(gen, b, sq, "mixed", None)
    sel, lse = TI.index_select(iq, ik, cfg, doc_start=ds)
    t = torch.arange(sq)
    first, own = (ds // 16)[:, None, :, None], (t // 16)[None, None, :, None]
    blk = torch.arange(7)[None, None, None, :] + first
    assert torch.equal(sel, torch.where(blk <= own, blk, -1).int().expand_as(sel))
    assert (lse - TI.dense_index_lse(iq, ik, cfg, doc_start=ds)).abs().max().item() <= LSE_TOL * 10

    zeros = torch.zeros(sq, dtype=torch.long)
    cfg = cfg.replace(topk=3)
    s0, l0, p0 = TI.index_select(iq, ik, cfg, return_plan=True)
    s1, l1 = TI.index_select(iq, ik, cfg, doc_start=zeros)
    assert torch.equal(s0, s1) and torch.equal(l0, l1)
    _, main_lse = R.sparse_attention(q, k, k, s0, 16)
    r0 = TI.sparse_kl_backward(q, k, iq, ik, s0, main_lse, l0, cfg, plan=p0)
    r1 = TI.sparse_kl_backward(q, k, iq, ik, s0, main_lse, l0, cfg, plan=p0, doc_start=zeros)
    assert all(torch.equal(x, y) for x, y in zip(r0, r1))
    d_lse = R.dense_attention(q, k, k)[1]
    assert torch.equal(TI.dense_index_lse(iq, ik, cfg), TI.dense_index_lse(iq, ik, cfg, doc_start=zeros))
    r0 = TI.dense_kl_backward(q, k, iq, ik, d_lse, cfg)
    r1 = TI.dense_kl_backward(q, k, iq, ik, d_lse, cfg, doc_start=zeros)
    assert all(torch.equal(x, y) for x, y in zip(r0, r1))


def test_documents_bad_doc_start_raises(request):
    gen = _gen(request)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    iq, ik = _randn(gen, 1, 20, 1, 16), _randn(gen, 1, 20, 16)
    with pytest.raises(TI.UnsupportedInputError, match="doc_start must satisfy"):
        TI.index_select(iq, ik, cfg, doc_start=torch.full((20,), 5))
    with pytest.raises(TI.UnsupportedInputError, match="doc_start must have shape"):
        TI.index_select(iq, ik, cfg, doc_start=torch.zeros(3, 20, dtype=torch.long))
    with pytest.raises(TI.UnsupportedInputError, match="integers"):
        TI.dense_index_lse(iq, ik, cfg, doc_start=torch.zeros(20))

"""Triton decode kernel (ops/triton_decode.py) vs the pure-PyTorch decode step
(ops/decode_naive.py), under TRITON_INTERPRET=1 on CPU (compiled on the GPU where CUDA is
present, see conftest.py) at tiny sizes (block 16, head and index dim 16-32, caches of 1-130
tokens in Megatron's [S, b, ...] layout, padded with NaN past each row's length so a read
beyond it shows). ``test_gpu_paper_layout`` (marked gpu) runs the paper's layout on CUDA.

Tolerances:
  * selection: identical to the naive one, except that in a near-tie (reference block
    scores within SCORE_TOL of each other: the kernel sums the index dot products in
    another order) the two blocks may swap. Exact ties (integer-valued inputs) must match:
    the lower block index wins.
  * out / lse: fp32 within 2e-5 (accumulation order, exp2 vs exp); bf16/fp16 outputs within
    2 ulp-ish (rtol 1.6e-2, atol 1e-2: the naive step rounds once from fp32, the kernel too,
    after summing in another order), lse within 1e-4 (it stays fp32).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="the Triton decode kernel tests need triton (interpreter)")

from msa_megatron.ops import naive as R  # noqa: E402
from msa_megatron.config import MSAConfig  # noqa: E402
from msa_megatron.ops import triton_decode as TD  # noqa: E402
from msa_megatron.ops.decode_naive import dense_decode_naive, msa_decode_naive  # noqa: E402

from .conftest import DEVICE  # noqa: E402

SCORE_TOL = 1e-4
OUT_TOL = {torch.float32: dict(rtol=0, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
           torch.float16: dict(rtol=2e-3, atol=2e-3)}
LSE_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def make_step(b, lens, hq, g, d, di, dtype, seed, S=None, integer=False):
    """One decode step's inputs: q [b, hq, d], iq [b, g, di], caches [S, b, ...] (NaN past lens)."""
    gen = torch.Generator().manual_seed(seed)
    S = S or max(lens) + 3

    def r(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=gen).to(dtype)
        return torch.randn(*shape, generator=gen).to(dtype)

    def cache(*tail):
        c = torch.full((S, b) + tail, float("nan"), dtype=dtype)
        for i, L in enumerate(lens):
            c[:L, i] = r(L, *tail)
        return c

    return tuple(t.to(DEVICE) for t in (r(b, hq, d), cache(g, d), cache(g, d), r(b, g, di), cache(di)))


def assert_selection_close(sel_k, sel_n, iq, ik_cache, lens, cfg):
    if torch.equal(sel_k, sel_n):
        return
    for i, L in enumerate(lens):
        scores = R.index_block_scores(iq[i:i + 1, None], ik_cache[:L, i:i + 1].transpose(0, 1), cfg.block_size)[0, :, -1]
        for gg in range(sel_k.shape[1]):
            a, b_ = set(sel_k[i, gg].tolist()) - {-1}, set(sel_n[i, gg].tolist()) - {-1}
            assert len(a) == len(b_), (i, gg, a, b_)
            for x, y in zip(sorted(a - b_), sorted(b_ - a)):
                assert abs(scores[gg, x] - scores[gg, y]) <= SCORE_TOL, (i, gg, x, y, scores[gg])


def check(b, lens, hq, g, d, di, dtype, cfg, seed, S=None, integer=False):
    q, kc, vc, iq, ikc = make_step(b, lens, hq, g, d, di, dtype, seed, S, integer)
    lens_t = torch.tensor(lens, device=DEVICE)
    out_n, lse_n, sel_n = msa_decode_naive(q, kc, vc, iq, ikc, lens_t, cfg)
    out_k, lse_k, sel_k = TD.msa_decode_triton(q, kc, vc, iq, ikc, lens_t, cfg)
    assert sel_k.dtype == torch.int32 and sel_k.shape == (b, g, cfg.topk)
    if integer:
        assert torch.equal(sel_k, sel_n), (sel_k, sel_n)
    else:
        assert_selection_close(sel_k, sel_n, iq, ikc, lens, cfg)
        # attention checked on one shared selection (a near-tie swap changes the keys)
        out_k, lse_k = TD.decode_attention_triton(q, kc, vc, sel_n, lens_t, cfg.block_size)
    assert out_k.dtype == dtype and torch.isfinite(out_k).all()
    torch.testing.assert_close(out_k.float(), out_n.float(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse_k, lse_n.float(), rtol=0, atol=LSE_TOL[dtype])
    return sel_n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,g", [(2, 2), (8, 2), (16, 1)])  # GQA 1, 4, 16
def test_matches_naive_odd_lengths(dtype, hq, g):
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    lens = [1, 17, 100, 47]  # one token, one past a block edge, odd lengths
    check(4, lens, hq, g, 16, 16, dtype, cfg, seed=hq * 7 + g)


def test_fp16_and_wider_dims():
    cfg = MSAConfig(block_size=32, topk=2, index_dim=32, local_blocks=2)
    check(2, [96, 65], 8, 2, 32, 32, torch.float16, cfg, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_budget_is_dense(dtype):
    cfg = MSAConfig(block_size=16, topk=8, index_dim=16)  # up to 7 blocks <= 8
    lens = [100, 33, 16]
    q, kc, vc, iq, ikc = make_step(3, lens, 8, 2, 16, 16, dtype, seed=11)
    out_k, lse_k, sel = TD.msa_decode_triton(q, kc, vc, iq, ikc, torch.tensor(lens, device=DEVICE), cfg)
    assert sel[0, 0].tolist() == list(range(7)) + [-1] and sel[2, 1].tolist() == [0] + [-1] * 7
    out_d, lse_d = dense_decode_naive(q, kc, vc, torch.tensor(lens, device=DEVICE))
    torch.testing.assert_close(out_k.float(), out_d.float(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse_k, lse_d.float(), rtol=0, atol=LSE_TOL[dtype])
    out_f, lse_f = TD.dense_decode_triton(q, kc, vc, torch.tensor(lens, device=DEVICE), block_size=16,
                                          blocks_per_split=3)
    torch.testing.assert_close(out_f.float(), out_d.float(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse_f, lse_d.float(), rtol=0, atol=LSE_TOL[dtype])


def test_exact_ties_and_forced_blocks():
    """Integer-valued inputs tie often: the lower block index must win, as in the reference;
    init and local blocks are always kept."""
    cfg = MSAConfig(block_size=16, topk=4, index_dim=16, init_blocks=1, local_blocks=2)
    sel = check(3, [130, 90, 49], 8, 2, 16, 16, torch.float32, cfg, seed=5, integer=True)
    assert (sel[:, :, 0] == 0).all()
    # the streamed top-k (block scores in several register tiles, re-read K times) agrees
    q, kc, vc, iq, ikc = make_step(3, [130, 90, 49], 8, 2, 16, 16, torch.float32, seed=5, integer=True)
    for chunk in (2, 4):
        lens_t = torch.tensor([130, 90, 49], device=DEVICE)
        assert torch.equal(TD.decode_select_triton(iq, ikc, lens_t, cfg, topk_chunk=chunk), sel)
    assert sel[0, 0, -2:].tolist() == [7, 8] and sel[2, 0].tolist()[-2:] == [2, 3]


def test_split_k_and_strided_megatron_views():
    """Caches as Megatron hands them over: a [:L, b0:b1] slice of a larger buffer; several
    splits over the selected blocks combine to the single-split answer."""
    cfg = MSAConfig(block_size=16, topk=4, index_dim=16)
    q, kc, vc, iq, ikc = make_step(4, [70, 70, 70, 70], 8, 2, 16, 16, torch.float32, seed=9, S=80)
    sl = slice(1, 3)
    kv, vv, ikv = kc[:70, sl], vc[:70, sl], ikc[:70, sl]
    assert not kv.is_contiguous()
    out_n, lse_n, sel_n = msa_decode_naive(q[sl], kv, vv, iq[sl], ikv, 70, cfg)
    sel_k = TD.decode_select_triton(iq[sl], ikv, 70, cfg, blocks_per_program=2)  # 3 programs per row
    assert_selection_close(sel_k, sel_n, iq[sl], ikv, [70, 70], cfg)
    for bps in (1, 3, 4):
        out_k, lse_k = TD.decode_attention_triton(q[sl], kv, vv, sel_n, 70, 16, blocks_per_split=bps)
        torch.testing.assert_close(out_k, out_n, **OUT_TOL[torch.float32])
        torch.testing.assert_close(lse_k, lse_n, rtol=0, atol=2e-5)


def test_bad_inputs_are_clear_errors():
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    q, kc, vc, iq, ikc = make_step(2, [20, 20], 4, 2, 16, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        TD.msa_decode_triton(q, kc, vc, iq, ikc, 99, cfg)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        TD.msa_decode_triton(q.double(), kc.double(), vc.double(), iq, ikc, 20, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("L,b", [(4099, 2), (131072 + 77, 1), (65536, 8)])
def test_gpu_paper_layout(L, b):
    """CUDA, the paper's layout (64 q / 4 KV heads, d 128, index dim 128, block 128, top-16),
    bf16, odd and long caches: kernel vs the naive step on the same values."""
    cfg = MSAConfig(block_size=128, topk=16, index_dim=128)
    check(b, [L] * b, 64, 4, 128, 128, torch.bfloat16, cfg, seed=L % 97)
    cfg_dense = MSAConfig(block_size=128, topk=64, index_dim=128)  # 4099 tokens = 33 blocks <= 64: dense
    if L < 64 * 128:
        check(b, [L] * b, 64, 4, 128, 128, torch.bfloat16, cfg_dense, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,g", [(4, 4), (8, 2)])  # GQA 1, 4
def test_fused_select_attend_splits_and_streamed_topk(monkeypatch, dtype, hq, g):
    """The two-launch step with the top-k inside the attention kernel: one block per split
    (each split runs only the rounds up to its rank; the last split to finish merges and
    sorts the selection), and the fused top-k streamed over chunks of 4 block scores."""
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16, init_blocks=1)
    lens = [1, 17, 100, 47]
    q, kc, vc, iq, ikc = make_step(4, lens, hq, g, 16, 16, dtype, seed=13 + hq)
    lens_t = torch.tensor(lens, device=DEVICE)
    out_n, lse_n, sel_n = msa_decode_naive(q, kc, vc, iq, ikc, lens_t, cfg)
    checked = 0
    for chunk, bps in ((4, 1), (2048, 1), (2048, 3)):
        monkeypatch.setattr(TD, "FUSED_TOPK_CHUNK", chunk)
        out_k, lse_k, sel_k = TD.msa_decode_triton(q, kc, vc, iq, ikc, lens_t, cfg, blocks_per_split=bps)
        assert_selection_close(sel_k, sel_n, iq, ikc, lens, cfg)
        if torch.equal(sel_k, sel_n):  # otherwise a near-tie swap changed the keys
            torch.testing.assert_close(out_k.float(), out_n.float(), **OUT_TOL[dtype])
            torch.testing.assert_close(lse_k, lse_n.float(), rtol=0, atol=LSE_TOL[dtype])
            checked += 1
    assert checked >= 3 and (sel_n[:, :, 0] == 0).all()  # outputs compared; the init block kept


def test_fused_selection_exact_ties_every_split():
    """Integer inputs: exact ties broken toward the lower block in every split's rounds."""
    cfg = MSAConfig(block_size=16, topk=4, index_dim=16, local_blocks=2)
    q, kc, vc, iq, ikc = make_step(3, [130, 90, 49], 8, 2, 16, 16, torch.float32, seed=5, integer=True)
    lens_t = torch.tensor([130, 90, 49], device=DEVICE)
    out_n, lse_n, sel_n = msa_decode_naive(q, kc, vc, iq, ikc, lens_t, cfg)
    for bps in (1, 4):
        out_k, lse_k, sel_k = TD.msa_decode_triton(q, kc, vc, iq, ikc, lens_t, cfg, blocks_per_split=bps)
        assert torch.equal(sel_k, sel_n), (sel_k, sel_n)
        torch.testing.assert_close(out_k, out_n, **OUT_TOL[torch.float32])


def test_graph_style_call_lengths_tensor_with_max_len():
    """What a CUDA graph replays: lengths as a device tensor, grids sized by max_len (the
    cache), rows far shorter than max_len spread over every index program; repeated calls
    (the merge counters reset themselves) give the same result."""
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    lens = [5, 33, 64]
    q, kc, vc, iq, ikc = make_step(3, lens, 8, 2, 16, 16, torch.float32, seed=21, S=200)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out_n, lse_n, sel_n = msa_decode_naive(q, kc, vc, iq, ikc, lens_t, cfg)
    first = None
    for _ in range(2):
        res = TD.msa_decode_triton(q, kc, vc, iq, ikc, lens_t, cfg, max_len=200, blocks_per_program=3,
                                   blocks_per_split=1)
        assert_selection_close(res[2], sel_n, iq, ikc, lens, cfg)
        torch.testing.assert_close(res[0], out_n, **OUT_TOL[torch.float32])
        torch.testing.assert_close(res[1], lse_n, rtol=0, atol=2e-5)
        if first is not None:
            assert all(torch.equal(a, b) for a, b in zip(first, res))
        first = res
    bs = TD.index_block_max_triton(iq, ikc, lens_t, cfg, max_len=200, blocks_per_program=3)
    assert bs.shape == (3, 2, 13)
    ref = R.index_block_scores(iq[2:3, None], ikc[:64, 2:3].transpose(0, 1), 16)[0, :, -1]
    torch.testing.assert_close(bs[2, :, :4], ref.float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_len must lie in"):
        TD.msa_decode_triton(q, kc, vc, iq, ikc, lens_t, cfg, max_len=201)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="GraphedStep needs a CUDA device"):
            TD.GraphedStep(lambda: None)


@pytest.mark.skipif(TD.IK_FP8 is None, reason="torch without float8_e4m3fn")
def test_fp8_index_keys_select_like_their_bf16_values():
    """The opt-in fp8 (e4m3) index-key cache: the kernel's selection equals the naive
    selection on the same fp8 values widened to bf16 (the kernel widens in registers)."""
    cfg = MSAConfig(block_size=16, topk=3, index_dim=16)
    lens = [100, 47]
    q, kc, vc, iq, ikc = make_step(2, lens, 8, 2, 16, 16, torch.bfloat16, seed=17)
    ik8 = ikc.to(TD.IK_FP8)
    sel_k = TD.decode_select_triton(iq, ik8, torch.tensor(lens, device=DEVICE), cfg)
    sel_n = msa_decode_naive(q, kc, vc, iq, ik8.to(torch.bfloat16), torch.tensor(lens, device=DEVICE), cfg)[2]
    assert_selection_close(sel_k, sel_n, iq, ik8.to(torch.bfloat16), lens, cfg)
    with pytest.raises(ValueError, match="float8_e4m3fn with bf16/fp16"):
        TD.decode_select_triton(iq.float(), ik8, 100, cfg)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_growing_lengths():
    """The step captured once as a CUDA graph (lengths in a device tensor, grids sized by the
    cache) and replayed as the sequences grow: each replay equals the naive step at the new
    lengths, and equals the eager call bit for bit."""
    cfg = MSAConfig(block_size=128, topk=16, index_dim=128)
    S, b = 40_000, 3
    q, kc, vc, iq, ikc = make_step(b, [S] * b, 64, 4, 128, 128, torch.bfloat16, seed=2, S=S)
    lens = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    lens.fill_(1)
    graph = TD.GraphedStep(lambda: TD.msa_decode_triton(q, kc, vc, iq, ikc, lens, cfg, max_len=S))
    for row_lens in ([1, 129, 5000], [4099, 17_000, 39_999], [S, S - 1, 2048]):
        lens.copy_(torch.tensor(row_lens, dtype=torch.int32))
        out_g, lse_g, sel_g = (t.clone() for t in graph.replay())
        out_e, lse_e, sel_e = TD.msa_decode_triton(q, kc, vc, iq, ikc, lens, cfg, max_len=S)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e) and torch.equal(sel_g, sel_e)
        out_n, lse_n, sel_n = msa_decode_naive(q, kc, vc, iq, ikc, lens, cfg)
        assert_selection_close(sel_g, sel_n, iq, ikc, row_lens, cfg)
        out_s, lse_s = TD.decode_attention_triton(q, kc, vc, sel_n, lens, 128)
        torch.testing.assert_close(out_s.float(), out_n.float(), **OUT_TOL[torch.bfloat16])
        torch.testing.assert_close(lse_s, lse_n.float(), rtol=0, atol=LSE_TOL[torch.bfloat16])

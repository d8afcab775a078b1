"""The pure-PyTorch decode step (ops/decode_naive.py) vs the full-sequence reference.

A decode step at position t (cache of t + 1 tokens, the new one included) must give the
full-sequence reference's output and selection at query t. Caches are in Megatron's
sequence-first layout and padded with NaN past each sequence's length, so a read beyond
the length poisons the result. Tolerance: none. Selection, output and LSE are bitwise equal
in fp32 and fp64 (the decode step runs the same reference functions on the same values).
"""

import pytest
import torch

from msa_megatron.ops import naive as R
from msa_megatron.config import MSAConfig
from msa_megatron.ops.decode_naive import decode_select_naive, dense_decode_naive, msa_decode_naive



def make_full(b, s, hq, g, d, di, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(b, s, hq, d), r(b, s, g, d), r(b, s, g, d), r(b, s, g, di), r(b, s, di)


def to_cache(x: torch.Tensor, lens, S: int) -> torch.Tensor:
    """[b, s, ...] batch-first -> [S, b, ...] Megatron cache, NaN past each row's length."""
    cache = torch.full((S,) + (x.shape[0],) + tuple(x.shape[2:]), float("nan"), dtype=x.dtype)
    for i, L in enumerate(lens):
        cache[:L, i] = x[i, :L]
    return cache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hq,g", [(4, 4), (8, 2), (16, 1)])
def test_decode_equals_full_reference(dtype, hq, g):
    b, s, d, di = 2, 77, 16, 16
    cfg = MSAConfig(block_size=16, topk=3, index_dim=di)
    q, k, v, iq, ik = make_full(b, s, hq, g, d, di, dtype, seed=hq * 10 + g)
    sel_full = R.select(iq, ik, cfg)
    out_full, lse_full = R.sparse_attention(q, k, v, sel_full, cfg.block_size)
    S = s + 5
    for t in (0, 15, 16, 40, 63, s - 1):  # first token, block edges, odd lengths
        lens = [t + 1] * b
        out, lse, sel = msa_decode_naive(q[:, t], to_cache(k[:, : t + 1], lens, S), to_cache(v[:, : t + 1], lens, S),
                                         iq[:, t], to_cache(ik[:, : t + 1], lens, S), t + 1, cfg)
        assert torch.equal(sel, sel_full[:, :, t]), t
        assert torch.equal(out, out_full[:, t]), (t, (out - out_full[:, t]).abs().max())
        assert torch.equal(lse, lse_full[:, :, t]), t


def test_per_sequence_lengths_and_nan_padding():
    """Rows of one batch at different lengths: each equals its own full-sequence answer."""
    b, s, hq, g, d, di = 3, 50, 4, 2, 16, 16
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    q, k, v, iq, ik = make_full(b, s, hq, g, d, di, torch.float64, seed=3)
    lens = [50, 17, 33]
    S = 64
    out, lse, sel = msa_decode_naive(q[torch.arange(b), [L - 1 for L in lens]], to_cache(k, lens, S),
                                     to_cache(v, lens, S), iq[torch.arange(b), [L - 1 for L in lens]],
                                     to_cache(ik, lens, S), torch.tensor(lens), cfg)
    assert torch.isfinite(out).all()
    for i, L in enumerate(lens):
        sel_i = R.select(iq[i:i + 1, :L], ik[i:i + 1, :L], cfg)
        o_i, _ = R.sparse_attention(q[i:i + 1, :L], k[i:i + 1, :L], v[i:i + 1, :L], sel_i, cfg.block_size)
        assert torch.equal(sel[i], sel_i[0, :, L - 1])
        torch.testing.assert_close(out[i], o_i[0, L - 1], rtol=0, atol=1e-12)


def test_full_budget_is_dense_and_selection_rules():
    b, s, hq, g, d, di = 2, 70, 8, 2, 16, 16
    q, k, v, iq, ik = make_full(b, s, hq, g, d, di, torch.float64, seed=5)
    S = 70
    kc, vc, ikc = to_cache(k, [s] * b, S), to_cache(v, [s] * b, S), to_cache(ik, [s] * b, S)
    cfg = MSAConfig(block_size=16, topk=8, index_dim=di)  # 5 blocks <= 8: dense
    out, lse, sel = msa_decode_naive(q[:, -1], kc, vc, iq[:, -1], ikc, s, cfg)
    ref, ref_lse = dense_decode_naive(q[:, -1], kc, vc, s)
    full, _ = R.dense_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, full[:, -1], rtol=0, atol=1e-12)
    assert sel[0, 0].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    # sparse: own block (4) always kept, ascending order, -1 never before a real block
    cfg2 = MSAConfig(block_size=16, topk=3, index_dim=di, init_blocks=1)
    sel2 = decode_select_naive(iq[:, -1], ikc, s, cfg2)
    assert (sel2[..., 0] == 0).all() and (sel2[..., -1] == 4).all()


def test_bad_inputs_are_clear_errors():
    q = torch.zeros(2, 4, 16)
    kc = torch.zeros(10, 2, 2, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        msa_decode_naive(q, kc, kc, torch.zeros(2, 2, 16), torch.zeros(10, 2, 16), 11, cfg)
    with pytest.raises(ValueError, match="disagree"):
        msa_decode_naive(torch.zeros(3, 4, 16), kc, kc, torch.zeros(3, 2, 16), torch.zeros(10, 3, 16), 5, cfg)

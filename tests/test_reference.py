"""The pure-PyTorch reference against an independent per-query oracle and against the
properties MSA must have (full budget == dense, causality, forced blocks, gradients)."""

import math

import pytest
import torch

from msa_megatron import MSAConfig
from msa_megatron.ops import naive as R


def rand_inputs(b, s, hq, g, d, di, dtype=torch.float32, seed=None, sk=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    sk = sk or s
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)
    return mk(b, s, hq, d), mk(b, sk, g, d), mk(b, sk, g, d), mk(b, s, g, di), mk(b, sk, di)


# ----------------------------------------------------------------------------- oracle
def oracle_select(iq, ik, cfg, q_pos):
    """Per-query, per-group selection written as plainly as possible (python loops)."""
    b, sq, g, _ = iq.shape
    sk, B, K = ik.shape[1], cfg.block_size, cfg.topk
    out = torch.full((b, g, sq, K), -1, dtype=torch.int32)
    for bi in range(b):
        for gi in range(g):
            for t in range(sq):
                p = int(q_pos[t])
                own = p // B
                scores = {}
                for blk in range(own + 1):
                    keys = range(blk * B, min((blk + 1) * B, sk, p + 1))
                    scores[blk] = max(float(iq[bi, t, gi].double() @ ik[bi, j].double()) for j in keys)
                forced = {blk for blk in range(own + 1) if blk > own - cfg.local_blocks or blk < cfg.init_blocks}
                rest = sorted((blk for blk in scores if blk not in forced), key=lambda x: (-scores[x], x))
                chosen = sorted(forced | set(rest[: max(0, K - len(forced))]))
                out[bi, gi, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def oracle_attention(q, k, v, blk, cfg, q_pos):
    """Masked dense attention: each query attends to tokens of its selected blocks <= itself."""
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    G = hq // g
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for bi in range(b):
        for t in range(sq):
            for h in range(hq):
                gi = h // G
                allowed = torch.zeros(sk, dtype=torch.bool)
                for x in blk[bi, gi, t].tolist():
                    if x >= 0:
                        allowed[x * cfg.block_size:(x + 1) * cfg.block_size] = True
                allowed[int(q_pos[t]) + 1:] = False
                logits = (k[bi, :, gi].double() @ q[bi, t, h].double()) / math.sqrt(d)
                p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 0)
                out[bi, t, h] = p @ v[bi, :, gi].double()
    return out


@pytest.mark.parametrize("b,s,hq,g,B,K,init,local", [
    (1, 77, 2, 2, 16, 2, 0, 1),     # odd length, G=1
    (2, 100, 8, 2, 16, 3, 1, 1),    # batch 2, G=4, an init block
    (1, 131, 8, 1, 16, 4, 0, 2),    # G=8, two local blocks
])
def test_selection_and_attention_match_oracle(b, s, hq, g, B, K, init, local):
    d, di = 8, 16
    q, k, v, iq, ik = rand_inputs(b, s, hq, g, d, di)
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, init_blocks=init, local_blocks=local)
    q_pos = torch.arange(s)
    blk = R.select(iq, ik, cfg)
    assert blk.dtype == torch.int32 and blk.shape == (b, g, s, K)
    assert torch.equal(blk, oracle_select(iq, ik, cfg, q_pos))
    out, lse = R.sparse_attention(q, k, v, blk, B)
    torch.testing.assert_close(out.double(), oracle_attention(q, k, v, blk, cfg, q_pos), rtol=1e-5, atol=1e-5)
    assert lse.shape == (b, hq, s) and torch.isfinite(lse).all()


def test_query_subset_positions_match_full_sequence():
    """Context parallelism calls the op with a subset of queries at global positions."""
    b, s, hq, g, d, di = 1, 150, 4, 2, 8, 16
    q, k, v, iq, ik = rand_inputs(b, s, hq, g, d, di)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=di)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg)
    rows = torch.tensor([0, 5, 31, 32, 77, 140, 149])
    out_s, aux_s = R.msa_attention(q[:, rows], k, v, iq[:, rows], ik, cfg, q_pos=rows)
    assert torch.equal(aux_s.block_idx, aux.block_idx[:, :, rows])
    torch.testing.assert_close(out_s, out[:, rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux_s.lse, aux.lse[:, :, rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_full_budget_equals_dense(G, dtype, tol):
    b, s, g, d, di = 2, 97, 2, 16, 16
    q, k, v, iq, ik = rand_inputs(b, s, G * g, g, d, di, dtype=dtype)
    cfg = MSAConfig(block_size=16, topk=math.ceil(s / 16), index_dim=di)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg, mode="msa", compute_recall=True)
    dense, lse = R.dense_attention(q, k, v)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), dense.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(aux.lse, lse, rtol=tol, atol=tol)
    # and dense itself against an explicit softmax over the causal mask
    ref = torch.softmax(
        torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(G, 2)) / math.sqrt(d)
        + torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1), -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v.double().repeat_interleave(G, 2))
    torch.testing.assert_close(dense.double(), ref, rtol=tol, atol=tol)
    assert abs(float(aux.stats["recall"]) - 1.0) < 1e-5


def test_causality_future_tokens_change_nothing():
    b, s, hq, g, d, di = 1, 120, 4, 2, 8, 16
    q, k, v, iq, ik = rand_inputs(b, s, hq, g, d, di)
    cfg = MSAConfig(block_size=16, topk=3, index_dim=di)
    cut = 70
    out1, aux1 = R.msa_attention(q, k, v, iq, ik, cfg)
    q2, k2, v2, iq2, ik2 = (x.clone() for x in (q, k, v, iq, ik))
    for x in (q2, k2, v2, iq2, ik2):
        x[:, cut:] = torch.randn_like(x[:, cut:]) * 3
    out2, aux2 = R.msa_attention(q2, k2, v2, iq2, ik2, cfg)
    assert torch.equal(aux1.block_idx[:, :, :cut], aux2.block_idx[:, :, :cut])
    assert torch.equal(out1[:, :cut], out2[:, :cut])
    assert not torch.equal(out1[:, cut:], out2[:, cut:])


def test_own_block_kept_no_future_block_partial_last_block():
    b, s, hq, g, d, di = 2, 203, 4, 4, 8, 16   # 203 = 12 full blocks of 16 + 11 tokens
    q, k, v, iq, ik = rand_inputs(b, s, hq, g, d, di)
    cfg = MSAConfig(block_size=16, topk=4, index_dim=di)
    blk = R.select(iq, ik, cfg).long()
    own = (torch.arange(s) // 16).view(1, 1, s, 1)
    assert ((blk == own).any(-1)).all(), "own block missing"
    assert (blk <= own).all(), "future block selected"
    valid = blk >= 0
    # ascending, unused slots (-1) at the end, no duplicates
    assert (blk[..., 1:][valid[..., 1:]] > blk[..., :-1][valid[..., 1:]]).all()
    assert (valid.int().diff(dim=-1) <= 0).all()
    # fewer visible blocks than k: all of them kept
    for t in (0, 17, 40):
        n_vis = t // 16 + 1
        assert torch.equal(blk[:, :, t, :n_vis], torch.arange(n_vis).expand(b, g, n_vis))
        assert (blk[:, :, t, n_vis:] == -1).all()
    # the partial last block is selectable and only its keys <= t count
    assert (blk[:, :, -1] == 12).any(-1).all()


def test_tie_rule_prefers_lower_block_index():
    b, s, g, di = 1, 96, 1, 16
    iq = torch.ones(b, s, g, di)
    ik = torch.ones(b, s, di)  # every score equal
    cfg = MSAConfig(block_size=16, topk=3, index_dim=di)
    blk = R.select(iq, ik, cfg)
    t = s - 1  # own block 5; ties among 0..4 -> lowest two
    assert blk[0, 0, t].tolist() == [0, 1, 5]


def test_gradient_isolation_and_kl_properties():
    torch.manual_seed(0)
    b, s, hidden, hq, g, d, di = 1, 90, 32, 4, 2, 8, 16
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    x = torch.randn(b, s, hidden, requires_grad=True)
    w_qkv = torch.randn(hidden, (hq + 2 * g) * d, requires_grad=True)
    w_iq = torch.randn(g * di, hidden, requires_grad=True)
    w_ik = torch.randn(di, hidden, requires_grad=True)
    n_q, n_k = torch.ones(di, requires_grad=True), torch.ones(di, requires_grad=True)

    def forward():
        qkv = x @ w_qkv
        q, k, v = qkv.split([hq * d, g * d, g * d], -1)
        q, k, v = q.view(b, s, hq, d), k.view(b, s, g, d), v.view(b, s, g, d)
        iq, ik = R.index_projections(x.detach(), w_iq, w_ik, n_q, n_k, g,
                                     rope_freqs=R.rope_angles(torch.arange(s), 8))
        return R.msa_attention(q, k, v, iq, ik, cfg)

    out, aux = forward()
    out.square().mean().backward()  # "LM loss"
    for p in (w_iq, w_ik, n_q, n_k):
        assert p.grad is None or not p.grad.any(), "LM loss reached the index branch"
    assert x.grad is not None and w_qkv.grad.abs().sum() > 0
    x.grad = w_qkv.grad = None
    out, aux = forward()
    assert aux.kl.item() >= 0
    aux.kl.backward()
    assert x.grad is None and w_qkv.grad is None, "KL reached the backbone"
    for p in (w_iq, w_ik, n_q, n_k):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["msa", "msa_warmup"])
def test_kl_zero_when_student_equals_teacher(mode):
    """G = 1, one KV head, iq = q, ik = k, d = di: student and teacher coincide."""
    b, s, d = 2, 70, 16
    q, k, v, _, _ = rand_inputs(b, s, 1, 1, d, d)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=d)
    _, aux = R.msa_attention(q, k, v, q.clone(), k[:, :, 0].clone(), cfg, mode=mode)
    assert abs(aux.kl.item()) < 1e-6
    _, aux2 = R.msa_attention(q, k, v, q * 0.3, k[:, :, 0].clone(), cfg, mode=mode)
    assert aux2.kl.item() > 1e-3


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_gradient_finite_difference(sparse):
    b, s, hq, g, d, di = 1, 50, 4, 2, 8, 16
    q, k, _, iq, ik = rand_inputs(b, s, hq, g, d, di, dtype=torch.float64)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    blk = R.select(iq, ik, cfg)
    iq.requires_grad_(True)
    ik.requires_grad_(True)
    fn = (lambda a, c: R.sparse_kl_loss(q, k, a, c, blk, cfg)) if sparse else (lambda a, c: R.dense_kl_loss(q, k, a, c, cfg))
    # fast_mode: finite differences along random directions (v^T J u), full Jacobian too slow
    assert torch.autograd.gradcheck(fn, (iq, ik), eps=1e-6, atol=1e-6, fast_mode=True)


def test_selected_index_lse_matches_explicit():
    b, s, hq, g, d, di = 1, 60, 2, 2, 8, 16
    _, _, _, iq, ik = rand_inputs(b, s, hq, g, d, di)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=di)
    blk = R.select(iq, ik, cfg)
    lse = R.selected_index_lse(iq, ik, blk, cfg)
    for t in (0, 20, 59):
        for gi in range(g):
            toks = [j for x in blk[0, gi, t].tolist() if x >= 0 for j in range(x * 16, min(x * 16 + 16, t + 1))]
            sc = torch.stack([iq[0, t, gi] @ ik[0, j] for j in toks]) / math.sqrt(di)
            torch.testing.assert_close(lse[0, gi, t], torch.logsumexp(sc, 0), rtol=1e-5, atol=1e-5)


def test_memory_bounded_long_sequence_backward():
    """A long sequence runs chunked: peak intermediate stays far below [s, s] per head."""
    b, s, hq, g, d, di = 1, 4096, 4, 2, 16, 16
    q, k, v, iq, ik = rand_inputs(b, s, hq, g, d, di)
    for t in (q, k, v, iq, ik):
        t.requires_grad_(True)
    cfg = MSAConfig(block_size=64, topk=4, index_dim=di)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg)
    (out.float().square().mean() + aux.kl).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, iq, ik))


def test_bad_inputs_raise_clear_errors():
    q, k, v, iq, ik = rand_inputs(1, 32, 4, 2, 8, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    with pytest.raises(ValueError, match="mode"):
        R.msa_attention(q, k, v, iq, ik, cfg, mode="sparse")
    with pytest.raises(ValueError, match="index heads"):
        R.msa_attention(q, k, v, iq[:, :, :1], ik, cfg)
    with pytest.raises(ValueError, match="index_dim"):
        R.msa_attention(q, k, v, iq[..., :8], ik[..., :8], cfg)
    with pytest.raises(ValueError, match="q_pos"):
        R.msa_attention(q, k, v, iq, ik, cfg, q_pos=torch.arange(1, 33))


@pytest.mark.parametrize("window", [1, 7, 16, 300])
def test_sliding_window_matches_masked_softmax(window):
    b, s, hq, g, d = 2, 53, 4, 2, 8
    q, k, v, _, _ = rand_inputs(b, s, hq, g, d, 16, dtype=torch.float64)
    out, _ = R.sliding_window_attention(q, k, v, window)
    t = torch.arange(s)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(hq // g, 2)) / math.sqrt(d)
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(hq // g, 2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if window >= s:
        torch.testing.assert_close(out, R.dense_attention(q, k, v)[0], rtol=1e-10, atol=1e-10)


def test_precomputed_selection_is_used_and_checked():
    q, k, v, iq, ik = rand_inputs(1, 80, 4, 2, 8, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    out, aux = R.msa_attention(q, k, v, iq, ik, cfg)
    out2, aux2 = R.msa_attention(q, k, v, iq, ik, cfg, block_idx=aux.block_idx)
    assert torch.equal(out, out2) and torch.equal(aux.kl, aux2.kl)
    other = aux.block_idx.clone()
    other[..., 0] = -1  # drop a block: the op must follow the given selection
    out3, _ = R.msa_attention(q, k, v, iq, ik, cfg, block_idx=other)
    assert not torch.equal(out, out3)
    with pytest.raises(ValueError, match="block_idx must be int32"):
        R.msa_attention(q, k, v, iq, ik, cfg, block_idx=aux.block_idx.long())

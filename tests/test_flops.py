"""Eq. 12: the paper's quoted reductions for its 109B-MoE head layout."""

import pytest

from msa_megatron import flops as F


@pytest.mark.parametrize("n,expected", [(4 << 10, 1.0), (64 << 10, 10.7), (1 << 20, 28.4)])
def test_paper_reductions(n, expected):
    assert abs(F.reduction(F.PAPER_109B, n) - expected) <= 0.1


def test_ceiling_and_monotone():
    assert F.reduction_ceiling(F.PAPER_109B) == 32.0
    lengths = [1 << p for p in range(10, 31)]
    r = [F.reduction(F.PAPER_109B, n) for n in lengths]
    assert all(a < b for a, b in zip(r, r[1:])) and r[-1] < 32.0 and abs(r[-1] - 32) < 0.01


def test_terms_by_hand():
    s = F.AttentionShape(num_heads=2, head_dim=4, num_index_heads=1, index_dim=8, block_size=16, topk=2)
    assert F.dense_flops_per_token(s, 100) == 2 * 2 * 4 * 100
    assert F.msa_flops_per_token(s, 100) == 1 * 8 * 100 + 4 * 2 * 4 * 2 * 16


def test_flop_matched_window():
    shape = F.PAPER_109B
    for n in (8 << 10, 64 << 10, 1 << 20):
        w = F.flop_matched_window(shape, n)
        assert F.sliding_window_flops_per_token(shape, w, n) <= F.msa_flops_per_token(shape, n)
        assert F.sliding_window_flops_per_token(shape, w + 1, n) > F.msa_flops_per_token(shape, n)
    # when MSA costs more than dense (short context) the matched window is the whole sequence
    assert F.flop_matched_window(shape, 2048) == 2048


def test_cli_prints_table(capsys):
    assert F.main(["--lengths", "4K", "64K", "1M"]) == 0
    out = capsys.readouterr().out
    assert "| 1M |" in out and "28.44x" in out and "10.67x" in out and "32.00x" in out
    with pytest.raises(SystemExit):
        F.main(["--lengths", "abc"])

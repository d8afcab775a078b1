"""Layout helpers of the production CP seam (msa_megatron/megatron/context_parallel.py):
Megatron's load-balanced split, its inverse, and the split check. The op-level CP runs and
the selected-blocks exchange are tested in tests/experiments/test_cp_exchange.py."""

from __future__ import annotations

import pytest
import torch

from msa_megatron.megatron import context_parallel as cpl


def test_check_cp_sequence_messages():
    with pytest.raises(cpl.CPLayoutError, match=r"sequence length 30 .*cp=2.*multiples of 2\*cp=4"):
        cpl.check_cp_sequence(15, 2)
    with pytest.raises(cpl.CPLayoutError, match=r"cp=0 is invalid: allowed values are integers >= 1"):
        cpl.check_cp_sequence(16, 0)
    assert cpl.check_cp_sequence(200, 4) == 100  # all-gather: any even local length


def test_zigzag_matches_megatron_split():
    """Positions and splitting agree with Megatron-Core's get_batch_on_this_cp_rank layout
    (chunks r and 2cp-1-r), written out independently here."""
    s, cp = 48, 3
    x = torch.arange(s).view(1, s)
    chunks = x.view(1, 2 * cp, s // (2 * cp))
    for r in range(cp):
        expect = torch.cat([chunks[:, r], chunks[:, 2 * cp - 1 - r]], dim=1)
        assert torch.equal(cpl.split_for_cp(x, cp, r), expect)
        assert torch.equal(cpl.zigzag_positions(s // cp, cp, r), expect[0])


def test_merge_inverts_split():
    """merge_from_cp (the all-gather's reordering, used by the GPU check) inverts the split."""
    for cp in (1, 2, 3, 4):
        x = torch.randn(2, 4 * cp * 2, 3)
        assert torch.equal(cpl.merge_from_cp([cpl.split_for_cp(x, cp, r) for r in range(cp)]), x)
    with pytest.raises(cpl.CPLayoutError, match="must be even"):
        cpl.merge_from_cp([torch.zeros(1, 3), torch.zeros(1, 3)])

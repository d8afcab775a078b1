"""The index grad-norm group: pinned to the upstream functions that clip separate groups; it
registers once, refuses a changed upstream, and tagging registers it. Its effect on training
(the backbone's step independent of the KL) is tested in tests/megatron/test_index_grad_clip.py."""

from __future__ import annotations

import pytest
import torch

from msa_megatron.patches import mcore_019_index_grad_norm_group as patch
from msa_megatron.patches import source_sha256


def test_upstream_functions_are_the_pinned_ones():
    for qualname, sha in patch.PINNED_SHA256.items():
        assert source_sha256(patch._upstream_object(qualname)) == sha, f"upstream {qualname} changed: re-check the patch"
    from megatron.core.optimizer import optimizer as mo

    assert "mtp" in mo.SEPARATE_GRAD_NORM_GROUPS and mo.GRAD_NORM_GROUP_ATTR == "grad_norm_group"


def test_registers_once_and_removes():
    from megatron.core.optimizer import optimizer as mo

    patch.remove()
    before = mo.SEPARATE_GRAD_NORM_GROUPS
    was = patch.is_applied()
    try:
        assert patch.apply() is (not was) and patch.apply() is False
        assert mo.SEPARATE_GRAD_NORM_GROUPS.count(patch.INDEX_GRAD_NORM_GROUP) == 1
        mo._validate_grad_norm_group(patch.INDEX_GRAD_NORM_GROUP)  # upstream now accepts the tag
    finally:
        patch.remove()
        patch.apply()
    assert set(before) <= set(mo.SEPARATE_GRAD_NORM_GROUPS)


def test_refuses_a_changed_source(monkeypatch):
    from megatron.core.optimizer import optimizer as mo

    patch.remove()
    if patch.is_applied():  # registered before this module's apply() recorded the original tuple
        monkeypatch.setattr(mo, "SEPARATE_GRAD_NORM_GROUPS",
                            tuple(g for g in mo.SEPARATE_GRAD_NORM_GROUPS if g != patch.INDEX_GRAD_NORM_GROUP))
    pins = dict(patch.PINNED_SHA256, **{"ChainedOptimizer.step": "0" * 64})
    monkeypatch.setattr(patch, "PINNED_SHA256", pins)
    with pytest.raises(RuntimeError, match="upstream source of .*ChainedOptimizer.step changed"):
        patch.apply()
    assert not patch.is_applied()


def test_tag_marks_parameters_and_registers_the_group():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    assert patch.tag(params) == 2 and patch.is_applied()
    assert all(p.grad_norm_group == patch.INDEX_GRAD_NORM_GROUP for p in params)

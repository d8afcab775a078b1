"""Selection capture of MSA core attention (MSACoreAttention.capture_selection,
modes.set_selection_capture): what the needle diagnostic reads is the op's selection, in the
modes that select, and nothing else. In-process, size-1 stand-ins for the process groups."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mcore_helpers import BATCH, HEAD_DIM, SEQ, msa_settings, tiny_config


class _Group:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _core(layer_number: int = 2, **msa):
    from megatron.core.transformer.enums import AttnMaskType

    from msa_megatron.megatron.attention import MSACoreAttention, MSACoreAttentionSubmodules
    from msa_megatron.megatron.dense_attention import SDPADotProductAttention

    cfg = tiny_config(msa_settings(**msa))
    return MSACoreAttention(cfg, layer_number, AttnMaskType.causal, "self",
                            pg_collection=SimpleNamespace(tp=_Group(), cp=_Group()),
                            submodules=MSACoreAttentionSubmodules(dense_attention=SDPADotProductAttention)).eval()


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, 4, HEAD_DIM, generator=g)
    k, v = (torch.randn(SEQ, BATCH, 2, HEAD_DIM, generator=g) for _ in range(2))
    iq = torch.randn(SEQ, BATCH, 2, 16, generator=g)
    ik = torch.randn(SEQ, BATCH, 16, generator=g)
    return q, k, v, iq, ik


def _forward(core, inputs):
    from msa_megatron.megatron import reset_msa_metrics

    q, k, v, iq, ik = inputs
    with torch.no_grad():
        out = core(q, k, v, None, index_query=iq, index_key=ik)
    reset_msa_metrics()
    return out


@pytest.mark.parametrize("mode", ["msa", "msa_warmup"])
def test_capture_records_the_ops_selection(mode):
    from msa_megatron.megatron.modes import set_attention_mode, set_selection_capture
    from msa_megatron.ops import naive

    core = _core(topk=2)  # 7 blocks of 16 for 100 tokens: top-2 is a real choice
    set_attention_mode(core, mode)
    inputs = _inputs()
    plain = _forward(core, inputs)
    store: list = []
    assert set_selection_capture(core, store) == 1
    out = _forward(core, inputs)
    assert torch.equal(out, plain)  # capturing changes nothing
    q, k, v, iq, ik = inputs
    want = naive.select(iq.transpose(0, 1).contiguous(), ik.transpose(0, 1).contiguous(), core.msa)
    assert len(store) == 1 and store[0]["layer_index"] == 1 and store[0]["block_size"] == 16
    got = store[0]["block_idx"]
    assert got.shape == (BATCH, 2, SEQ, 2) and torch.equal(got, want)
    assert not torch.equal(got[:, 0], got[:, 1])  # both KV groups' selections, not one repeated
    _forward(core, inputs)
    assert len(store) == 2  # one record per forward
    assert set_selection_capture(core, None) == 1 and core.capture_selection is None
    _forward(core, inputs)
    assert len(store) == 2  # off: nothing more


def test_dense_mode_captures_nothing_and_store_must_be_a_list():
    from msa_megatron.megatron.modes import set_attention_mode, set_selection_capture

    core = _core()
    set_attention_mode(core, "dense")
    store: list = []
    set_selection_capture(torch.nn.ModuleList([core]), store)
    _forward(core, _inputs())
    assert store == []
    with pytest.raises(TypeError, match="list or None"):
        set_selection_capture(core, {})


def test_capture_under_cp_or_thd_is_refused_with_one_warning(caplog):
    from msa_megatron.megatron import attention

    core = _core()
    store: list = []
    core.capture_selection = store
    blk = torch.zeros(1, 2, SEQ, 2, dtype=torch.int32)
    attention._warned.discard("capture_layout")
    with caplog.at_level(logging.WARNING, logger="msa_megatron.megatron"):
        core._capture(blk, thd=True)
        core.cp_size = 2
        core._capture(blk, thd=False)
    assert store == []
    lines = [r.getMessage() for r in caplog.records if "selection capture" in r.getMessage()]
    assert len(lines) == 1 and "THD-packed" in lines[0] and "nothing" in lines[0], lines
    core.cp_size = 1
    core._capture(blk, thd=False)
    assert len(store) == 1

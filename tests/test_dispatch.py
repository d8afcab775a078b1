"""The one dispatch point: reference on CPU (said once), triton forced on CPU is an error."""

import logging

import pytest
import torch

from msa_megatron import MSAConfig, ops
from msa_megatron.ops import naive as R


def test_cpu_runs_reference_and_says_so_once(caplog):
    q, k, v = torch.randn(1, 40, 4, 8), torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8)
    iq, ik = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 16)
    cfg = MSAConfig(block_size=16, topk=2, index_dim=16)
    ops._announced.clear()
    with caplog.at_level(logging.WARNING, logger="msa_megatron.ops"):
        out, aux = ops.msa_attention(q, k, v, iq, ik, cfg)
        ops.msa_attention(q, k, v, iq, ik, cfg)
    msgs = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1 and "instead" in msgs[0]
    ref_out, ref_aux = R.msa_attention(q, k, v, iq, ik, cfg)
    assert torch.equal(out, ref_out) and torch.equal(aux.block_idx, ref_aux.block_idx)


def test_forcing_triton_without_cuda_is_an_error():
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(RuntimeError, match="msa.backend=triton cannot run"):
        ops.msa_attention(q, q[:, :, :1], q[:, :, :1], None, None, MSAConfig(backend="triton", block_size=16, topk=1))

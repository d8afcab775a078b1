"""Context parallelism inside the Megatron-Core MSA backend: a GPTModel (dense layer 0, MSA
layers 1-2) at CP = 2 (DP = 2), CP = 2 with the select-first overlap, CP = 2 with per-token
loss, CP = 2 x TP = 2 with sequence parallelism and CP = 4 equals the same model at CP = 1:
per-token LM losses, the reduced gradient of every parameter after Megatron's schedule and
finalize_model_grads, the KL and every logged metric (collect_msa_metrics), in the modes
msa, msa_warmup and dense. CP = 1 stays bit-identical to the pre-CP code path.

One spawned run of 4 gloo processes carries all of it (see tests/cp/cp_backend_cases.py);
configuration errors are checked in-process."""

from __future__ import annotations

import os
import sys

import pytest

from tests.dist_harness import run_distributed

# the Megatron test helpers (tiny configs, ENV for the spawned processes) live in tests/megatron
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "megatron"))

GRAD_TOL = 1e-5  # max |cp - cp1| / max(1, max |cp1|) per tensor, fp32
LOSS_TOL = 1e-5
METRIC_TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    from mcore_helpers import ENV

    from tests.cp.cp_backend_cases import backend_worker

    return run_distributed(backend_worker, 4, env=ENV, timeout=900)


def _layout_rows(results, name):
    return [(r["rank"], r["layouts"][name]) for r in results]


@pytest.mark.slow
def test_cp1_path_is_bit_identical(results):
    assert all(r["cp1"]["bit_identical"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cp2", "cp2_select_first", "cp2_per_token_loss", "cp2_tp2_sp", "cp4"])
def test_cp_equals_cp1(results, name):
    for rank, report in _layout_rows(results, name):
        assert report["validate_ok"]
        for mode, r in ((m, v) for m, v in report.items() if isinstance(v, dict)):
            where = f"{name} rank {rank} mode {mode}"
            assert r["loss"] <= LOSS_TOL, f"{where}: per-token LM loss differs by {r['loss']:.3g}"
            bad = {n: e for n, e in r["grads"].items() if not e <= GRAD_TOL}
            assert not bad, f"{where}: gradients differ: {bad}"
            assert r["metric_keys_equal"], f"{where}: metric names {r['metric_names']}"
            bad = {k: e for k, e in r["metrics"].items() if not e <= METRIC_TOL}
            assert not bad, f"{where}: metrics differ: {bad}"
            # the KL reached the index branch through the schedule's CP-aware scale
            cp = 4 if name == "cp4" else 2
            if mode == "dense":
                assert r["metric_names"] == [] and r["index_grad_abs_sum"] == 0.0, where
            else:
                assert r["index_grad_abs_sum"] > 0, f"{where}: no KL gradient on the index branch"
                assert {"indexer_kl/layer_1", "indexer_kl/layer_2", "index_entropy", "main_entropy"} \
                    <= set(r["metric_names"]), where
                if mode == "msa":
                    assert "recall/layer_1" in r["metric_names"], where
            if name == "cp2_per_token_loss":
                assert r["kl_scale"] == r["ref_kl_scale"] == 1.0, where
            else:
                assert r["kl_scale"] == pytest.approx(r["ref_kl_scale"] * cp), where


@pytest.mark.slow
def test_selections_cross_ranks(results):
    """The data make the comparison meaningful: MSA queries select key blocks holding tokens
    of other CP ranks, and selected blocks straddle chunk edges (chunks of 50 or 25 tokens,
    blocks of 16)."""
    for name in ("cp2", "cp2_tp2_sp", "cp4"):
        for rank, report in _layout_rows(results, name):
            remote, straddling, _ = report["msa"]["probe"]
            assert remote > 0 and straddling > 0, (name, rank, remote, straddling)


@pytest.mark.slow
def test_select_first_overlap_was_used(results):
    """With the overlap on, every MSA call (2 layers x 2 micro-batches) received its
    selection from the overlapped index pass; with it off, none did."""
    for rank, report in _layout_rows(results, "cp2_select_first"):
        assert all(report[m]["probe"][2] == 2 * 2 for m in ("msa", "msa_warmup")), (rank, report["msa"]["probe"])
    for rank, report in _layout_rows(results, "cp2"):
        assert report["msa"]["probe"][2] == 0


# ----------------------------------------------------------------------------- configuration errors
def test_sequence_length_validation():
    from msa_megatron import MSAConfig
    from msa_megatron.megatron.context_parallel import CPLayoutError, validate_cp_sequence_length

    assert validate_cp_sequence_length(200, 2, MSAConfig(block_size=16)) == 100  # blocks may straddle chunks
    assert validate_cp_sequence_length(200, 2, tp=2, sequence_parallel=True) == 100
    assert validate_cp_sequence_length(7, 1) == 7
    with pytest.raises(CPLayoutError, match=r"seq_length=202 .*context_parallel_size=2: it must be a multiple "
                                            r"of 2\*context_parallel_size=4 .*allowed seq_length values are "
                                            r"multiples of 4"):
        validate_cp_sequence_length(202, 2, MSAConfig(block_size=16))
    with pytest.raises(CPLayoutError, match=r"seq_length=20 .*sequence_parallel=True: it must be a multiple of "
                                            r"context_parallel_size\*tensor_model_parallel_size=8 .*multiples of 8"):
        validate_cp_sequence_length(20, 2, tp=4, sequence_parallel=True)
    assert validate_cp_sequence_length(12, 2, tp=3, sequence_parallel=True) == 6  # lcm(4, 6) = 12
    with pytest.raises(CPLayoutError, match=r"context_parallel_size=0 is invalid: allowed values are integers >= 1"):
        validate_cp_sequence_length(200, 0)


def test_config_cp_rules():
    from mcore_helpers import msa_settings, tiny_config

    from msa_megatron.megatron.context_parallel import CPLayoutError

    cfg = tiny_config(msa_settings(first_dense_layers=1), num_layers=3, context_parallel_size=2)
    assert cfg.validate_sequence_length(200) == 100
    with pytest.raises(CPLayoutError, match=r"seq_length=202 .*context_parallel_size=2"):
        cfg.validate_sequence_length(202)
    with pytest.raises(ValueError, match=r"hybrid_context_parallel=True is not supported with msa.*allowed value is "
                                         r"False"):
        tiny_config(msa_settings(), num_layers=2, context_parallel_size=2, hybrid_context_parallel=True,
                    max_seqlen_per_dp_cp_rank=128)
    with pytest.raises(ValueError, match=r"cp_comm_type='p2p' is not supported with msa: MSA layer 0 .*allowed "
                                         r"values for MSA layers are None or 'all_gather'"):
        tiny_config(msa_settings(), num_layers=2, context_parallel_size=2, cp_comm_type="p2p")
    # per-layer types: the dense layer 0 may use another one, MSA layers all-gather
    tiny_config(msa_settings(first_dense_layers=1), num_layers=2, context_parallel_size=2,
                cp_comm_type=["p2p", "all_gather"])


def test_cp_dense_attention_refusals():
    """The local CP dense attention refuses what it cannot compute exactly, before building."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from mcore_helpers import tiny_config

    from msa_megatron.megatron.attention import CPDotProductAttention

    class FakeGroup:  # only .size() is read before the refusal
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    pgs = SimpleNamespace(cp=FakeGroup(2), tp=FakeGroup(1))
    cfg = tiny_config(None, num_layers=2, context_parallel_size=2, attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"attention_dropout=0.1 is not supported by the local core attention under "
                                         r"context parallelism \(context_parallel_size=2\): allowed value is 0.0"):
        CPDotProductAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    cfg = tiny_config(None, num_layers=2, context_parallel_size=2)
    with pytest.raises(ValueError, match=r"attn_mask_type=<AttnMaskType.padding: 1> .*allowed value is "
                                         r"<AttnMaskType.causal"):
        CPDotProductAttention(cfg, 1, AttnMaskType.padding, "self", pg_collection=pgs)

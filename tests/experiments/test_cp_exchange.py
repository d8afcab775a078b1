"""CP=k equals CP=1 for the MSA op (outputs, LSE, selection, gradients of q, k, v, iq, ik,
KL and statistics), over gloo processes. One spawned run of 4 processes carries every case
(each spawn costs seconds): CP=4 over all ranks, and CP=2 over two groups {0,1}, {2,3} fed
different data (group isolation)."""

from __future__ import annotations

import pytest
import torch

from msa_megatron.experiments import cp_exchange as cpx

from tests.dist_harness import run_distributed
from tests.experiments.cp_exchange_cases import op_worker

SMALL = dict(b=2, hq=4, g=2, d=16, di=16)
CP4 = [[0, 1, 2, 3]]
CP2 = [[0, 1], [2, 3]]

CASES = [
    # CP=4: chunk 32 = 2 blocks; recall statistics on
    dict(name="cp4_msa", groups=CP4, s=256, cfg=dict(block_size=16, topk=4, index_dim=16), recall=True, **SMALL),
    # CP=2, chunk 50 not block-aligned: blocks straddle chunk edges; init + 2 local blocks forced
    dict(name="cp2_unaligned", groups=CP2, s=200,
         cfg=dict(block_size=16, topk=5, index_dim=16, init_blocks=1, local_blocks=2), **SMALL),
    dict(name="cp2_warmup", groups=CP2, s=128, mode="msa_warmup", cfg=dict(block_size=16, topk=3, index_dim=16),
         **SMALL),
    dict(name="cp2_dense", groups=CP2, s=128, mode="dense", cfg=dict(block_size=16, topk=3, index_dim=16), **SMALL),
    dict(name="cp2_bf16", groups=CP2, s=256, dtype="bfloat16", cfg=dict(block_size=16, topk=4, index_dim=16),
         **SMALL),
    # selected-blocks exchange: random selection, then a concentrated one (two hot blocks)
    dict(name="cp4_selected", groups=CP4, s=256, kv_exchange="selected", cfg=dict(block_size=16, topk=4, index_dim=16),
         **SMALL),
    dict(name="cp4_selected_hot", groups=CP4, s=256, kv_exchange="selected", hot_blocks=[1, 6],
         cfg=dict(block_size=16, topk=3, index_dim=16), **SMALL),
    # gloo builds without reduce_scatter: the all-reduce + slice fallback gives the same gradients
    dict(name="cp2_gloo_fallback", groups=CP2, s=128, gloo_without_reduce_scatter=True,
         cfg=dict(block_size=16, topk=3, index_dim=16), **SMALL),
    # bad combinations: raised on every rank before any collective
    dict(name="err_odd", groups=CP2, s=202, cfg=dict(block_size=16, topk=4, index_dim=16), expect_error="2*cp=4",
         **SMALL),
    dict(name="err_selected_unaligned", groups=CP2, s=200, kv_exchange="selected",
         cfg=dict(block_size=16, topk=4, index_dim=16), expect_error="msa.block_size=16", **SMALL),
    dict(name="err_selected_warmup", groups=CP2, s=128, kv_exchange="selected", mode="msa_warmup",
         cfg=dict(block_size=16, topk=4, index_dim=16), expect_error="kv_exchange='allgather'", **SMALL),
]

FP64_TOL = 1e-10
BF16_TOL = {"out": 1e-2, "lse": 1e-5, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "diq": 2e-2, "dik": 2e-2,
            "kl": 1e-5, "stat_index_entropy": 1e-5, "stat_main_entropy": 1e-5}


@pytest.fixture(scope="module")
def results():
    per_rank = run_distributed(op_worker, 4, CASES)
    by_case = {}
    for rank_results in per_rank:
        for r in rank_results:
            by_case.setdefault(r["name"], []).append(r)
    return by_case


def _case(name):
    return next(c for c in CASES if c["name"] == name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c["name"] for c in CASES if not c.get("expect_error")])
def test_cp_equals_cp1(results, name):
    case = _case(name)
    rows = results[name]
    assert len(rows) == 4
    bf16 = case.get("dtype") == "bfloat16"
    for r in rows:
        checked = [k for k in r if k in ("out", "lse", "kl") or k.startswith(("d", "stat_")) and k != "stat_keys_equal"]
        assert {"out", "lse", "dq", "dk", "dv"} <= set(checked)
        if case.get("mode", "msa") != "dense":
            assert {"diq", "dik", "kl", "stat_index_entropy", "stat_main_entropy"} <= set(checked)
            assert r["block_idx_equal"], f"{name} rank {r['rank']}: selection differs from CP=1"
        if case.get("recall"):
            assert "stat_recall" in checked
        assert r["stat_keys_equal"]
        for k in checked:
            tol = BF16_TOL.get(k, 1e-5) if bf16 else FP64_TOL
            assert r[k] <= tol, f"{name} rank {r['rank']} (cp={r['cp']}, group {r['group']}): {k} differs by {r[k]:.3g}"


@pytest.mark.slow
def test_reduce_scatter_fallback_was_used(results):
    assert all(r["fallback_logged"] for r in results["cp2_gloo_fallback"])


@pytest.mark.slow
def test_cases_exercise_chunk_edges(results):
    """The data must make the equivalence meaningful: queries select blocks owned by other
    ranks everywhere, and in the unaligned case own blocks straddle a chunk edge."""
    for name in ("cp4_msa", "cp2_unaligned", "cp2_bf16", "cp4_selected"):
        assert all(r["remote_selected"] > 0 for r in results[name]), name
    assert any(r["local_block_straddles"] > 0 for r in results["cp2_unaligned"])
    assert all(r["local_block_straddles"] == 0 for r in results["cp4_msa"])


@pytest.mark.slow
def test_allgather_bytes_match_model(results):
    """The bytes the collectives moved equal the volume model used in docs/context_parallel.md."""
    case = _case("cp4_msa")
    for r in results["cp4_msa"]:
        m = cpx.CommModel(seq_len=case["s"], cp=4, num_kv_heads=case["g"], head_dim=case["d"],
                          index_dim=case["di"], bytes_per_element=8)
        model = m.allgather()
        assert r["comm"]["allgather"] == pytest.approx(case["b"] * model["fwd"])
        assert r["comm"]["reduce_scatter"] == pytest.approx(case["b"] * model["bwd"])


@pytest.mark.slow
def test_selected_exchange_volume(results):
    """Selected-blocks exchange moves exactly the union of the rank's selected remote blocks;
    with a concentrated selection that is far less than the all-gather."""
    for name in ("cp4_selected", "cp4_selected_hot"):
        case = _case(name)
        for r in results[name]:
            assert r["comm"]["selected_kv"] == pytest.approx(r["union"]["kv_bytes"])
            assert r["comm"]["selected_dkv"] > 0 or r["rank"] == 0
            assert "reduce_scatter" in r["comm"]  # d(ik) still returns by reduce-scatter
    full_kv = lambda c: c["b"] * (3 / 4) * c["s"] * 2 * c["g"] * c["d"] * 8
    hot = _case("cp4_selected_hot")
    assert all(r["comm"]["selected_kv"] < 0.5 * full_kv(hot) for r in results["cp4_selected_hot"])


@pytest.mark.slow
@pytest.mark.parametrize("name", [c["name"] for c in CASES if c.get("expect_error")])
def test_bad_layout_errors(results, name):
    for r in results[name]:
        assert r["error"] is not None, f"{name}: no error raised"
        assert _case(name)["expect_error"] in r["error"], r["error"]


def test_check_cp_sequence_messages():
    with pytest.raises(cpx.CPLayoutError, match=r"sequence length 30 .*cp=2.*multiples of 2\*cp=4"):
        cpx.check_cp_sequence(15, 2, 16)
    with pytest.raises(cpx.CPLayoutError, match=r"msa.block_size=128.*multiples of 2\*cp\*block_size=1024"):
        cpx.check_cp_sequence(200, 4, 128, kv_exchange="selected")
    with pytest.raises(cpx.CPLayoutError, match="kv_exchange='ring' is invalid: allowed values are allgather, selected"):
        cpx.check_cp_sequence(256, 2, 16, kv_exchange="ring")
    assert cpx.check_cp_sequence(200, 4, 128) == 100  # all-gather: any even local length
    assert cpx.check_cp_sequence(256, 2, 128, kv_exchange="selected") == 128

"""Packed documents under context parallelism (CP = 2 on gloo) in the Megatron backend: one
packed row of 208 tokens in msa_megatron's sbhd form (``packed_seq_params`` with cu_seqlens,
the row cut by the sequence-level zigzag into chunks of 52, so three documents cross a chunk
and a rank) equals the same model run on each document alone at CP = 1: per-token LM loss and
the gradient of every parameter (summed over the CP ranks), modes dense / msa_warmup / msa,
with and without the select-first overlap. Cases: tests/megatron/packed_cases.py."""

from __future__ import annotations

import os
import sys

import pytest

from tests.dist_harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "megatron"))

LOSS_TOL = 2e-5  # fp32; RoPE at global vs per-document positions differs by rounding only
GRAD_TOL = 5e-5


@pytest.fixture(scope="module")
def cp_results():
    from mcore_helpers import ENV
    from packed_cases import cp_worker

    return run_distributed(cp_worker, 2, env=ENV, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "msa_warmup", "msa"])
@pytest.mark.parametrize("select_first", [False, True])
def test_cp2_packed_equals_documents(cp_results, mode, select_first):
    for rank, res in enumerate(cp_results):
        assert res["layout"]["crossing_docs"] >= 3
        r = res[f"cp2/{mode}/select_first={select_first}"]
        where = f"rank {rank} mode {mode} select_first={select_first}"
        assert r["loss"] <= LOSS_TOL, f"{where}: loss differs by {r['loss']:.3g}"
        assert not r["missing"], f"{where}: gradient on one side only: {r['missing']}"
        bad = {n: e for n, e in r["grads"].items() if not e <= GRAD_TOL}
        assert not bad, f"{where}: gradients differ: {bad}"
        if mode != "dense":
            assert r["index_grad_norm"] > 0, f"{where}: no index gradient"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "msa"])
def test_cp2_thd_is_one_clear_error(cp_results, mode):
    for res in cp_results:
        assert "qkv_format='thd' with context_parallel_size=2 is not supported" in res[f"thd_error/{mode}"]

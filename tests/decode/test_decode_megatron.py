"""MSA layers through Megatron-Core's static inference context (KV cache + index-key cache).

One spawned single-process gloo run (tests/decode/megatron_cases.py) computes everything;
the tests below check its results. Tolerances (fp32, logits of magnitude ~10): cached logits
equal the no-cache forward's within LOGIT_TOL, and the MSA layers add no error beyond what
Megatron's own dense KV-cache path shows on the same model (the projections' matmuls see 1
row instead of s: BLAS blocks the sums differently, ~1e-5 here); greedy tokens identical. The kernel path (Triton prefill op + decode kernel under
TRITON_INTERPRET=1) accumulates in another order: KERNEL_LOGIT_TOL, tokens identical.
"""

from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

from .megatron_cases import run_all

LOGIT_TOL = 3e-5
KERNEL_LOGIT_TOL = 1e-4

pytest.importorskip("triton", reason="the kernel half of these checks needs triton (interpreter)")


@pytest.fixture(scope="module")
def results():
    # a CPU test everywhere: the child sees no CUDA device (gloo, compat layer, interpreter)
    return run_distributed(run_all, 1, env={"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=300)[0]


def test_greedy_with_cache_equals_no_cache_argmax(results):
    assert results["greedy_len"] == 37 + 30
    assert results["greedy_equal"]
    assert results["argmax_consistent"]
    assert results["inference_mode_logits_shape"] == [2, 1, 96]  # no [prompt, vocab] logits in the prefill
    assert results["greedy_step_logit_diff"] <= LOGIT_TOL


def test_prefill_plus_decode_logits_equal_full_forward(results):
    assert results["logits_scale"] > 0.1  # logits are not trivially small
    assert results["logits_diff"] <= LOGIT_TOL, results["logits_diff"]
    assert results["logits_diff"] <= 2 * results["logits_diff_dense"] + 1e-6  # no worse than Megatron's dense cache
    assert results["sparse_differs_from_dense"]  # the selection really drops blocks here


def test_index_key_cache_lives_in_the_context(results):
    # layers 2 and 3 (1-based) are MSA; layer 1 is dense and has no index-key cache
    assert results["index_cache_keys"] == [["msa_index_key", 2], ["msa_index_key", 3]]
    assert results["index_cache_shape"] == [67, 2, 16]
    assert results["swap_ok"]


@pytest.mark.parametrize("mode", ["dense", "msa_warmup"])
def test_dense_modes_decode_through_megatron(results, mode):
    assert results[f"logits_diff_{mode}"] <= LOGIT_TOL


def test_dynamic_context_is_refused_clearly(results):
    msg = results["dynamic_error"]
    assert msg is not None and "StaticInferenceContext" in msg and "'msa'" in msg


def test_kernels_under_interpreter_match(results):
    # 2 MSA layers x (4 - 1) cached steps through the Triton decode kernel, each selecting
    # fewer blocks than the cache holds (sparse)
    assert results["kernel_decode_calls"] == 2 * 3
    assert results["kernel_sparse_selection"]
    assert results["kernel_greedy_equal"]
    assert results["kernel_logit_diff"] <= KERNEL_LOGIT_TOL

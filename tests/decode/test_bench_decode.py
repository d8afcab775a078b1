"""The decode benchmark's Python paths on CPU (the timing itself needs a GPU): its
correctness pass under the Triton interpreter at a tiny head layout, and the report table."""

import pytest
import torch

pytest.importorskip("triton")

from msa_megatron.bench import decode as BD  # noqa: E402

from .conftest import DEVICE  # noqa: E402


def test_correctness_pass_tiny_layout(monkeypatch):
    for name, value in dict(HQ=8, G=2, D=16, DI=16, BLOCK=16, TOPK=3).items():
        monkeypatch.setattr(BD, name, value)
    c = BD.Caches(77, 2, dtype=torch.float32, device=DEVICE, seed=3)
    res = BD.correctness(c)
    assert res["ok"], res
    assert res["selection_rows_identical"] == 1.0 and res["selection_diffs_are_near_ties"]
    assert res["msa_out_rel_err"] < 1e-5
    assert "dense_sdpa_error" in res or any(k.startswith("dense_sdpa_") for k in res)


def test_markdown_report():
    report = {"meta": dict(device="H100", date="d", commit="c", torch="t", triton="x", layout="l"),
              "correctness": [{"L": 4099, "b": 2, "ok": True, "msa_out_rel_err": 0.001}],
              "records": [{"L": 1 << 20, "b": 8, "status": "ok", "msa_ms": 0.5, "dense_sdpa_ms": 4.0,
                           "dense_triton_ms": 5.0, "speedup_vs_best_dense": 8.0, "msa_tokens_per_s": 16000.0},
                          {"L": 1 << 15, "b": 1, "status": "skipped: time budget"}]}
    md = BD.markdown(report)
    assert "| 1M | 8 | 0.500 |" in md and "8.0x" in md and "16,000" in md
    assert "| 32K | 1 | skipped: time budget |" in md and "L=4099 b=2" in md

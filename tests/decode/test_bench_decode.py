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
    assert res["standalone_topk_equals_fused"]
    assert res["msa_out_rel_err"] < 1e-5
    assert "dense_sdpa_error" in res or any(k.startswith("dense_sdpa_") for k in res)


def test_markdown_report():
    report = {"meta": dict(device="H100", date="d", commit="c", torch="t", triton="x", layout="l"),
              "correctness": [{"L": 4099, "b": 2, "ok": True, "msa_out_rel_err": 0.001}],
              "records": [{"L": 1 << 20, "b": 8, "status": "ok", "msa_ms": 0.5, "dense_sdpa_ms": 4.0,
                           "dense_triton_ms": 5.0, "speedup_vs_best_dense": 8.0, "msa_tokens_per_s": 16000.0,
                           "msa_graph_ms": 0.4, "dense_sdpa_graph_ms": 3.6, "speedup_graph_vs_best_dense": 9.0},
                          {"L": 1 << 17, "b": 1, "status": "ok", "msa_ms": 0.2},
                          {"L": 1 << 15, "b": 1, "status": "skipped: time budget"}]}
    md = BD.markdown(report)
    assert "| 1M | 8 | eager | 0.500 |" in md and "8.0x" in md and "16,000" in md
    assert "| 1M | 8 | graph | 0.400 |" in md and "9.0x" in md  # eager and graph rows side by side
    assert "| 128K | 1 | eager | 0.200 |" in md and "| 128K | 1 | graph |" not in md  # no graph numbers, no row
    assert "| 32K | 1 | - | skipped: time budget |" in md and "L=4099 b=2" in md


class _FakeEvent:
    """Stands in for torch.cuda.Event on CPU (the flow, not the numbers, is under test)."""

    def __init__(self, enable_timing=True):
        self.t = 0.0

    def record(self):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_run_flow_on_cpu(monkeypatch, tmp_path):
    """bench.decode.run end to end at a tiny layout on CPU: correctness records, timing records
    for every impl (SDPA's flash/cuDNN backends refuse CPU tensors: recorded as an error, the
    Triton dense twin is the baseline), speed-up fields, JSON and markdown written."""
    import json
    import types

    if DEVICE == "cuda":
        pytest.skip("the CPU flow test; scripts/gpu_bench_decode.py runs the real one")
    for name, value in dict(HQ=8, G=2, D=16, DI=16, BLOCK=16, TOPK=2).items():
        monkeypatch.setattr(BD, name, value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(name="cpu-test"))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    for fn in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    report = BD.run(str(tmp_path), contexts=[45], batches=[2, 1], iters=1, device="cpu", log=lambda *a: None,
                    correctness_cases=((45, 2),))
    assert [c["ok"] for c in report["correctness"]] == [True]
    assert 0 < report["correctness"][0]["fp8ik_block_overlap"] <= 1  # bf16 caches: the fp8 index keys compared
    assert [(r["L"], r["b"], r["status"]) for r in report["records"]] == [(45, 2, "ok"), (45, 1, "ok")]
    for r in report["records"]:
        assert {"msa_ms", "msa_index_ms", "msa_select_attend_ms", "msa_fp8ik_ms", "msa_3launch_ms", "dense_triton_ms",
                "speedup_vs_best_dense", "speedup_fp8ik_vs_best_dense", "msa_tokens_per_s", "msa_loop_ms"} <= set(r), r
        assert not any("graph" in k for k in r)  # CUDA graphs only on CUDA
        assert ("dense_sdpa_ms" in r) != ("sdpa_error" in r)
    saved = json.loads((tmp_path / "decode_bench.json").read_text())
    assert saved["meta"]["device"] == "cpu-test" and len(saved["records"]) == 2
    assert "| 45 | 2 | eager |" in (tmp_path / "decode_bench.md").read_text()

"""scripts/multigpu_validate.py checked on CPU before it touches the GPUs.

* end to end: the driver launches the real ``torchrun`` job (2 gloo processes, ``--smoke``:
  tiny MoE, fp32, the reference MSA op) running all three parts; the equivalence rows must
  pass at fp32 tolerances, a deliberate shard-order bug (swapped TP shards) must be reported, and the
  throughput / long-sequence rows and the report must be complete;
* in process: a long part that stops at 1M (512K reported as the longest), failure propagation and the
  option passing of the driver, with the torchrun launch replaced by a stub.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "multigpu_validate.py"


def _module():
    spec = importlib.util.spec_from_file_location("multigpu_validate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MSA_COMMIT="testcommit")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--single-job", "--check-detection", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "MULTI-GPU VALIDATION OK" in proc.stdout
    res = json.loads((out / "results.json").read_text())

    rows = {r["layout"]: r for r in res["equiv"]}
    for name in ("cp2", "tp2_sp", "ep2"):
        r = rows[name]
        assert r["status"] == "PASS", r
        assert r["tolerance_rule"] == "fixed" and r["tolerances"]["logits_rel"] == pytest.approx(3e-5)
        assert r["kl"] > 0 and r["n_params"] > 30
    assert (rows["cp2"]["cp"], rows["tp2_sp"]["tp"], rows["ep2"]["ep"]) == (2, 2, 2)
    # the check is only worth something if it sees a shard-order bug
    bad = rows["tp2_sp_perturbed"]
    assert bad["status"] == "DETECTED" and bad["logits_rel"] > 1e-3, bad
    noise = rows["noise_floor"]
    assert noise["precisions"] == ["fp32", "bf16"] and 0 < noise["logits_rel"] < 0.1 and not noise["failures"]

    tp = {(r["tokens"], r["mode"]): r for r in res["throughput"]}
    assert sorted(tp) == [(128, "dense"), (128, "msa"), (256, "dense"), (256, "msa")]
    for r in tp.values():
        assert r["finite"] and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gb"] > 0 and r["cp"] == 2
    # MSA counts fewer attention FLOPs than dense at the same length (the sparse count)
    assert tp[(256, "msa")]["model_flops_per_step"] < tp[(256, "dense")]["model_flops_per_step"]

    assert [r["tokens"] for r in res["long"]] == [256, 512]  # ascending
    for r in res["long"]:
        assert r["status"] == "OK" and r["recompute"] == "full" and math.isfinite(r["loss"]) and r["kl"] > 0

    report = (out / "report.md").read_text()
    assert "commit testcommit" in report and "| tp2_sp_perturbed |" in report and "| 256 | msa |" in report
    assert "- 512 tokens: OK" in report


def test_driver_long_partial_and_failures(tmp_path, monkeypatch):
    mod = _module()
    calls = []

    def fake_launch(a, part, extra, limit, out):
        calls.append((part, extra, limit))
        if part == "long":  # 256K and 512K complete, 1M runs out of memory on both ranks
            with open(out / "long.jsonl", "a") as f:
                for tokens in (262144, 524288):
                    f.write(json.dumps(dict(part="long", tokens=tokens, status="OK", fwd_bwd_s=30.0, tokens_per_s=1e4,
                                            peak_mem_gb=60.0, total_gb=80.0, loss=5.6)) + "\n")
                for rank in (0, 1):
                    f.write(json.dumps(dict(part="long", tokens="1M", rank=rank,
                                            error="OutOfMemoryError: CUDA out of memory.")) + "\n")
            return "exit 1", 90.0
        if part == "equiv":
            with open(out / "equiv.jsonl", "a") as f:
                f.write(json.dumps(dict(part="equiv", layout="cp2", status="FAIL", loss=1.0, ref_loss=1.0,
                                        token_losses_rel=0.5, logits_rel=0.5, grads_rel=0.5, kl_rel=None,
                                        worst_params=[["w", 0.9]], tolerances={}, layers=4, tokens=32768,
                                        precision="bf16")) + "\n")
        return "ok", 10.0

    monkeypatch.setattr(mod, "launch", fake_launch)
    argv = ["--out", str(tmp_path), "--parts", "long", "--time-limit", "long=100", "--nproc", "2", "--topk", "8"]
    a = mod.parse_args(argv)
    assert mod.driver(a, mod.passthrough_args(argv)) == 0  # the longest that fits is an answer, not a failure
    assert calls == [("long", ["--out", str(tmp_path), "--topk", "8"], 100.0)]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["parts"]["long"]["status"] == "ok (up to 512K; then exit 1)"
    report = (tmp_path / "report.md").read_text()
    assert "- 512K tokens: OK" in report and "- 1M tokens: did not complete (OutOfMemoryError" in report
    assert report.count("1M tokens: did not complete") == 1  # one line for both ranks

    # a failed equivalence row fails the run, as does a part that does not finish
    a = mod.parse_args(["--out", str(tmp_path / "b"), "--parts", "equiv"])
    assert mod.driver(a, []) == 1
    monkeypatch.setattr(mod, "launch", lambda *args: ("timeout after 5s", 5.0))
    a = mod.parse_args(["--out", str(tmp_path / "c"), "--parts", "throughput,long"])
    assert mod.driver(a, []) == 1
    a = mod.parse_args(["--out", str(tmp_path / "d"), "--parts", "bogus"])
    with pytest.raises(SystemExit, match="unknown"):
        mod.driver(a, [])


def test_passthrough_and_defaults():
    mod = _module()
    assert mod.passthrough_args(["--out", "o", "--parts", "equiv", "--nproc=4", "--single-job", "--time-limit",
                                 "equiv=5", "--lengths", "32K"]) == ["--out", "o", "--lengths", "32K"]
    a = mod.parse_args(["--out", "o"])
    assert (a.model, a.block_size, a.topk, a.equiv_tokens, a.lengths, a.long_tokens) == (
        "small_moe", 128, 16, 32768, "32K,64K,128K", "512K,1M")
    assert sum(mod.DEFAULT_LIMITS.values()) <= 540  # the whole run fits a 10-minute device call

"""scripts/fidelity.py end to end on the tiny CPU model: three of the seven runs (dense,
sliding window, dense->MSA conversion from the dense run's checkpoint: warmup then sparse,
the MSA path), two steps each, two at a time, then the report (table + plots)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, env):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fidelity.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fidelity_script_cpu_end_to_end(cache_dir, tmp_path):
    env = dict(os.environ, MSA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    out = tmp_path / "fid"
    _run(["--preset", "cpu", "--steps", "2", "--runs", "dense,swa,dense_to_msa", "--jobs", "2",
          "--recall-sweep", "16:2,32:4", "--out", str(out), "--export", str(tmp_path / "export")], env)
    exported = {str(p.relative_to(tmp_path / "export")) for p in (tmp_path / "export").rglob("*") if p.is_file()}
    assert "results.json" in exported and "runs/dense_to_msa/recall_sweep.json" in exported
    assert "runs/swa/metrics.jsonl" in exported and not any("checkpoints" in p for p in exported)
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"dense", "swa", "dense_to_msa"}
    assert all(s["rc"] == 0 for s in res["status"].values()), res["status"]
    assert res["swa_window"] == 127 and res["seq_length"] == 256  # Eq. 12 for the tiny model at 256
    for name, r in res["runs"].items():
        f = r["final"]
        assert math.isfinite(f["val_loss"]) and 0 <= f["assoc_recall"] <= 1 and f["max_grad_norm"] > 0, (name, f)
        assert [s for s, _ in r["grad_norm"]] == list(range(1, f["steps"] + 1))  # a grad norm per step
    conv = res["runs"]["dense_to_msa"]
    assert res["runs"]["dense"]["final"]["kl"] is None and conv["final"]["kl"] > 0
    assert set(conv["recall_sweep"]) == {"B16_k2", "B32_k4"}
    assert all(0 < v <= 1 for v in conv["recall_sweep"].values())
    assert set(conv["main_entropy"]) == {"layer_1", "layer_2", "layer_3"}  # per MSA layer, first steps
    assert "weights from" in (out / "logs" / "dense_to_msa.log").read_text()  # started from the dense checkpoint
    assert conv["switch_step"] == 2 and res["conversion"]["dense_final_val_loss"] == res["runs"]["dense"]["final"]["val_loss"]
    # the sliding-window run really ran the window
    assert "sliding-window attention: window 127" in (out / "logs" / "swa.log").read_text()

    # a re-run reuses finished runs
    again = _run(["--preset", "cpu", "--steps", "2", "--runs", "dense", "--out", str(out)], env)
    assert "already finished" in again.stdout

    pytest.importorskip("matplotlib")
    doc, plots = tmp_path / "doc" / "fidelity.md", tmp_path / "doc" / "fidelity"
    doc.parent.mkdir()
    doc.write_text("# Fidelity\n\nhand-written intro\n\n<!-- BEGIN GENERATED (scripts/fidelity.py --report) -->\nold\n"
                   "<!-- END GENERATED -->\n\nhand-written discussion\n")
    _run(["--report", str(tmp_path / "export"), "--doc", str(doc), "--plots", str(plots)], env)  # from the export
    text = doc.read_text()
    assert "hand-written intro" in text and "hand-written discussion" in text and "\nold\n" not in text
    assert "| (3) sliding window (FLOP-matched) | 2 |" in text and "CPU smoke results" in text
    assert {p.name for p in plots.iterdir()} == {"loss.png", "grad_norm.png", "entropy.png", "kl_recall.png",
                                                 "assoc_recall.png", "recall_vs_k.png"}

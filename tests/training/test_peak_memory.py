"""peak_mem_gib (torch.cuda.max_memory_allocated over the run, GiB) reaches summary.json."""

from __future__ import annotations

import json

from msa_megatron.training.logging import format_summary, summarize


def test_summary_has_the_run_peak(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "lm_loss": 5.0, "peak_mem_gib": 30.5}, {"step": 2, "lm_loss": 4.0, "peak_mem_gib": 41.25},
            {"step": 3, "event": "x"}, {"step": 4, "lm_loss": 3.0, "peak_mem_gib": 41.25}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(path)
    assert s["peak_mem_gib"] == 41.25
    assert "peak GPU memory    41.25 GiB" in format_summary(s)
    path.write_text(json.dumps({"step": 1, "lm_loss": 5.0, "mem_gb": 1.0}) + "\n")  # CPU runs: no GPU peak
    assert "peak_mem_gib" not in summarize(path)

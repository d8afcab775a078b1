"""Logging sinks and throughput accounting, in-process (no processes, no Megatron)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from msa_megatron.flops import AttentionShape, dense_flops_per_token, index_flops_per_token, msa_flops_per_token
from msa_megatron.training.logging import RunLogger, format_summary, read_jsonl, summarize
from msa_megatron.training.metrics import Throughput, attention_flops_per_token, step_flops

from .test_config import cfg_of


def _logger(tmp_path, start_step=0, **overrides):
    cfg = cfg_of(f"run_dir={tmp_path}", "logging.progress_bar=false", *[f"{k}={v}" for k, v in overrides.items()])
    return RunLogger(cfg, active=True, start_step=start_step, total_steps=cfg.total_steps(), wandb_id=None)


def test_without_wandb_it_says_so_once_and_keeps_the_jsonl(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with caplog.at_level(logging.WARNING):
        lg = _logger(tmp_path)
    assert [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()] == [
        f"wandb is not installed: logging to {tmp_path / 'metrics.jsonl'} only (pip install wandb to get W&B runs)"]
    lg.log_step(1, {"lm_loss": 2.5, "attention_mode": "msa_warmup", "grad_norm": float("nan"), "mfu": 0.25})
    lg.event(2, "non_finite", "non-finite loss at step 2")
    lg.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "lm_loss": 2.5, "attention_mode": "msa_warmup", "grad_norm": None, "mfu": 0.25},
        {"step": 2, "event": "non_finite", "message": "non-finite loss at step 2"}]
    out = capsys.readouterr().out
    assert "step 1/100 | loss 2.5000 | mode msa_warmup | gnorm nan | mfu 25.0% | eta" in out


def test_resume_drops_records_logged_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "lm_loss": 1.0}) + "\n" for s in range(1, 8)))
    lg = _logger(tmp_path, start_step=4, **{"logging.wandb.enabled": "false"})
    lg.log_step(5, {"lm_loss": 0.5})
    lg.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_summary_reports_start_switch_and_end(tmp_path):
    rows = [{"step": 1, "lm_loss": 5.0, "indexer_kl": 1.0, "attention_mode": "msa_warmup"},
            {"step": 2, "lm_loss": 4.0, "indexer_kl": 0.2, "recall": 0.5, "attention_mode": "msa_warmup"},
            {"step": 3, "event": "preempted", "message": "x"},
            {"step": 3, "lm_loss": 3.0, "indexer_kl": 0.3, "recall": 0.7, "attention_mode": "msa"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path / "m.jsonl")
    assert s["attention_mode"] == {"first": "msa_warmup", "last": "msa", "switched_at_steps": [3]}
    assert (s["indexer_kl"]["first"], s["indexer_kl"]["before_switch"], s["indexer_kl"]["last"]) == (1.0, 0.2, 0.3)
    assert "before_switch" not in s["recall"]  # its first value is already the last before the switch
    text = format_summary(s)
    assert "indexer KL         1.0000 (step 1) -> 0.2000 (step 2) -> 0.3000 (step 3)" in text
    assert "msa_warmup -> msa (from step 3)" in text


def test_attention_flops_follow_eq12_per_mode():
    cfg = cfg_of("train.seq_length=4096")  # tiny: 4 layers, layer 0 dense, 4 q heads of 32, 2 KV groups
    m, msa, n = cfg.model, cfg.msa, 4096
    shape = AttentionShape(m.num_attention_heads, m.kv_channels, m.num_query_groups, msa.index_dim, msa.block_size, msa.topk)
    dense = dense_flops_per_token(shape, n)
    assert attention_flops_per_token(cfg, "dense") == pytest.approx(4 * dense)
    assert attention_flops_per_token(cfg, "msa_warmup") == pytest.approx(4 * dense + 3 * index_flops_per_token(shape, n))
    assert attention_flops_per_token(cfg, "msa") == pytest.approx(dense + 3 * msa_flops_per_token(shape, n))
    assert attention_flops_per_token(cfg, "msa") < attention_flops_per_token(cfg, "dense")
    assert step_flops(cfg, 1000, "dense") == pytest.approx(cfg.tokens_per_step() * (6000 + 3 * 4 * dense))


def test_throughput_and_mfu_arithmetic():
    cfg = cfg_of("attention=dense")
    tp = Throughput(cfg, active_params=10**6, world_size=2, peak=1e12)
    tp.add(2.0, "dense")
    tp.add(4.0, "dense")
    s = tp.scalars()
    flops = 2 * step_flops(cfg, 10**6, "dense")
    assert s["tokens_per_s"] == pytest.approx(2 * cfg.tokens_per_step() / 6.0)
    assert s["mfu"] == pytest.approx(flops / 6.0 / (2 * 1e12))
    assert s["step_time_s"] == 3.0
    tp.reset()
    assert tp.scalars() == {}
    unknown_peak = Throughput(cfg, 10**6, 1, float("nan"))  # CPU, or an unlisted GPU, without logging.peak_tflops
    unknown_peak.add(1.0, "dense")
    assert "mfu" not in unknown_peak.scalars() and "tokens_per_s" in unknown_peak.scalars()


def test_tensorboard_uses_megatron_names_and_plots_are_drawn(tmp_path, capsys):
    """Issue 18.10: one vocabulary with Megatron-LM (lm loss, learning-rate, grad-norm,
    throughput, msa/...) in the shared sinks; a TensorBoard sink; PNG plots at the end."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from msa_megatron.training.logging import write_plots
    from msa_megatron.training.metrics import public_scalars

    lg = _logger(tmp_path, **{"logging.wandb.enabled": "false", "logging.per_layer": "true"})
    for step in (1, 2, 3):
        mode = "msa_warmup" if step < 3 else "msa"
        lg.log_step(step, {"lm_loss": 3.0 / step, "attention_mode": mode, "lr": 1e-3, "grad_norm": 0.5,
                           "tflops_per_device": 1.5, "indexer_kl": 0.1 * step, "indexer_kl/layer_1": 0.2,
                           "recall": 0.5, "index_entropy": 2.0, "main_entropy": 2.5, "val/recall": 0.6})
    lg.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "throughput", "msa/indexer_kl", "msa/indexer_kl/layer_1",
            "msa/recall", "msa/val/recall", "msa/sparse"} <= tags
    assert [e.value for e in events.Scalars("msa/sparse")] == [0.0, 0.0, 1.0]
    assert public_scalars({"val_lm_loss": 2.0, "mem_kind": "cpu_rss", "mfu": float("nan")}) == {"lm loss validation": 2.0}

    (tmp_path / "default").mkdir()
    quiet = _logger(tmp_path / "default", **{"logging.wandb.enabled": "false"})  # per-layer panels are opt-in
    quiet.log_step(1, {"lm_loss": 1.0, "indexer_kl": 0.1, "indexer_kl/layer_1": 0.2})
    quiet.close()
    default = EventAccumulator(str(tmp_path / "default" / "tensorboard"))
    default.Reload()
    assert set(default.Tags()["scalars"]) == {"lm loss", "msa/indexer_kl"}
    assert read_jsonl(tmp_path / "default" / "metrics.jsonl")[0]["indexer_kl/layer_1"] == 0.2  # the file keeps them

    files = write_plots(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [f.name for f in files] == ["loss.png", "kl.png", "recall.png", "entropy.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_log_records_go_above_the_progress_bar_and_cpu_notices_are_info(monkeypatch):
    """Log lines and the tqdm bar shared stderr and overwrote each other; the per-run
    CPU-compatibility notice was a WARNING listing 33 patched calls on every rank."""
    from msa_megatron.training import logging as run_logging

    class Bar:
        disable = False
        lines = []

        def write(self, text, file=None):
            self.lines.append(text)

    bar = Bar()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        run_logging.setup_python_logging(0, "INFO")
        monkeypatch.setattr(run_logging, "_active_bar", bar)
        logging.getLogger("msa_megatron.compat").warning(
            "MSA: no CUDA device; Megatron-Core runs on CPU (gloo) with the compatibility layer (x): %s", "a, b, c")
        assert len(bar.lines) == 1 and " INFO msa_megatron.compat: MSA: no CUDA device: Megatron-Core runs on CPU" \
            in bar.lines[0] and "a, b, c" not in bar.lines[0]
        run_logging.setup_python_logging(1, "INFO")  # other ranks: warnings only, so not at all
        logging.getLogger("msa_megatron.compat").warning("MSA: no CUDA device; Megatron-Core runs on CPU ...")
        assert len(bar.lines) == 1
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])

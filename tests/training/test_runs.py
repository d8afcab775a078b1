"""Multi-process training runs (gloo, CPU) through the warm launcher (launcher.py), with
the MSA backend's layers (the pure-PyTorch MSA reference on CPU). Each test combines
several checks per run to keep the suite short."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from .conftest import QUIET

pytestmark = pytest.mark.slow
MSA_LAYERS = (1, 2, 3)  # tiny: 4 layers, the first dense (model.msa_dense_layers=1)


def _check(result) -> None:
    assert result.ok(), f"codes {result.codes}, timed out {result.timed_out}\n{result.logs[-6000:]}"


def _ckpt_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Model tensors of a dist checkpoint, read with plain torch.distributed.checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    meta = reader.read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")}
    load(sd, storage_reader=reader, no_dist=True)
    return sd


def _optimizer_keys(path: Path) -> List[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return [k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata if k.startswith("optimizer.")]


def read_wandb_history(run_dir: Path) -> List[dict]:
    """History rows of an offline wandb run (the .wandb file: LevelDB-log-framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


# --------------------------------------------------------------------------- TP=2 + MSA
def test_tp2_msa_run_switches_at_the_configured_step_and_logs_everything(server, tmp_path):
    run = tmp_path / "tp2"
    constant_lr = ["train.lr_decay_style=constant", "train.lr_warmup_fraction=null", "train.lr_warmup_steps=0"]
    r = server.run(run, QUIET + constant_lr + ["parallel=tp2", "train.steps=6", "attention.warmup.steps=3",
                                               "attention.msa.recall_interval=2", "train.eval_interval=6",
                                               "logging.wandb.enabled=true", "checkpoint.interval=0",
                                               "logging.per_layer=true"])
    _check(r)
    steps = r.steps()
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    # warmup -> sparse switch exactly after warmup.steps: as logged, and in the model (a run that
    # stays in warmup matches steps 1-3 exactly and differs from step 4, the first sparse forward)
    assert [steps[s]["attention_mode"] for s in range(1, 7)] == ["msa_warmup"] * 3 + ["msa"] * 3
    dense = server.run(tmp_path / "stay", QUIET + constant_lr + ["parallel=tp2", "train.steps=4",
                                                                 "attention.warmup.steps=4", "checkpoint.save_at_end=false",
                                                                 "attention.msa.recall_interval=2"])
    _check(dense)
    ref = dense.steps()
    assert [steps[s]["lm_loss"] for s in (1, 2, 3)] == [ref[s]["lm_loss"] for s in (1, 2, 3)]
    assert steps[4]["lm_loss"] != ref[4]["lm_loss"]
    for s, rec in steps.items():
        for key in ("lm_loss", "lr", "grad_norm", "index_grad_norm", "tokens_per_s", "mfu", "mem_gb", "indexer_kl",
                    "index_entropy", "main_entropy"):
            assert isinstance(rec.get(key), float) and math.isfinite(rec[key]), (s, key, rec.get(key))
        for layer in MSA_LAYERS:
            for key in ("indexer_kl", "index_entropy", "main_entropy"):
                assert math.isfinite(rec[f"{key}/layer_{layer}"])
        assert "indexer_kl/layer_0" not in rec  # the dense first layer
        # recall only on sampled steps: the first, then every 2nd
        sampled = s == 1 or s % 2 == 0
        assert ("recall" in rec) == sampled and all((f"recall/layer_{i}" in rec) == sampled for i in MSA_LAYERS)
        assert rec["mem_kind"] == "cpu_rss" and 0 < rec["mfu"] < 10
    assert "val_lm_loss" in steps[6] and "val/indexer_kl" in steps[6] and "val/recall" in steps[6]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    held = [e["message"] for e in events if e["event"] == "held_out"]  # what the held-out loss is measured on
    assert len(held) == 1 and re.fullmatch(r"held-out split: \d+ documents, [\d.]+M tokens; the largest, document \d+ "
                                           r"\(stdlib/\S+\.py\), is [\d.]+% of them", held[0]), held
    # the same scalars reached wandb (offline run files), under Megatron-LM's names and msa/...
    history = {row["_step"]: row for row in read_wandb_history(run)}
    for s in range(1, 7):
        assert history[s]["lm loss"] == steps[s]["lm_loss"] and history[s]["grad-norm"] == steps[s]["grad_norm"]
        assert history[s]["learning-rate"] == steps[s]["lr"]
        assert history[s]["msa/sparse"] == (1.0 if steps[s]["attention_mode"] == "msa" else 0.0)
        assert history[s]["msa/index_entropy/layer_3"] == steps[s]["index_entropy/layer_3"]
        assert history[s]["msa/indexer_kl"] == steps[s]["indexer_kl"]
        assert history[s]["msa/index_grad_norm"] == steps[s]["index_grad_norm"]  # index_grad_clip=separate (default)
    assert {"loss.png", "kl.png", "recall.png", "entropy.png"} <= {p.name for p in (run / "plots").iterdir()}
    assert f"plots: {run / 'plots'}/ (loss.png, kl.png, recall.png, entropy.png)" in r.logs
    # run directory: resolved config, summary, final checkpoint
    assert "tp: 2" in (run / "config.yaml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attention_mode"]["switched_at_steps"] == [4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------- EP=2 MoE
def test_ep2_moe_msa_run(server, tmp_path):
    run = tmp_path / "ep2"
    r = server.run(run, QUIET + ["model=tiny_moe", "parallel=ep2", "train.steps=3", "attention.warmup.steps=1",
                                 "checkpoint.interval=1", "checkpoint.keep_last=3", "train.weight_decay=0.0",
                                 "attention.kl_schedule=[[0,0.0],[2,0.0],[3,1.0]]"])
    _check(r)
    steps = r.steps()
    assert sorted(steps) == [1, 2, 3]
    # the KL coefficient schedule reached the model: with coefficient 0 (steps 1-2) the index
    # branch gets no gradient and stays put (no weight decay here); at step 3 it trains
    assert [steps[s]["kl_coeff"] for s in (1, 2, 3)] == [0.0, 0.0, 1.0]
    c1, c2, c3 = (_ckpt_tensors(run / "checkpoints" / f"step_0000000{i}") for i in (1, 2, 3))
    index_keys = [k for k in c1 if "index_q" in k or "index_k" in k]
    assert index_keys and all(torch.equal(c1[k], c2[k]) for k in index_keys)
    assert any(not torch.equal(c2[k], c3[k]) for k in index_keys)
    for rec in steps.values():
        # Switch aux loss: ~1 for balanced routing (4 experts, top-2)
        assert 0.5 < rec["moe_aux_loss"] < 4.0 and math.isfinite(rec["lm_loss"]) and math.isfinite(rec["indexer_kl"])
    assert steps[3]["lm_loss"] < steps[1]["lm_loss"]
    assert any("experts" in k for k in c3) and any("shared_experts" in k for k in c3)


# --------------------------------------------------------------------------- PP=2
def test_pp2_msa_run_collects_layers_of_both_stages(server, tmp_path):
    r = server.run(tmp_path / "pp2", QUIET + ["parallel=pp2", "train.steps=2", "attention.warmup.steps=1",
                                              "checkpoint.interval=1", "checkpoint.keep_last=1"])
    _check(r)
    steps = r.steps()
    assert sorted(steps) == [1, 2] and steps[2]["attention_mode"] == "msa"
    ckpts = sorted(p.name for p in (tmp_path / "pp2" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002"]  # keep_last=1 pruned step 1
    for layer in MSA_LAYERS:  # layer 1 lives on stage 0, layers 2-3 on stage 1
        assert math.isfinite(steps[2][f"indexer_kl/layer_{layer}"])


# --------------------------------------------------------------------------- resume
def test_resume_is_bit_exact_and_reshards_to_another_tp(server, tmp_path):
    # the passkey probe at the last step: its needle selection must not depend on the TP layout
    probe = ["train.eval_interval=6", "train.eval_iters=1", "data.passkey.eval_batches=1", "data.passkey.num_keys=2",
             "data.passkey.distance_buckets=[50,100,206]"]
    common = QUIET + ["train.steps=6", "attention.warmup.steps=4", "checkpoint.interval=3", "checkpoint.keep_last=5"] + probe
    a = server.run(tmp_path / "a", common)  # dp=2: distributed-optimizer state sharded over 2 ranks
    _check(a)
    ref = a.steps()
    # (1) auto-resume of an interrupted run: its directory as it was at step 3 (+ stale log lines)
    b_dir = tmp_path / "b"
    (b_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000003", b_dir / "checkpoints" / "step_00000003")
    (b_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    (b_dir / "checkpoints" / ".tmp-step_00000006").mkdir()  # a save that crashed: never read
    shutil.copy(tmp_path / "a" / "metrics.jsonl", b_dir / "metrics.jsonl")
    b = server.run(b_dir, common)
    _check(b)
    got = b.steps()
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # 4-6 of the copied log were replaced, not duplicated
    assert len([r for r in b.records() if "event" not in r]) == 6
    # each segment states its held-out split once: the interrupted run's (step 0) and the resume's (step 3)
    assert [r["step"] for r in b.records() if r.get("event") == "held_out"] == [0, 3]
    for s in (4, 5, 6):
        for key in ("lm_loss", "grad_norm", "indexer_kl", "lr"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])  # bit-exact
    assert not (b_dir / "checkpoints" / ".tmp-step_00000006").exists()
    # (2) another run resumes A's step-3 checkpoint at TP=2 (dist_checkpointing reshards)
    c = server.run(tmp_path / "c", common + ["parallel=tp2", f"checkpoint.load={tmp_path / 'a' / 'checkpoints'}/step_00000003"])
    _check(c)
    got = c.steps()
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s]["lm_loss"] == pytest.approx(ref[s]["lm_loss"], rel=1e-5)
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4)
    assert "RNG states re-seeded" in c.logs
    # each TP rank selects for its own KV group: the needle ORs them, as TP=1 does over both
    needle = {k: v for k, v in ref[6].items() if k.startswith("val_passkey_needle")}
    # mean overall and per bucket (2), per layer overall and per bucket, any layer overall and per bucket
    assert len(needle) == 1 + 2 + 3 * len(MSA_LAYERS) + 3, needle
    assert {k: v for k, v in got[6].items() if k.startswith("val_passkey_needle")} == pytest.approx(needle, abs=1e-9)


# --------------------------------------------------------------------------- failures
def test_nan_gradient_is_located_then_skipped_or_stops(server, tmp_path):
    skip = server.run(tmp_path / "skip", QUIET + ["attention=dense", "train.steps=3", "train.nan_policy=skip",
                                                  "train.debug.nan_grad_step=2", "checkpoint.save_at_end=false"])
    _check(skip)
    (event,) = [rec for rec in skip.records() if rec.get("event") == "non_finite"]
    assert event["step"] == 2
    assert "non-finite gradient at step 2" in event["message"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in event["message"]
    assert "skipping the update" in event["message"]
    steps = skip.steps()
    assert steps[3]["skipped_steps"] == 1 and math.isfinite(steps[3]["lm_loss"])

    stop = server.run(tmp_path / "stop", QUIET + ["attention=dense", "train.steps=3", "train.debug.nan_grad_step=2",
                                                  "checkpoint.interval=1"], world=1)
    assert stop.codes == [1], stop.logs[-3000:]
    assert "non-finite gradient at step 2" in stop.logs and "stopping" in stop.logs
    assert "training stopped on a non-finite value at step 2" in stop.logs
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_bad_layout_for_the_process_count_is_one_error(server, tmp_path):
    r = server.run(tmp_path / "bad", QUIET + ["parallel.tp=4"], world=2)
    assert r.codes == [2, 2]
    assert "msa-train: error: parallel='tp=4 pp=1 cp=1' is invalid" in r.logs


# --------------------------------------------------------------------------- MSA training
def test_indexer_kl_falls_on_the_embedded_corpus_and_cp2_agrees(server, tmp_path):
    # all in msa_warmup, where the KL is measured the same way at every step (over all causal
    # tokens; after the switch it is over the selected tokens)
    small = QUIET + ["checkpoint.save_at_end=false", "train.global_batch_size=4", "train.lr_warmup_fraction=0.1"]
    r = server.run(tmp_path / "kl", small + ["train.steps=6", "attention.warmup.steps=6"], world=1)
    _check(r)
    steps = r.steps()
    kl = [steps[s]["indexer_kl"] for s in range(1, 7)]
    assert (kl[-1] + kl[-2]) / 2 < 0.7 * (kl[0] + kl[1]) / 2, kl
    assert steps[6]["lm_loss"] < steps[1]["lm_loss"]
    # context parallelism: the same first batch split over 2 ranks gives the same loss and KL
    cp = server.run(tmp_path / "cp2", small + ["parallel.cp=2", "train.steps=2", "attention.warmup.steps=1"])
    _check(cp)
    got = cp.steps()
    assert got[1]["lm_loss"] == pytest.approx(steps[1]["lm_loss"], rel=1e-5)
    assert got[1]["indexer_kl"] == pytest.approx(steps[1]["indexer_kl"], rel=1e-4)
    assert got[2]["attention_mode"] == "msa" and math.isfinite(got[2]["indexer_kl"])


def test_held_out_probes_are_scored_per_distance_in_a_real_run(server, tmp_path):
    """The associative-recall task (trained on) and the passkey copy probe (only scored) log
    their accuracy overall and per distance bucket at each evaluation, after the switch too;
    the passkey probe also logs its needle selection (training/needle.py) in the modes that
    select (msa_warmup at step 1, msa at step 2), per bucket and per MSA layer, and not in a
    dense run."""
    probes = ["checkpoint.save_at_end=false", "train.global_batch_size=4", "train.steps=2", "train.eval_iters=1",
              "data.passkey.eval_batches=1", "data.passkey.num_keys=2", "data.passkey.distance_buckets=[50,100,206]"]
    r = server.run(tmp_path / "probes", QUIET + probes + [
        "attention.warmup.steps=1", "train.eval_interval=1", "data.assoc_recall.train_fraction=0.5",
        "data.assoc_recall.eval_batches=1", "data.assoc_recall.num_pairs=4", "data.assoc_recall.num_queries=4",
        "data.assoc_recall.distance_buckets=[8,64,248]"], world=1)
    _check(r)
    steps = r.steps()
    assert [steps[s]["attention_mode"] for s in (1, 2)] == ["msa_warmup", "msa"]
    last = steps[2]
    for key, buckets in (("val_assoc_recall_acc", ("d8_64", "d64_248")), ("val_passkey_acc", ("d50_100", "d100_206"))):
        assert 0 <= last[key] <= 1 and all(0 <= last[f"{key}/{b}"] <= 1 for b in buckets), (key, last)
    needle = [f"val_passkey_needle/{b}" for b in ("d50_100", "d100_206")] + \
        [f"val_passkey_needle/layer_{i}" for i in MSA_LAYERS]
    for s in (1, 2):
        assert all(0 <= steps[s][k] <= 1 for k in ["val_passkey_needle"] + needle), (s, steps[s])
        assert "val_passkey_needle/layer_0" not in steps[s]  # the dense first layer
        assert not any(k.startswith("val_assoc_recall_needle") for k in steps[s])  # the passkey probe's only
    dense = server.run(tmp_path / "dense", QUIET + probes + ["attention=dense", "train.eval_interval=2"], world=1)
    _check(dense)
    got = dense.steps()[2]
    assert 0 <= got["val_passkey_acc"] <= 1 and not any("needle" in k for k in got), got


def test_dense_to_msa_conversion_with_a_frozen_backbone_phase(server, tmp_path):
    # bf16: the distributed optimizer keeps fp32 copies of the weights, so a weights-only load
    # must refresh them (otherwise the first step would write the pre-load weights back).
    small = QUIET + ["train.precision=bf16", "train.seq_length=128", "train.global_batch_size=2",
                     "train.micro_batch_size=1", "model.msa_block_size=16", "model.msa_topk=2"]
    dense = server.run(tmp_path / "dense", small + ["attention=dense", "train.steps=1"], world=1)
    _check(dense)
    conv = tmp_path / "conv"
    r = server.run(conv, small + ["train.steps=3", "attention.warmup.steps=3", "attention.indexer_only.steps=2",
                                  "attention.indexer_only.backbone_lr_scale=0.0", "checkpoint.interval=1",
                                  "checkpoint.keep_last=5", f"checkpoint.init_from={tmp_path / 'dense' / 'checkpoints'}"],
                   world=1)
    _check(r)
    assert "index-branch tensors were not in the checkpoint; initialised with" in r.logs
    assert [r.steps()[s].get("indexer_only") for s in (1, 2, 3)] == [1.0, 1.0, None]
    d0 = _ckpt_tensors(tmp_path / "dense" / "checkpoints" / "step_00000001")
    c1, c2, c3 = (_ckpt_tensors(conv / "checkpoints" / f"step_0000000{i}") for i in (1, 2, 3))
    index_keys = [k for k in c1 if "index_" in k]
    backbone = [k for k in c1 if "index_" not in k]
    assert index_keys and set(backbone) == set(d0)
    for k in backbone:  # frozen through the phase: bit-identical to the dense checkpoint
        assert torch.equal(c2[k], d0[k]), k
    assert any(not torch.equal(c1[k], c2[k]) for k in index_keys)  # the indexer trains
    assert any(not torch.equal(c3[k], c2[k]) for k in backbone)  # step 3: the backbone trains again

    # a conversion stage with the backbone out of the optimizer altogether (requires_grad=False)
    frozen = tmp_path / "frozen"
    r = server.run(frozen, small + ["train.steps=2", "attention.warmup.steps=2", "attention.indexer_only.steps=2",
                                    "attention.indexer_only.freeze_backbone=true", "checkpoint.interval=1",
                                    f"checkpoint.init_from={tmp_path / 'dense' / 'checkpoints'}"], world=1)
    _check(r)
    f1, f2 = (_ckpt_tensors(frozen / "checkpoints" / f"step_0000000{i}") for i in (1, 2))
    assert all(torch.equal(f2[k], d0[k]) for k in backbone)
    assert any(not torch.equal(f2[k], f1[k]) for k in index_keys)
    optim = [k for k in _optimizer_keys(frozen / "checkpoints" / "step_00000002") if "exp_avg" in k]
    assert optim and all("index_" in k for k in optim)  # only the index branch has optimizer state

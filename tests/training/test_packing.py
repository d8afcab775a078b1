"""data.packing (docs/training.md "Documents and packing"): the option's values, the micro-batch
-> PackedSeqParams conversion, a 2-step training run with packing=eod, and the packed LM loss
at step 0 equal to the loss of the same documents run one by one with the same weights (the
trainer's own forward step, modes dense / msa_warmup / msa at full budget)."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from msa_megatron.training.config import ConfigError, validate
from msa_megatron.training.data import document_boundaries, packed_micro_batch, packing_format
from tests.dist_harness import run_distributed

from .conftest import QUIET
from .test_config import cfg_of

REPO = Path(__file__).resolve().parents[2]


def _short_docs(tmp_path: Path, n: int = 400, seed: int = 0) -> str:
    """An indexed byte-level dataset of short documents (3-120 bytes): many EODs per sequence."""
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_data

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "msa", "block", "token", "sparse", "dense"]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))}) for _ in range(n)]
    (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
    prepare_data.build([str(tmp_path / "short.jsonl")], str(tmp_path / "short"))
    return str(tmp_path / "short")


def _data(prefix: str):
    return ["data=indexed", f"data.blend=[{{path: {prefix}, weight: 1.0}}]", "data.packing=eod"]


# ----------------------------------------------------------------------------- config and conversion
def test_packing_values():
    assert cfg_of().data.packing == "none"
    assert cfg_of("data.packing=eod").data.packing == "eod"
    with pytest.raises(ConfigError, match=r"^data\.packing='?bogus'? is invalid: allowed values are one of none, eod"):
        cfg_of("data.packing=bogus")
    with pytest.raises(ConfigError, match=r"data\.packing.*none with model\.use_te=true and parallel\.cp > 1"):
        validate(cfg_of("data.packing=eod", "model.use_te=true", "parallel.cp=2"), 2)
    with pytest.raises(ConfigError, match=r"data\.packing.*data\.assoc_recall\.train_fraction"):
        validate(cfg_of("data.packing=eod", "data.assoc_recall.train_fraction=0.5"), 1)


def test_micro_batch_to_packed_seq_params():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 starts mid-document
    assert document_boundaries(pos).tolist() == [0, 3, 5, 6, 8, 12]
    batch = {"tokens": torch.arange(12).view(2, 6), "position_ids": pos, "labels": torch.zeros(2, 6),
             "loss_mask": torch.ones(2, 6)}
    flat, p = packed_micro_batch(dict(batch), "thd")
    assert p.qkv_format == "thd" and flat["tokens"].shape == (1, 12) and flat["tokens"][0, 7] == 7
    assert p.cu_seqlens_q.dtype == torch.int32 and p.max_seqlen_q == 4 and p.cu_seqlens_kv is p.cu_seqlens_q
    rows, p = packed_micro_batch(dict(batch), "sbhd")
    assert p.qkv_format == "sbhd" and rows["tokens"].shape == (2, 6) and p.max_seqlen_q == 6
    assert packing_format(cfg_of()) == "thd"
    assert packing_format(cfg_of("parallel=pp2")) == "sbhd"  # 4 sequences per micro-batch between stages
    assert packing_format(cfg_of("parallel=pp2", "train.micro_batch_size=1")) == "thd"
    assert packing_format(cfg_of("parallel.cp=2")) == "sbhd"


@pytest.mark.parametrize("source", ["corpus", "indexed"])
def test_samples_restart_positions_after_eod(cache_dir, tmp_path, source):
    """Both sources go through GPTDataset(reset_position_ids=True) with packing=eod: position ids
    restart after every EOD, so the boundaries reach PackedSeqParams; packing=none keeps 0..s-1."""
    from msa_megatron.training.data import build_datasets, resolve_sources

    data = [] if source == "corpus" else _data(_short_docs(tmp_path))[:2]
    for packing in ("eod", "none"):
        cfg = cfg_of(*data, f"data.packing={packing}", f"run_dir={tmp_path / packing}", "train.steps=1",
                     "train.seq_length=256", "train.global_batch_size=8")
        sources = resolve_sources(cfg)
        train, _ = build_datasets(cfg, sources, 2048, 8)  # 512K tokens: stdlib files reach 200K tokens
        eods = resets = 0
        for i in range(len(train)):
            x = train[i]
            tokens, pos = x["tokens"], x["position_ids"]
            at = (tokens[:-1] == sources.eod_id).nonzero().flatten()
            eods += at.numel()
            resets += int((pos[1:] == 0).sum())
            if packing == "eod":
                assert (pos[at + 1] == 0).all() and int((pos[1:] == 0).sum()) == at.numel()
            else:
                assert (pos == torch.arange(pos.numel())).all()
        assert eods > 0 and resets == (eods if packing == "eod" else 0), (source, packing, eods, resets)


# ----------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_packing_eod_trains_under_context_parallelism(server, tmp_path):
    """2 steps (warmup, then msa) at CP = 2: the sbhd form through the trainer's CP split (the
    THD form runs in the step-0 test below)."""
    prefix = _short_docs(tmp_path)
    r = server.run(tmp_path / "run", QUIET + _data(prefix) + ["train.steps=2", "attention.warmup.steps=1",
                                                              "parallel.cp=2"], world=2)
    assert r.ok(), f"codes {r.codes}\n{r.logs[-6000:]}"
    steps = r.steps()
    assert sorted(steps) == [1, 2] and steps[2]["attention_mode"] == "msa"
    assert all(math.isfinite(steps[s]["lm_loss"]) for s in (1, 2)), steps
    assert "data.packing=eod: a document mask at every EOD in every layer (PackedSeqParams qkv_format=sbhd)" in r.logs




def step0_worker(rank: int, overrides, cache_dir: str):
    """The trainer's first micro-batch through its own forward step (packed) vs each document
    of it alone through the same model: summed masked LM losses per mode."""
    os.environ["MSA_CACHE_DIR"] = cache_dir
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    from msa_megatron.megatron import set_attention_mode
    from msa_megatron.training.loop import Trainer
    from tests.training.test_config import cfg_of

    trainer = Trainer(cfg_of(*overrides))
    trainer.setup()
    model = trainer.model[0]
    sample = next(trainer.train_iter)
    out = {"docs": 0}
    with torch.no_grad():
        for mode in ("dense", "msa_warmup", "msa"):
            set_attention_mode(model, mode)
            output, loss_func = trainer._forward_step(iter([sample]), model)
            packed = float(loss_func(output)[0])
            plain = float(loss_func(model(sample["tokens"], sample["position_ids"], None,
                                          labels=sample["labels"]))[0])  # no document mask
            separate, docs = 0.0, 0
            pos = sample["position_ids"]
            cu = document_boundaries(pos).tolist()
            s = pos.shape[1]
            for a, b in zip(cu[:-1], cu[1:]):
                r, a, b = a // s, a % s, (b - 1) % s + 1
                n = b - a
                loss = model(sample["tokens"][r:r + 1, a:b], torch.arange(n)[None], None,
                             labels=sample["labels"][r:r + 1, a:b])
                separate += float((loss.float() * sample["loss_mask"][r:r + 1, a:b]).sum())
                docs += 1
            out[mode] = (packed, separate, plain)
            out["docs"] = docs
    return out


@pytest.mark.slow
def test_packed_loss_equals_per_document_loss_at_step_0(cache_dir, tmp_path):
    prefix = _short_docs(tmp_path)
    overrides = _data(prefix) + QUIET + [f"run_dir={tmp_path / 'run'}", "train.steps=1", "attention.msa.topk=16",
                                         "train.global_batch_size=2", "train.micro_batch_size=2"]
    (res,) = run_distributed(step0_worker, 1, overrides, str(cache_dir), timeout=300)
    assert res["docs"] >= 6, res  # short documents: several boundaries per row
    for mode in ("dense", "msa_warmup", "msa"):  # msa at full budget (16 x 16 >= 256 tokens)
        packed, separate, plain = res[mode]
        assert abs(packed - separate) <= 1e-5 * abs(separate), (mode, packed, separate)
        assert abs(plain - separate) > 1e-3 * abs(separate), (mode, "the document mask changed nothing")

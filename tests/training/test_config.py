"""Configuration: every shipped combination composes and validates; every bad value is
one ConfigError naming the field and the allowed values; the MSA schedule is right.
In-process and fast (no Megatron-Core import except where noted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from msa_megatron.training.config import ConfigError, kl_coeff_at, load_config, validate
from msa_megatron.training.hooks import MSASchedule

REPO = Path(__file__).resolve().parents[2]


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        composed = compose("config", overrides=list(overrides))
    values = OmegaConf.to_container(composed, resolve=True)
    values.pop("hydra", None)
    return load_config(values)


@pytest.mark.parametrize("overrides, world", [
    ((), 1),
    (("attention=dense",), 1),
    (("parallel=tp2",), 2),
    (("parallel=pp2",), 2),
    (("model=tiny_moe", "parallel=ep2"), 2),
    (("model=tiny_moe", "parallel=tp2", "parallel.sp=true"), 2),
    (("model=small_moe", "train=gpu"), 1),
    (("+experiment=minimax_109b", "data=corpus"), 256),
])
def test_shipped_configs_validate(overrides, world):
    cfg = validate(cfg_of(*overrides), world)
    if cfg.attention.type == "msa":
        assert cfg.msa.block_size == cfg.model.msa_block_size


def test_minimax_109b_shape_and_msa_layers():
    cfg = cfg_of("model=minimax_109b", "train=gpu")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels) == (41, 3072, 64, 4, 128)
    assert m.rotary_percent * m.kv_channels == 64
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_first_dense_layers) == (128, 4, 3)
    assert m.moe_shared_expert_intermediate_size is not None
    msa = cfg.msa
    assert [msa.is_msa_layer(i) for i in range(41)] == [False] * 3 + [True] * 38
    assert (msa.block_size, msa.topk, msa.index_dim) == (128, 16, 128)


def test_tiny_msa_is_sparse_at_its_length():
    cfg = cfg_of()
    assert cfg.msa.budget_tokens * 2 <= cfg.train.seq_length  # at most half the keys


@pytest.mark.parametrize("overrides, world, field, allowed", [
    (("train.global_batch_size=10",), 2, "train.global_batch_size", "multiples of micro_batch_size"),
    (("parallel.tp=3",), 2, "parallel", "dividing the 2 processes"),
    (("parallel.tp=2", "model.num_attention_heads=6", "model.num_query_groups=3"), 2, "model.num_query_groups", "multiples of parallel.tp=2"),
    (("parallel.tp=2", "model.num_attention_heads=3", "model.num_query_groups=1"), 2, "model.num_attention_heads", "multiples of parallel.tp=2"),
    (("model.num_query_groups=3",), 1, "model.num_query_groups", "divisors of model.num_attention_heads"),
    (("parallel=ep2",), 2, "parallel.ep", "model without experts"),
    (("model=tiny_moe", "parallel=tp2", "parallel.sp=false"), 2, "parallel.sp", "true for an MoE model"),
    (("attention.msa.topk=0",), 1, "attention.msa.topk", "integer >= 1"),
    (("attention.msa.block_size=30",), 1, "attention.msa.block_size", "multiple of 16"),
    (("attention.msa.msa_layers=[0,9]",), 1, "attention.msa.msa_layers", "layer indices in [0, 3]"),
    (("train.precision=fp8",), 1, "train.precision", "fp32, bf16, fp16"),
    (("train.tokens=1000",), 1, "train.steps", "exactly one"),
    (("train.lr_warmup_fraction=null", "train.lr_warmup_steps=500"), 1, "train.lr_warmup_steps", "< the LR decay steps"),
    (("train.min_lr=1.0",), 1, "train.min_lr", "<= train.lr"),
    (("data=indexed", "data.blend=[{path:/nonexistent/ds,weight:1.0}]"), 1, "data.blend[0].path", "existing Megatron indexed datasets"),
    (("data=indexed",), 1, "data.blend", "non-empty list"),
    (("data.split='90,10'",), 1, "data.split", "three comma-separated"),
    (("attention=dense", "attention.warmup.steps=5"), 1, "attention.warmup.steps", "attention.type=dense"),
    (("attention.indexer_only.steps=10", "attention.indexer_only.freeze_backbone=true"), 1,
     "attention.indexer_only.freeze_backbone", "covers the whole run"),
    (("attention.kl_schedule=[[10,1.0],[5,0.5]]",), 1, "attention.kl_schedule[1]", "strictly increasing"),
    (("logging.wandb.mode=cloud",), 1, "logging.wandb.mode", "offline, online, disabled"),
    (("checkpoint.resume=maybe",), 1, "checkpoint.resume", "auto, never"),
    (("model.make_vocab_size_divisible_by=3", "parallel=tp2"), 2, "model.make_vocab_size_divisible_by", "multiples of parallel.tp"),
    (("checkpoint.load=/nonexistent/ckpt",), 1, "checkpoint.load", "existing checkpoint directory"),
    (("train.steps=abc",), 1, "train.steps", "integer"),
])
def test_bad_values_name_the_field(overrides, world, field, allowed):
    with pytest.raises(ConfigError) as info:
        validate(cfg_of(*overrides), world)
    message = str(info.value)
    assert message.startswith(f"{field}=") or info.value.path == field, message
    assert allowed in message, message
    assert "\n" not in message


def test_unknown_key_in_a_yaml_section():
    values = OmegaConf.to_container(compose_raw(), resolve=True)
    values["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"^train\.stepz=3 is invalid: allowed values are an existing field of train"):
        load_config(values)


def compose_raw():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config")


def test_msa_schedule_warmup_switch_kl_and_indexer_only():
    cfg = cfg_of("attention.warmup.steps=5", "attention.msa.recall_interval=4",
                 "attention.kl_schedule=[[0,1.0],[10,0.0]]", "attention.indexer_only.steps=3",
                 "attention.indexer_only.backbone_lr_scale=0.1")
    s = MSASchedule(cfg)
    plans = {step: s.plan(step) for step in range(1, 13)}
    assert [plans[i].attention_mode for i in (1, 5, 6, 12)] == ["msa_warmup", "msa_warmup", "msa", "msa"]
    assert [i for i in plans if plans[i].selection_recall] == [1, 4, 8, 12]
    assert plans[5].kl_coeff == pytest.approx(0.5) and plans[12].kl_coeff == 0.0
    assert [plans[i].backbone_lr_scale for i in (1, 3, 4)] == [0.1, 0.1, 1.0]
    assert plans[3].indexer_only and not plans[4].indexer_only


def test_warmup_in_tokens_rounds_up_to_steps():
    cfg = cfg_of("attention.warmup.steps=null", "attention.warmup.tokens=5000")  # 2048 tokens/step
    s = MSASchedule(cfg)
    assert s.warmup_steps == 3
    assert s.plan(3).attention_mode == "msa_warmup" and s.plan(4).attention_mode == "msa"


def test_length_in_tokens():
    cfg = validate(cfg_of("train.steps=null", "train.tokens=5000"), 1)  # 2048 tokens per step
    assert cfg.total_steps() == 3 and cfg.lr_decay_steps() == 3


def test_dense_schedule_is_inert():
    s = MSASchedule(cfg_of("attention=dense"))
    assert s.plan(1).attention_mode == "dense" and s.plan(1).kl_coeff is None


def test_kl_coeff_interpolation():
    pts = [[0, 1.0], [10, 0.0], [20, 0.5]]
    assert [kl_coeff_at(pts, s) for s in (0, 5, 10, 15, 30)] == [1.0, 0.5, 0.0, 0.25, 0.5]


# ------------------------------------------------------------------ the CLI (subprocesses)
def _cli(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), WORLD_SIZE="2", RANK="0")
    return subprocess.run([sys.executable, "-m", "msa_megatron.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_value_is_one_line_exit_2_from_any_cwd(tmp_path):
    r = _cli(tmp_path, "parallel.tp=3", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["msa-train: error: parallel='tp=3 pp=1 cp=1' is invalid: allowed values are layouts with "
                     "tp*pp*cp dividing the 2 processes (tp*pp*cp=3)"], r.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_cli_unknown_key_names_it(tmp_path):
    r = _cli(tmp_path, "train.stepz=3")
    assert r.returncode != 0
    assert "train.stepz" in r.stderr
    assert not (tmp_path / "outputs").exists()

"""Shared pieces of the Megatron-LM integration tests: command lines and YAML files parsed by
Megatron-LM's own argument code (megatron.training.arguments / yaml_arguments), patched by
msa_megatron.megatron_lm.install()."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]

#: A small GQA model (8 heads, 2 KV groups) with the flags a TE/apex-free run needs.
BASE_ARGV: List[str] = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8", "--group-query-attention",
    "--num-query-groups", "2", "--seq-length", "512", "--max-position-embeddings", "512", "--micro-batch-size", "1",
    "--train-iters", "10", "--lr", "1e-4", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--no-rope-fusion", "--no-masked-softmax-fusion", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--mock-data",
]
MSA_ARGV: List[str] = ["--experimental-attention-variant", "msa", "--attention-dropout", "0.0"]


def install() -> None:
    import msa_megatron.megatron_lm as msa_lm

    msa_lm.install()


def parse(argv: List[str], monkeypatch, world_size: int = 1):
    """Megatron-LM's parse_args + validate_args on ``argv`` (what parse_and_validate_args does,
    without setting its global variables)."""
    install()
    from megatron.training.arguments import parse_args, validate_args

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_msa.py", *argv])
    return validate_args(parse_args(), {})


def megatron_parser() -> argparse.ArgumentParser:
    install()
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value):
        return list(value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else None


def yaml_config(msa=None, variant="msa", top=None, lm=None) -> dict:
    """A complete Megatron-LM YAML argument file as a dict: every TransformerConfig field under
    ``language_model`` / ``model_parallel`` (ModelParallelConfig's), every other argument at the
    top level (their argparse defaults: the YAML path ignores the command line)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer import TransformerConfig

    mp_fields = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    tc_fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    language_model, model_parallel, top_level = {}, {}, {}
    for f in dataclasses.fields(TransformerConfig):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        (model_parallel if f.name in mp_fields else language_model)[f.name] = _plain(default)
    for action in megatron_parser()._actions:
        if action.dest != "help" and action.dest not in tc_fields and not action.dest.startswith("msa_"):
            top_level[action.dest] = _plain(action.default)
    language_model.update(num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                          attention_dropout=0.0, activation_func="swiglu", experimental_attention_variant=variant,
                          transformer_impl="local", bias_swiglu_fusion=False)
    if msa is not None:
        language_model["msa"] = msa
    language_model.update(lm or {})
    for key in language_model:  # core_transformer_config_from_yaml reads some argparse keys here
        top_level.pop(key, None)
    # validate_yaml reads account_for_embedding_in_pipeline_split at the top level (see test_mlm_yaml.py).
    top_level["account_for_embedding_in_pipeline_split"] = language_model.pop("account_for_embedding_in_pipeline_split")
    top_level.update(micro_batch_size=1, seq_length=512, max_position_embeddings=512, train_iters=10, lr=1e-4,
                     min_lr=0.0, tokenizer_type="NullTokenizer", vocab_size=1000)
    top_level.update(top or {})
    return dict(top_level, language_model=language_model, model_parallel=model_parallel)


def parse_yaml(config: dict, tmp_path: Path, monkeypatch):
    """Megatron-LM's parse_args + validate_yaml on a YAML file holding ``config``."""
    import yaml

    install()
    from megatron.training import yaml_arguments
    from megatron.training.arguments import parse_args

    path = tmp_path / "gpt_msa.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_msa.py", "--yaml-cfg", str(path)])
    return yaml_arguments.validate_yaml(parse_args(), {})

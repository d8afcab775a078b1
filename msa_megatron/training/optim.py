"""Megatron-Core distributed optimizer and OptimizerParamScheduler from the config.

The indexer-only phase (dense->MSA conversion) is expressed with Megatron's own param
groups: every non-index parameter gets an override carrying ``msa_backbone=True``, and
:mod:`hooks` rescales those groups' max/min LR per step (0 = frozen)."""

from __future__ import annotations

from typing import List

import torch

from .config import Config
from .model import PRECISION_DTYPES, is_index_param

#: Param-group key marking the backbone (non-index) groups.
BACKBONE_KEY = "msa_backbone"


def optimizer_config(cfg: Config):
    from megatron.core.optimizer import OptimizerConfig

    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=PRECISION_DTYPES[t.precision],
        use_distributed_optimizer=True,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        initial_loss_scale=2.0 ** 16,
        log_num_zeros_in_grad=False,
    )


def needs_backbone_groups(cfg: Config) -> bool:
    io = cfg.attention.indexer_only
    return bool(cfg.steps_from(io.steps, io.tokens)) and not io.freeze_backbone


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module]):
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    ocfg = optimizer_config(cfg)
    overrides = get_standard_config_overrides(ocfg)
    if needs_backbone_groups(cfg):
        backbone = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="msa_backbone", fn=lambda param, name: not is_index_param(name)))
        overrides[backbone] = {BACKBONE_KEY: True}
    return get_megatron_optimizer(ocfg, model_chunks, config_overrides=overrides)


def build_scheduler(cfg: Config, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    total = cfg.total_steps()
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps(),
        lr_decay_steps=cfg.lr_decay_steps(),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=t.lr_wsd_decay_steps,
        lr_wsd_decay_style=t.lr_wsd_decay_style,
    )


def param_groups(optimizer) -> List[dict]:
    """Every param group of a (possibly chained) Megatron optimizer."""
    return list(optimizer.param_groups)


def current_lr(optimizer) -> float:
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(param_groups(optimizer))
    return float(lr) if lr is not None else float("nan")


__all__ = ["BACKBONE_KEY", "build_optimizer", "build_scheduler", "current_lr", "needs_backbone_groups",
           "optimizer_config", "param_groups"]

"""The MSA training schedule, applied before every step from the config alone.

* Full-attention warmup: steps 1..W run ``msa_warmup`` (dense main branch, index branch
  distilled from the dense teacher over all causal tokens); from step W+1 on,
  ``attention.msa.mode`` (normally ``msa``: sparse). W comes from warmup.steps or
  warmup.tokens (rounded up to whole steps).
* KL coefficient: msa.kl_coeff, or the piecewise-linear attention.kl_schedule.
* Selection recall: sampled at step 1 and every msa.recall_interval steps (a dense pass).
* Indexer-only phase (dense->MSA conversion): steps 1..I scale the backbone param groups'
  LR by indexer_only.backbone_lr_scale (0: frozen); freeze_backbone instead removes the
  backbone from the optimizer for the whole run (model.freeze_backbone).

Everything is a pure function of the step, so a resumed run re-derives the same state.
"""

from __future__ import annotations

from typing import List, Optional

from ..schedule import Schedule, StepPlan
from .config import Config
from .optim import BACKBONE_KEY, param_groups


class MSASchedule:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        a = cfg.attention
        self.msa = cfg.msa
        self.warmup_steps = cfg.steps_from(a.warmup.steps, a.warmup.tokens) if self.msa else 0
        self.indexer_only_steps = cfg.steps_from(a.indexer_only.steps, a.indexer_only.tokens) if self.msa else 0
        self.final_mode = self.msa.mode if self.msa else "dense"
        self._applied: Optional[StepPlan] = None
        self.tokens_per_step = cfg.tokens_per_step()
        # The one schedule rule shared with the Megatron-LM loop (msa_megatron/schedule.py).
        self.schedule = Schedule(self.msa, warmup_steps=a.warmup.steps, warmup_tokens=a.warmup.tokens,
                                 indexer_only_steps=a.indexer_only.steps, indexer_only_tokens=a.indexer_only.tokens,
                                 backbone_lr_scale=a.indexer_only.backbone_lr_scale,
                                 kl_schedule=a.kl_schedule or None) if self.msa else None

    def plan(self, step: int) -> StepPlan:
        if self.msa is None:  # dense or swa: the attention type is the mode, the whole run
            return StepPlan(self.cfg.attention.type, False, None, False, 1.0)
        return self.schedule.plan(step, (step - 1) * self.tokens_per_step)

    def apply(self, step: int, model_chunks: List, optimizer, scheduler) -> StepPlan:
        """Push this step's plan into the model and the optimizer (only what changed)."""
        plan = self.plan(step)
        prev = self._applied
        if self.msa is not None:
            from ..megatron import set_attention_mode, set_kl_coeff, set_selection_recall_sampling

            if prev is None or prev.attention_mode != plan.attention_mode:
                set_attention_mode(model_chunks, plan.attention_mode)
            if prev is None or prev.selection_recall != plan.selection_recall:
                set_selection_recall_sampling(model_chunks, plan.selection_recall)
            if self.cfg.attention.kl_schedule and (prev is None or prev.kl_coeff != plan.kl_coeff):
                set_kl_coeff(model_chunks, plan.kl_coeff)
        if prev is None or prev.backbone_lr_scale != plan.backbone_lr_scale:
            self._scale_backbone_lr(optimizer, scheduler, plan.backbone_lr_scale)
        self._applied = plan
        return plan

    def _scale_backbone_lr(self, optimizer, scheduler, scale: float) -> None:
        t = self.cfg.train
        touched = False
        for group in param_groups(optimizer):
            if group.get(BACKBONE_KEY):
                group["max_lr"] = t.lr * scale
                group["min_lr"] = t.min_lr * scale
                touched = True
        if touched:
            scheduler.step(0)  # recompute every group's lr for the current step


__all__ = ["MSASchedule", "StepPlan"]

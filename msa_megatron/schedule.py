"""The MSA training schedule of both loops (msa-train and the Megatron-LM loop), one pure function.

``Schedule(...).plan(step, consumed_tokens) -> StepPlan`` says what one training step does; the
loops only apply it (attention mode, recall sampling, KL coefficient, backbone LR scale). It
reads nothing but its arguments, so a resumed run re-derives the same plan from the restored
step and token counters.

The rules (one set for both loops):

* ``step`` is 1-based (the step about to run; Megatron-LM logs iterations 1-based too) and
  ``consumed_tokens`` the tokens consumed *before* it (Megatron-LM: consumed samples x
  sequence length, so batch-size ramp-up is counted right; msa-train: (step - 1) x tokens per
  step).
* Full-attention warmup: a step runs ``msa_warmup`` (dense main branch, index branch distilled
  from the dense teacher over all causal tokens) while ``step <= warmup_steps``, or, when
  the warmup is given in tokens only, while ``consumed_tokens < warmup_tokens`` (steps win
  when both are given, as msa-train's ``Config.steps_from``); afterwards
  ``msa.mode`` (normally ``msa``: sparse). With a constant batch the token rule is
  ``ceil(warmup_tokens / tokens_per_step)`` steps, which is what msa-train computed before.
* Selection recall (an extra dense pass per MSA layer, measured against the dense top-k) is
  sampled at step 1 (the start value of the curve, before any training) and on every step
  that is a multiple of ``msa.recall_interval`` (0: never), never in ``dense`` mode. (The
  Megatron-LM loop skipped step 1 until this module; msa-train sampled it.)
* KL coefficient: the piecewise-linear ``kl_schedule`` [[step, coeff], ...] at the step,
  constant outside its points; without one, ``msa.kl_coeff``.
* Indexer-only phase (dense -> MSA conversion): steps in it (same step/token rule as the
  warmup) scale the backbone's learning rate by ``backbone_lr_scale`` (0: frozen).
* Without MSA (``msa=None``) every step is dense, nothing is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .config import ConfigError, MSAConfig


@dataclass(frozen=True)
class StepPlan:
    """What the schedule wants for one step."""

    attention_mode: str
    selection_recall: bool  # sample selection recall (an extra dense pass per MSA layer) this step
    kl_coeff: Optional[float] = None
    indexer_only: bool = False
    backbone_lr_scale: float = 1.0

    @property
    def mode(self) -> str:
        """Alias of ``attention_mode`` (the Megatron-LM hooks' name)."""
        return self.attention_mode


def kl_coeff_at(points: Sequence[Sequence[float]], step: int) -> float:
    """Piecewise-linear interpolation of [[step, coeff], ...]; constant outside the points."""
    if step <= points[0][0]:
        return float(points[0][1])
    for (s0, c0), (s1, c1) in zip(points, points[1:]):
        if step <= s1:
            return float(c0 + (c1 - c0) * (step - s0) / (s1 - s0))
    return float(points[-1][1])


def _in_phase(step: int, consumed_tokens: int, steps: Optional[int], tokens: Optional[int]) -> bool:
    if steps is not None:
        return step <= steps
    if tokens is not None:
        return consumed_tokens < tokens
    return False


def _check_phase(name: str, steps: Optional[int], tokens: Optional[int]) -> None:
    for suffix, value in (("steps", steps), ("tokens", tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{name}.{suffix}", value, "an integer >= 0, or null")


@dataclass(frozen=True)
class Schedule:
    """The schedule's settings; :meth:`plan` is the pure rule (module docstring)."""

    msa: Optional[MSAConfig]
    warmup_steps: Optional[int] = None
    warmup_tokens: Optional[int] = None
    indexer_only_steps: Optional[int] = None
    indexer_only_tokens: Optional[int] = None
    backbone_lr_scale: float = 1.0
    kl_schedule: Optional[Tuple[Tuple[int, float], ...]] = None

    def __post_init__(self) -> None:
        if self.msa is not None and not isinstance(self.msa, MSAConfig):
            raise ConfigError("msa", self.msa, "an MSAConfig or null")
        _check_phase("warmup", self.warmup_steps, self.warmup_tokens)
        _check_phase("indexer_only", self.indexer_only_steps, self.indexer_only_tokens)
        if self.kl_schedule is not None:
            object.__setattr__(self, "kl_schedule", tuple((p[0], p[1]) for p in self.kl_schedule))
            if not self.kl_schedule:
                raise ConfigError("kl_schedule", [], "a non-empty list of [step, coeff] pairs, or null")

    def plan(self, step: int, consumed_tokens: int = 0) -> StepPlan:
        """The plan of 1-based ``step``, ``consumed_tokens`` having been consumed before it."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError("step", step, "an integer >= 1 (steps are 1-based)")
        if self.msa is None:
            return StepPlan("dense", False, None, False, 1.0)
        warm = _in_phase(step, consumed_tokens, self.warmup_steps, self.warmup_tokens)
        mode = "msa_warmup" if warm else self.msa.mode
        interval = self.msa.recall_interval
        recall = interval > 0 and (step == 1 or step % interval == 0) and mode != "dense"
        kl = kl_coeff_at(self.kl_schedule, step) if self.kl_schedule else self.msa.kl_coeff
        indexer_only = _in_phase(step, consumed_tokens, self.indexer_only_steps, self.indexer_only_tokens)
        return StepPlan(mode, recall, kl, indexer_only, self.backbone_lr_scale if indexer_only else 1.0)


def plan(schedule: Schedule, step: int, consumed_tokens: int = 0) -> StepPlan:
    """Function form of :meth:`Schedule.plan`."""
    return schedule.plan(step, consumed_tokens)


__all__ = ["Schedule", "StepPlan", "kl_coeff_at", "plan"]

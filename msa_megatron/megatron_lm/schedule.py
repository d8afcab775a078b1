"""What MSA layers do on each Megatron-LM training iteration: attention mode and recall sampling.

* Full-attention warmup: iterations 1..W run ``msa_warmup`` (dense main branch, index branch
  distilled from the dense teacher over all causal tokens); from W+1 on, ``msa.mode``
  (normally ``msa``: sparse). W is ``--msa-warmup-iters``, or the iterations until
  ``--msa-warmup-tokens`` tokens were consumed (consumed samples x sequence length, so batch
  size ramp-up is counted right).
* Selection recall (an extra dense pass per MSA layer) on iterations that are multiples of
  ``msa.recall_interval`` (0: never), not in ``dense`` mode.

Iterations are 1-based, as Megatron-LM logs them. The plan is a pure function of the loop's
counters (iteration, consumed samples), both restored from checkpoints, so a resumed run
re-derives the same schedule. Same semantics as the hydra trainer's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from ..config import MSAConfig


@dataclass(frozen=True)
class StepPlan:
    """The MSA settings of one iteration."""

    mode: str
    recall: bool


class MSASchedule:
    def __init__(self, msa: Union[MSAConfig, Mapping[str, Any]], warmup_iters: Optional[int] = None,
                 warmup_tokens: Optional[int] = None, seq_length: Optional[int] = None):
        self.msa = msa if isinstance(msa, MSAConfig) else MSAConfig.from_dict(msa)
        if warmup_iters is not None and warmup_tokens is not None:
            raise ValueError("give warmup_iters or warmup_tokens, not both")
        if warmup_tokens is not None and not seq_length:
            raise ValueError("warmup_tokens needs seq_length (tokens per sample)")
        self.warmup_iters = warmup_iters
        self.warmup_tokens = warmup_tokens
        self.seq_length = seq_length

    @classmethod
    def from_args(cls, args) -> Optional["MSASchedule"]:
        """The schedule of a Megatron-LM run (``args.msa`` set by the MSA argument patches), or
        None for a run without MSA."""
        msa = getattr(args, "msa", None)
        if msa is None:
            return None
        return cls(msa, getattr(args, "msa_warmup_iters", None), getattr(args, "msa_warmup_tokens", None),
                   args.seq_length)

    def in_warmup(self, step: int, consumed_samples: int) -> bool:
        if self.warmup_iters is not None:
            return step <= self.warmup_iters
        if self.warmup_tokens is not None:
            return consumed_samples * self.seq_length < self.warmup_tokens
        return False

    def plan(self, iteration: int, consumed_samples: int = 0) -> StepPlan:
        """Plan of the step Megatron-LM runs after ``iteration`` completed iterations (its
        ``train_step(iteration=...)`` argument), having consumed ``consumed_samples`` samples."""
        step = iteration + 1
        mode = "msa_warmup" if self.in_warmup(step, consumed_samples) else self.msa.mode
        interval = self.msa.recall_interval
        recall = interval > 0 and step % interval == 0 and mode != "dense"
        return StepPlan(mode, recall)


__all__ = ["MSASchedule", "StepPlan"]

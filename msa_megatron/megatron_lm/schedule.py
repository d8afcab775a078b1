"""The MSA schedule of a Megatron-LM run: :class:`msa_megatron.schedule.Schedule` fed from
Megatron-LM's arguments and loop counters.

The rules (warmup by iterations or tokens, selection recall at iteration 1 and every
``msa.recall_interval`` iterations, ...) are those of :mod:`msa_megatron.schedule`, shared
with msa-train. This adapter only converts Megatron-LM's counters: ``train_step(iteration=k)``
runs the 1-based step k + 1, and the tokens consumed before it are the loop's consumed samples
x ``--seq-length`` (so batch-size ramp-up is counted right). Both counters are restored from
checkpoints, so a resumed run re-derives the same plan.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from ..config import MSAConfig
from ..schedule import Schedule, StepPlan


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
        self.schedule = Schedule(self.msa, warmup_steps=warmup_iters, warmup_tokens=warmup_tokens)

    @classmethod
    def from_args(cls, args) -> Optional["MSASchedule"]:
        """The schedule of a Megatron-LM run (``args.msa`` set by the MSA argument patches), or
        None for a run without MSA."""
        msa = getattr(args, "msa", None)
        if msa is None:
            return None
        return cls(msa, getattr(args, "msa_warmup_iters", None), getattr(args, "msa_warmup_tokens", None),
                   args.seq_length)

    def consumed_tokens(self, consumed_samples: int) -> int:
        return consumed_samples * self.seq_length if self.seq_length else 0

    def plan(self, iteration: int, consumed_samples: int = 0) -> StepPlan:
        """Plan of the step Megatron-LM runs after ``iteration`` completed iterations (its
        ``train_step(iteration=...)`` argument), having consumed ``consumed_samples`` samples."""
        return self.schedule.plan(iteration + 1, self.consumed_tokens(consumed_samples))


__all__ = ["MSASchedule", "StepPlan"]

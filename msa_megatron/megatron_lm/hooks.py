"""What Megatron-LM's training loop does for MSA, called by ``patches/mcore_019_training_loop.py``.

Before every ``train_step``: apply the iteration's :class:`~.schedule.StepPlan` (attention mode,
selection-recall sampling) to the model chunks, and drop statistics recorded outside training steps
(evaluation forwards).

In every ``training_log`` call (all ranks, as DSA's and MoE's metric tracking): reduce the MSA
statistics of the step over the job (:func:`msa_megatron.megatron.collect_msa_metrics`, a
collective) and
* write them to TensorBoard and wandb as ``msa/<metric>`` and ``msa/<metric>/layer_<i>``
  (``indexer_kl``, ``index_entropy``, ``main_entropy``, ``recall`` = selection recall) plus ``msa/sparse`` (1 in
  sparse mode, 0 in warmup), every iteration, beside ``indexer loss`` and the MoE metrics;
* add the KL and entropies to ``total_loss_dict`` (``msa indexer kl`` ...), so Megatron's
  iteration line prints their mean over the log interval, as it prints DSA's ``indexer loss``;
* return a line with the selection recall on the iterations that sampled it (the interval mean
  of a metric sampled on some iterations only would be wrong in ``total_loss_dict``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .schedule import MSASchedule, StepPlan

#: TensorBoard / wandb prefix of MSA scalars.
WRITER_PREFIX = "msa/"
#: MSA metric -> key in Megatron's total_loss_dict (printed on the iteration line).
CONSOLE_KEYS = {"indexer_kl": "msa indexer kl", "index_entropy": "msa index entropy",
                "main_entropy": "msa main entropy"}


class MSATrainingHooks:
    """Per-run MSA state of a Megatron-LM training loop."""

    def __init__(self, schedule: MSASchedule, printer: Optional[Callable[[str], None]] = None):
        self.schedule = schedule
        self.applied: Optional[StepPlan] = None  # the plan of the step in progress
        #: the index branch's gradient norm of the last step (msa.index_grad_clip=separate), else None
        self.index_grad_norm: Optional[float] = None
        self._print = printer

    def _say(self, message: str) -> None:
        if self._print is None:
            from megatron.training.utils import print_rank_0

            self._print = print_rank_0
        self._print(message)

    # ------------------------------------------------------------------ train_step
    def before_train_step(self, model_chunks: List[torch.nn.Module], iteration: int, consumed_samples: int) -> StepPlan:
        """Apply the plan of the step after ``iteration`` completed iterations (only what changed)."""
        from msa_megatron.megatron import reset_msa_metrics, set_attention_mode, set_selection_recall_sampling

        plan = self.schedule.plan(iteration, consumed_samples)
        prev = self.applied
        if prev is None or prev.mode != plan.mode:
            n = set_attention_mode(model_chunks, plan.mode)
            if prev is None:
                self._say(f" [MSA] iteration {iteration + 1}: attention mode {plan.mode} ({n} MSA layers on rank 0)")
            else:
                self._say(f" [MSA] iteration {iteration + 1}: attention mode {prev.mode} -> {plan.mode}")
        if prev is None or prev.selection_recall != plan.selection_recall:
            set_selection_recall_sampling(model_chunks, plan.selection_recall)
        reset_msa_metrics()  # evaluation forwards since the last step recorded too: not this step's
        self.applied = plan
        return plan

    def after_train_step(self, optimizer) -> None:
        """Keep the index branch's gradient norm of the step: with msa.index_grad_clip=separate the
        norm Megatron logs (grad-norm) is the backbone's alone, the index branch's is its group's."""
        from msa_megatron.patches.mcore_019_index_grad_norm_group import INDEX_GRAD_NORM_GROUP

        value = (getattr(optimizer, "grad_norms_by_group", None) or {}).get(INDEX_GRAD_NORM_GROUP)
        self.index_grad_norm = None if value is None else float(value)

    # ------------------------------------------------------------------ training_log
    def collect(self) -> Dict[str, float]:
        """This step's MSA metrics reduced over the job (collective: every rank calls it)."""
        from msa_megatron.megatron import collect_msa_metrics

        return collect_msa_metrics(reset=True)

    def log(self, metrics: Dict[str, float], iteration: int, writer, wandb_writer, total_loss_dict: dict,
            loss_dict: dict, skipped_iter: int) -> Optional[str]:
        """Write one step's metrics the way ``training_log`` writes its own; returns the
        selection-recall line for the console (None when selection recall was not sampled)."""
        if not metrics:
            return None
        if self.index_grad_norm is not None:
            metrics = dict(metrics, index_grad_norm=self.index_grad_norm)
        scalars = {WRITER_PREFIX + key: value for key, value in metrics.items()}
        if self.applied is not None:
            scalars[WRITER_PREFIX + "sparse"] = 1.0 if self.applied.mode == "msa" else 0.0
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)
        if not skipped_iter:
            add_to_total_loss_dict(metrics, total_loss_dict, loss_dict)
        if "recall" not in metrics:
            return None
        layers = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items() if k.startswith("recall/layer_"))
        per_layer = " ".join(f"{i}:{v:.3f}" for i, v in layers)
        return f" [MSA] iteration {iteration:8d} | selection recall: {metrics['recall']:.4f} | per layer: {per_layer} |"


def add_to_total_loss_dict(metrics: Dict[str, float], total_loss_dict: dict, loss_dict: dict) -> None:
    """Accumulate the per-step MSA means like training_log accumulates losses (it divides by the
    advanced iterations of the interval when printing, then resets them)."""
    present = [key for key in CONSOLE_KEYS if key in metrics]
    if not present:
        return
    device = next((v.device for v in loss_dict.values() if torch.is_tensor(v)), None)
    if device is None:  # as training_log's own accumulators ('cuda': the current device)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # training_log inserts this step's losses after us; insert them first (as it would: 0 + loss)
    # so the iteration line keeps Megatron's order (lm loss first, then the auxiliary metrics).
    for key, value in loss_dict.items():
        if key not in total_loss_dict and torch.is_tensor(value):
            total_loss_dict[key] = torch.zeros_like(value)
    for key in present:
        name = CONSOLE_KEYS[key]
        value = torch.tensor([metrics[key]], dtype=torch.float, device=device)
        total_loss_dict[name] = total_loss_dict[name] + value if name in total_loss_dict else value


# ----------------------------------------------------------------------------- per-run instance
_hooks: Optional[MSATrainingHooks] = None
_hooks_args = None


def hooks_for(args) -> Optional[MSATrainingHooks]:
    """The hooks of the run described by ``args`` (Megatron's global args), created on first use;
    None when the run has no MSA."""
    global _hooks, _hooks_args
    if _hooks_args is not args:
        schedule = MSASchedule.from_args(args)
        _hooks = MSATrainingHooks(schedule) if schedule is not None else None
        _hooks_args = args
    return _hooks


def reset_hooks() -> None:
    """Forget the per-run state (tests; a second run in one process)."""
    global _hooks, _hooks_args
    _hooks, _hooks_args = None, None


__all__ = ["CONSOLE_KEYS", "MSATrainingHooks", "WRITER_PREFIX", "add_to_total_loss_dict", "hooks_for", "reset_hooks"]

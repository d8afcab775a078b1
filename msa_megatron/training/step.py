"""One language-model micro-batch: the forward step and loss of every training loop here.

Used by msa-train (:mod:`.loop`), Megatron-LM's ``pretrain`` (``scripts/pretrain_gpt_msa.py``)
and the multi-GPU validator (``scripts/multigpu_validate.py``), so that the three agree on what
a step optimises and logs.

The contract with Megatron-Core's ``forward_backward_func`` (``pipeline_parallel/schedules.py``):
``forward_step_func(data_iterator, model) -> (output, loss_func)`` and
``loss_func(output) -> (loss, num_tokens, report)`` with

* ``loss``: the *sum* of the per-token losses over this rank's unmasked tokens of the micro-batch;
* ``num_tokens``: how many tokens that is (int tensor);
* ``report``: ``{key: tensor([loss sum, token count])}`` (float), what the loop logs.

The normalisation is the schedule's, chosen by ``TransformerConfig.calculate_per_token_loss``,
not by this function: off (msa-train, the validator, Megatron-LM's default) the schedule
divides each micro-batch's sum by its token count and by the number of micro-batches (a mean of
per-micro-batch token means); on, it keeps sums and ``finalize_model_grads`` divides the
gradients by the step's total token count. Either way the *logged* loss is the token-weighted
mean over the global batch: :func:`global_mean_loss` here, Megatron-LM's own reduction of the
same ``[sum, count]`` pairs in its loop.

MSA adds no term here: the indexer KL reaches the backward through
``megatron.kl_loss.attach_kl_loss`` (scaled by the schedule like the main loss), and MSA
statistics reach the logs through ``megatron.metrics`` (``collect_msa_metrics``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch

#: The micro-batch fields a step reads (``attention_mask`` is optional: None when absent).
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
#: Report key of msa-train and the validator (their JSONL / console name).
LM_LOSS_KEY = "lm_loss"
#: Report key of Megatron-LM's loop: its iteration line, TensorBoard and wandb name.
MEGATRON_LM_LOSS_KEY = "lm loss"


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, report_key: str = LM_LOSS_KEY,
                   rerun_check: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """(summed masked token loss, token count, {report_key: [sum, count]}): Megatron's 3-value loss.

    ``rerun_check``: reject NaN / Inf through Megatron's rerun state machine (Megatron-LM's
    ``--check-for-nan-in-loss-and-grad``; fatal)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    count = mask.sum().detach()
    if rerun_check:
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        rerun = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                  message=f"found {what} in local forward loss calculation")
    # stack copies: the schedule divides ``loss`` in place afterwards, the report keeps the sum
    return loss, count.to(torch.int), {report_key: torch.stack([loss.detach(), count])}


def forward_step(batch: Mapping[str, Any], model, *, report_key: str = LM_LOSS_KEY, rerun_check: bool = False,
                 on_output: Optional[Callable[[torch.Tensor], None]] = None,
                 packed_seq_params=None) -> Tuple[torch.Tensor, Callable]:
    """Run ``model`` on one prepared micro-batch (this rank's part, on its device) and return
    (per-token losses, loss_func) for ``forward_backward_func``.

    The loss mask is passed to the model too (as Megatron-LM's forward step does; GPTModel uses
    it only for multi-token prediction). On a middle pipeline stage the batch fields are None and
    the loss function is never called. ``on_output`` sees the per-token losses (the validator keeps them).
    ``packed_seq_params``: document boundaries of packed sequences (``data.packing=eod``, docs/packed.md)."""
    extra = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"], **extra)
    if on_output is not None:
        on_output(output)
    return output, partial(masked_lm_loss, batch["loss_mask"], report_key=report_key, rerun_check=rerun_check)


def local_batch(batch: Mapping[str, Any], clone: bool = False) -> Dict[str, Any]:
    """This rank's part of a full-sequence micro-batch: Megatron's load-balanced context-parallel
    split (chunks r and 2cp-1-r, what MSA layers expect), or the batch itself without CP.
    ``clone``: cut copies, so the caller's tensors are never views of this step's."""
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() == 1:
        return dict(batch)
    from megatron.core.utils import get_batch_on_this_cp_rank

    local = {k: (v.clone() if clone and torch.is_tensor(v) else v) for k, v in batch.items()}
    return get_batch_on_this_cp_rank(local, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())


def global_mean_loss(reports: Optional[Iterable[Dict[str, torch.Tensor]]], device, key: str = LM_LOSS_KEY) -> float:
    """Token-weighted mean loss over the global batch, known on every rank: the ``[sum, count]``
    reports of this rank's micro-batches summed over data x context parallel ranks, then taken
    from the last pipeline stage (the only one with reports). NaN when no token counted."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in reports or []:
        total += item[key].to(torch.float64)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_last_stage():
            total.zero_()
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


__all__ = ["BATCH_KEYS", "LM_LOSS_KEY", "MEGATRON_LM_LOSS_KEY", "forward_step", "global_mean_loss", "local_batch",
           "masked_lm_loss"]

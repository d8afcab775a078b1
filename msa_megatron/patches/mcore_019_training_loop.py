"""MSA in Megatron-LM's training loop (``megatron.training.training``, megatron-core 0.19.x).

Wraps two module-level functions of ``megatron.training.training`` that ``train()`` calls once
per iteration through module globals:

* ``train_step(...)``: first applies the iteration's MSA plan (warmup mode switch, recall
  sampling; msa_megatron.megatron_lm.hooks) to ``model``, then runs the upstream step, then
  keeps the index branch's gradient norm from ``optimizer`` (msa.index_grad_clip=separate);
* ``training_log(...)``: first reduces the step's MSA metrics (a collective, on every rank) and
  writes them to TensorBoard / wandb / ``total_loss_dict`` beside the DSA and MoE metrics, then
  runs the upstream function; prints the recall line after it on sampled iterations.

Runs without MSA (``args.msa`` None) go straight to the upstream functions. Relied on (pinned):
``train`` calls both through module globals, with ``iteration=`` and the model chunk list.
"""

from __future__ import annotations

import functools
import inspect

from msa_megatron.patches.mcore_019_training_base import FunctionWrapPatch

TARGET = "megatron.training.training"

#: sha256 of the upstream sources this patch wraps or relies on (megatron-core 0.19.2).
PINNED = {
    f"{TARGET}:train_step": "68989d425b2300aa0b193d9c93c881775be99bd3c70aeb4fe9d9b9f4c0671726",
    f"{TARGET}:training_log": "5e34a182d566e325edb4e0f342819036db16801b5d9972cd294f1b8406f51f5d",
    f"{TARGET}:train": "3c2299658ae7928bf0e4a3585531f2350de38c161984f12b9e17410102965e35",
}
SOURCE_CHECKS = (
    (f"{TARGET}:train", "forward_backward_func, iteration=iteration,"),
    (f"{TARGET}:train", "report_memory_flag = training_log("),
    (f"{TARGET}:training_log", "DSAIndexerLossLoggingHelper.track_indexer_metrics("),
    # the first iteration's line does not reset the interval means (run_summary undoes the carry)
    (f"{TARGET}:training_log", "should_reset = not is_first_iteration"),
)


def _train_step(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        from megatron.training.global_vars import get_args

        from msa_megatron.megatron_lm.hooks import hooks_for

        run_args = get_args()
        hooks = hooks_for(run_args)
        if hooks is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        iteration = bound.arguments.get("iteration")
        if iteration is None:
            raise RuntimeError("train_step was called without iteration=: the MSA schedule needs the "
                               "iteration counter (Megatron-LM's train() passes it)")
        hooks.before_train_step(bound.arguments["model"], iteration, run_args.consumed_train_samples)
        result = original(*args, **kwargs)
        hooks.after_train_step(bound.arguments["optimizer"])
        return result

    return wrapper


def _training_log(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer
        from megatron.training.utils import print_rank_last

        from msa_megatron.megatron_lm.hooks import hooks_for

        hooks = hooks_for(get_args())
        line = None
        if hooks is not None:
            a = signature.bind(*args, **kwargs).arguments
            metrics = hooks.collect()
            line = hooks.log(metrics, a["iteration"], get_tensorboard_writer(), get_wandb_writer(),
                             a["total_loss_dict"], a["loss_dict"], a["skipped_iter"])
        result = original(*args, **kwargs)
        if line is not None:
            print_rank_last(line)
        return result

    return wrapper


PATCH = FunctionWrapPatch(
    "msa_megatron.patches.mcore_019_training_loop", TARGET,
    {"train_step": _train_step, "training_log": _training_log},
    PINNED, SOURCE_CHECKS,
)
apply, remove, is_applied, verify_upstream, upstream = (
    PATCH.apply, PATCH.remove, PATCH.is_applied, PATCH.verify_upstream, PATCH.upstream)

__all__ = ["PATCH", "PINNED", "SOURCE_CHECKS", "TARGET", "apply", "is_applied", "remove", "upstream",
           "verify_upstream"]

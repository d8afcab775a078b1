"""Attach MSA's indexer KL loss to the backward pass of the attention output.

The KL is not added to the LM loss: that would make every caller of the model (the
schedules, pipeline stages, gradient accumulation) aware of it. Instead, like Megatron's
MoE aux loss, an identity op on the attention output keeps the KL alive and, in backward,
injects d(loss)/d(kl) = the main loss's backward scale. The schedules pass that scale
(loss scaling, 1/num_micro_batches, CP factor) through the TransformerConfig hook
``experimental_attention_variant_loss_scale_func``, which MSATransformerConfig points at
:meth:`MSAKLAutoScaler.set_loss_scale`.
"""

from __future__ import annotations

from typing import Optional

import torch


class MSAKLAutoScaler(torch.autograd.Function):
    """Identity on ``output``; its backward sends ``main_loss_backward_scale`` into ``kl``."""

    #: The main loss's backward scale; 1 until the schedules set it.
    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kl)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (kl,) = ctx.saved_tensors
        scale = MSAKLAutoScaler.main_loss_backward_scale
        if scale is None:
            grad_kl = torch.ones_like(kl)
        else:
            grad_kl = torch.ones_like(kl) * scale.to(device=kl.device, dtype=kl.dtype).reshape(())
        return grad_output, grad_kl

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        """Hook for ``TransformerConfig.experimental_attention_variant_loss_scale_func``."""
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale))
        if scale.numel() != 1:
            raise ValueError(f"MSA KL loss scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        MSAKLAutoScaler.main_loss_backward_scale = scale.detach().reshape(()).clone()

    @staticmethod
    def reset() -> None:
        MSAKLAutoScaler.main_loss_backward_scale = None


def attach_kl_loss(output: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged; backward through it also back-propagates ``kl`` (a scalar)."""
    return MSAKLAutoScaler.apply(output, kl)


__all__ = ["MSAKLAutoScaler", "attach_kl_loss"]

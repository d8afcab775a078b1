"""Local (pure torch) building blocks the Megatron-Core local backend lacks.

* :class:`IndexLinear`: a linear layer replicated on every TP rank (Megatron-Core has
  ``TELinear(parallel_mode="duplicated")`` only with Transformer Engine). Same constructor
  keywords and ``(output, bias)`` return as Megatron's linears, so one spec serves both
  backends.
* :class:`SequenceParallelTorchNorm`: Megatron's torch-norm builder refuses sequence
  parallelism because nothing would mark its weights for the TP gradient sum. A norm is
  per token, so it runs unchanged on a sequence shard; this builder marks the weights
  ``sequence_parallel`` (as Apex/TE norms do) so ``finalize_model_grads`` sums their
  gradients over TP. It is what lets the CPU/local backend test and run SP.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _param_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mark_replicated(param: torch.nn.Parameter, config: TransformerConfig) -> None:
    """Attributes of a parameter replicated on every TP rank: reduced over DP, not TP-split,
    and (under SP, where each rank sees only its sequence shard) summed over TP."""
    set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    param.tensor_model_parallel = False
    param.allreduce = True
    param.sequence_parallel = bool(config.sequence_parallel)


class IndexLinear(MegatronModule):
    """y = x W^T, W replicated on every TP rank, no bias."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        parallel_mode: Optional[str] = "duplicated",
        tp_comm_buffer_name: Optional[str] = None,
        is_expert: bool = False,
        tp_group=None,
        name: Optional[str] = None,
    ):
        super().__init__(config=config)
        if bias or skip_weight_param_allocation or is_expert or parallel_mode != "duplicated":
            raise ValueError(
                "IndexLinear supports only bias=False, skip_weight_param_allocation=False, is_expert=False, "
                f"parallel_mode='duplicated'; got bias={bias}, skip_weight_param_allocation="
                f"{skip_weight_param_allocation}, is_expert={is_expert}, parallel_mode={parallel_mode!r}"
            )
        self.input_size, self.output_size = input_size, output_size
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=_param_device(config))
        )
        if config.perform_initialization:
            # Same generator on every TP rank (the data-parallel one, as TE's duplicated linears
            # use), so replicas start identical.
            tracker = get_cuda_rng_tracker()
            if tracker.is_initialized():
                with tracker.fork(get_data_parallel_rng_tracker_name()):
                    init_method(self.weight)
            else:
                init_method(self.weight)
        mark_replicated(self.weight, config)

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, replicated over TP, bias=False"


class SequenceParallelTorchNorm:
    """Builder with Megatron's LayerNormBuilder signature returning ``torch.nn.LayerNorm`` or
    ``torch.nn.RMSNorm`` (per ``config.normalization``) whose weights carry
    ``sequence_parallel = config.sequence_parallel``."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: Optional[str] = None,
    ):
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"{flag}=True is not supported by the local torch norm: allowed value is False")
        kind = config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={kind!r} is not supported by the local torch norm: allowed values are "
                             "LayerNorm, RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


__all__ = ["IndexLinear", "SequenceParallelTorchNorm", "mark_replicated"]

"""Process-group start-up shared by the trainer, the tests and the scripts.

One call sets up torch.distributed (NCCL on CUDA, gloo on CPU with the compatibility
layer), Megatron-Core's parallel_state for a (TP, PP, CP, EP) layout, and the seeds.
An impossible layout for the number of processes is one clear error."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False

    def validate(self, world_size: int) -> "ParallelLayout":
        for name in ("tp", "pp", "cp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name}={v!r} is invalid: allowed values are integers >= 1")
        model = self.tp * self.pp * self.cp
        if world_size % model != 0:
            raise ValueError(
                f"parallel layout tp={self.tp} x pp={self.pp} x cp={self.cp} = {model} does not divide the "
                f"{world_size} processes: allowed layouts have tp*pp*cp dividing the world size"
            )
        dp = world_size // model
        if (dp * self.cp * self.tp) % (self.ep * self.tp) != 0 and self.ep > 1:
            raise ValueError(f"parallel.ep={self.ep} is invalid: it must divide dp*cp={dp * self.cp} for {world_size} processes")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sp=true is invalid with tp=1: sequence parallelism needs tp > 1")
        return self

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)


def init_distributed(layout: ParallelLayout, seed: int = 1234, timeout_s: int = 600) -> torch.device:
    """Start torch.distributed from the torchrun environment (or a single process) and
    Megatron-Core's model-parallel groups. Returns this process's device."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from .compat import install_cpu_compat

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        install_cpu_compat()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    layout.validate(world)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        store = None
        if world == 1 and "MASTER_PORT" not in os.environ:
            # one process and no launcher: an in-memory store, no TCP port (two single-process
            # runs on one machine used to collide on a fixed port 29500)
            store = dist.HashStore()
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            store=store,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def shutdown_distributed() -> None:
    import sys

    # Only touch Megatron's state if it was used: importing megatron costs seconds.
    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["ParallelLayout", "init_distributed", "shutdown_distributed"]

"""Save / load model weights as a Megatron-Core distributed checkpoint.

The state is nested like Megatron-LM's (``{'model': ...}``, or ``{'model0': ..., 'model1':
...}`` for virtual-pipeline chunks), so the directory is laid out the way Megatron-LM's
loader expects for the model part. Distributed checkpoints are resharding-capable: save at
one TP/PP/EP layout, load at another. MSA's index parameters are replicated over TP and are
saved once (replica 0), so they load at any TP size.
"""

from __future__ import annotations

import os
from typing import Iterable, Union

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model

from .modes import as_chunks

ModelOrChunks = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return unwrap_model(module)  # DDP / FSDP / Float16Module -> the GPTModel


def model_sharded_state_dict(model_or_chunks: ModelOrChunks) -> dict:
    """{'model': ...} or {'model0': ..., ...}: the sharded state of every chunk."""
    chunks = [_unwrap(c) for c in as_chunks(model_or_chunks)]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_checkpoint(model_or_chunks: ModelOrChunks, checkpoint_dir: str) -> None:
    """Collective: every rank calls it with its model chunks."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_or_chunks), checkpoint_dir)


def load_model_checkpoint(model_or_chunks: ModelOrChunks, checkpoint_dir: str,
                          strict: StrictHandling = StrictHandling.RAISE_UNEXPECTED) -> None:
    """Load weights saved at any parallel layout into this rank's chunks. By default every
    tensor the model needs must be in the checkpoint (extra checkpoint entries, e.g. optimizer
    state, are ignored). Collective."""
    chunks = [_unwrap(c) for c in as_chunks(model_or_chunks)]
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), checkpoint_dir, strict=strict)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"])


__all__ = ["load_model_checkpoint", "model_sharded_state_dict", "save_model_checkpoint"]

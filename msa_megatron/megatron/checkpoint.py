"""Save / load model weights as a Megatron-Core distributed checkpoint.

The state is nested like Megatron-LM's (``{'model': ...}``, or ``{'model0': ..., 'model1':
...}`` for virtual-pipeline chunks), so the directory is laid out the way Megatron-LM's
loader expects for the model part. Distributed checkpoints are resharding-capable: save at
one TP/PP/EP layout, load at another. MSA's index parameters are replicated over TP and are
saved once (replica 0), so they load at any TP size.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, List, Tuple, Union

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model

from .modes import as_chunks

log = logging.getLogger(__name__)

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


def is_te_extra_state(key: str) -> bool:
    """Transformer Engine's per-module FP8 metadata (``..._extra_state``): no weights."""
    return key.endswith("_extra_state")


#: Two names of one tensor in Megatron checkpoints: a MoE layer's pre-MLP norm is
#: ``mlp.linear_fc1.layer_norm_*`` in the local specs (Megatron's and this package's, and this
#: package's TE spec) and ``pre_mlp_layernorm.*`` in Megatron's stock TE spec.
KEY_ALIASES = ((".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
               (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"))


def alias_missing_keys(sharded: dict, checkpoint_dir: str) -> List[Tuple[str, str]]:
    """Point every requested tensor whose key the checkpoint lacks, but whose other name
    (:data:`KEY_ALIASES`) it has, at that name; returns the (key, alias) pairs. Weights-only
    loads use it, so checkpoints of Megatron-LM's stock TE spec load into the local spec and
    this package's TE spec, and theirs into ours. Keys present in the checkpoint are never
    touched (a stacked-layer checkpoint that has the key for some layers only is not aliased)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    wanted = [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]
    if not any(v.key.endswith(suffix) for v in wanted for pair in KEY_ALIASES for suffix in pair):
        return []
    present = set(dist_checkpointing.load_tensors_metadata(checkpoint_dir))
    renamed = []
    for v in wanted:
        if v.key in present:
            continue
        for a, b in KEY_ALIASES:
            for mine, theirs in ((a, b), (b, a)):
                other = v.key[: -len(mine)] + theirs if v.key.endswith(mine) else None
                if other is not None and other in present:
                    renamed.append((v.key, other))
                    v.key = other
                    break
    return renamed


def load_model_checkpoint(model_or_chunks: ModelOrChunks, checkpoint_dir: str,
                          strict: StrictHandling = StrictHandling.RAISE_UNEXPECTED) -> None:
    """Load weights saved at any parallel layout into this rank's chunks. By default every
    tensor the model needs must be in the checkpoint (extra checkpoint entries, e.g. optimizer
    state, are ignored), except Transformer Engine's ``_extra_state`` (FP8 scaling metadata,
    no weights): a checkpoint of the local spec has none, and TE starts it fresh. A MoE
    layer's pre-MLP norm is found under either of its names (:func:`alias_missing_keys`).
    Collective."""
    chunks = [_unwrap(c) for c in as_chunks(model_or_chunks)]
    sd = model_sharded_state_dict(chunks)
    alias_missing_keys(sd, checkpoint_dir)
    if strict is StrictHandling.RAISE_UNEXPECTED and _has_te_extra_state(sd):
        state, _ckpt_only, model_only = dist_checkpointing.load(sd, checkpoint_dir, strict=StrictHandling.RETURN_ALL)
        absent = sorted(k for k in model_only if not is_te_extra_state(k))
        if absent:
            raise RuntimeError(f"{checkpoint_dir}: {len(absent)} tensors of this model are not in the checkpoint, "
                               f"e.g. {absent[:3]}")
        load_state_into_chunks(state, chunks, where=checkpoint_dir)
        return
    state = dist_checkpointing.load(sd, checkpoint_dir, strict=strict)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"])


def load_state_into_chunks(state: dict, chunks: List[torch.nn.Module], allow_missing=lambda key: False,
                           where: str = "checkpoint") -> None:
    """``state["model"]`` (``state["model<i>"]`` per chunk) into the chunks (unwrapped). Missing
    entries are allowed for Transformer Engine's ``_extra_state`` (FP8 scaling metadata, no
    weights; a warning names them: TE starts them fresh, with FP8 a new scaling history) and
    where ``allow_missing(key)``; any other missing or unexpected key raises, naming it on one
    line (torch's strict-load error spans many lines, and callers report one)."""
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        result = _unwrap(chunk).load_state_dict(state[key], strict=False)
        bad = [k for k in result.missing_keys if not (is_te_extra_state(k) or allow_missing(k))]
        if bad or result.unexpected_keys:
            raise RuntimeError(f"{where}: checkpoint/model mismatch: missing {bad[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        fresh = [k for k in result.missing_keys if is_te_extra_state(k)]
        if fresh:
            log.warning("%s: %d Transformer Engine _extra_state entries (FP8 scaling metadata) not in the "
                        "checkpoint; TE starts them fresh: %s%s", where, len(fresh), ", ".join(fresh[:3]),
                        " ..." if len(fresh) > 3 else "")


def _has_te_extra_state(sharded: dict) -> bool:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return any(isinstance(v, ShardedBase) and is_te_extra_state(v.key) for v in nested_values(sharded))


__all__ = ["KEY_ALIASES", "alias_missing_keys", "is_te_extra_state", "load_model_checkpoint", "load_state_into_chunks", "model_sharded_state_dict", "save_model_checkpoint"]

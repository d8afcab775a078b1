"""Write a Megatron-Core distributed checkpoint without holding the model in memory.

The model is built with every tensor on the ``meta`` device (shapes, dtypes and Megatron's
sharding metadata, no storage). Its ``sharded_state_dict()`` goes through Megatron's own
``dist_checkpointing.save`` (factories, sharding validation, ``common.pt``,
``metadata.json``) with a save strategy that hands the PyTorch-DCP state dict to
``torch.distributed.checkpoint.save`` and a planner whose ``resolve_data`` (DCP's hook,
called once per write item as it is written) replaces the meta view by real data: the
parameter is produced on demand by a caller's function, the view Megatron took of it
(a SwiGLU half, an expert) is taken again with the same size/stride/offset, and the writer
drops it after writing. Peak memory: the parameter being written (plus its inputs and a
copy of a view), not the model.

Why not Megatron's own writer: its ``FileSystemWriterAsync.prepare_write_data`` resolves
every item up front (for the asynchronous copy to host), so it would hold every tensor at
once. The files written here are the same PyTorch DCP format (``__0_0.distcp`` +
``.metadata``) and load with ``dist_checkpointing.load`` at any TP/PP/EP.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
from torch.overrides import TorchFunctionMode

#: Tensor factories forced onto the meta device (Megatron passes explicit devices:
#: ``torch.cuda.current_device()`` or ``'cpu'``, so ``with torch.device('meta')`` is not enough).
_FACTORIES = frozenset({"empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint", "tensor",
                        "as_tensor", "linspace", "empty_strided", "eye", "normal"})


class _MetaFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in _FACTORIES and getattr(func, "__module__", "") in (
                "torch", "torch._C._VariableFunctions", None) and "out" not in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_tensors():
    """Every tensor created inside is a meta tensor (no storage), whatever device is asked for."""
    with _MetaFactories():
        yield


def check_meta(model: torch.nn.Module) -> None:
    real = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not t.is_meta]
    if real:
        raise RuntimeError(f"meta-device model build left {len(real)} tensors with storage (e.g. {real[:3]}): the "
                           "streamed writer would not replace them")


class Materialiser:
    """Meta view -> real tensor: finds the parameter the view belongs to (its storage), makes
    the parameter with ``produce(name)`` (cached until the next parameter) and takes the view."""

    def __init__(self, params: Dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                 on_new: Optional[Callable[[str], None]] = None):
        self._owner = {t.untyped_storage()._cdata: name for name, t in params.items()}
        if len(self._owner) != len(params):
            raise RuntimeError("two model tensors share one storage (tied weights?): the streamed writer needs one "
                               "storage per tensor")
        self._params = params
        self._produce = produce
        self._on_new = on_new
        self._cached: Optional[str] = None
        self._value: Optional[torch.Tensor] = None
        self.produced: Dict[str, int] = {}

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        name = self._owner.get(view.untyped_storage()._cdata)
        if name is None:
            raise RuntimeError(f"a meta tensor of shape {tuple(view.shape)} in the sharded state dict belongs to no "
                               "model parameter")
        if name != self._cached:
            self._value = None  # free the previous parameter first
            ref = self._params[name]
            value = self._produce(name).to(ref.dtype).contiguous()
            if value.shape != ref.shape:
                raise RuntimeError(f"{name}: produced shape {tuple(value.shape)} != model shape {tuple(ref.shape)}")
            self._cached, self._value = name, value
            self.produced[name] = self.produced.get(name, 0) + 1
            if self._on_new is not None:
                self._on_new(name)
        return self._value.as_strided(view.size(), view.stride(), view.storage_offset())

    def release(self) -> None:
        self._cached = self._value = None


def save_streamed(model: torch.nn.Module, checkpoint_dir: str, materialise: Materialiser) -> None:
    """``dist_checkpointing.save`` of a meta model's ``{'model': sharded_state_dict()}`` (the
    layout of :func:`msa_megatron.megatron.checkpoint.save_model_checkpoint`), tensors made
    one at a time by ``materialise``. Collective."""
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner, TorchDistSaveShardedStrategy, \
        _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                data = materialise(data)
            return data

    class StreamingSave(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist format, written through DCP's synchronous writer."""

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            state = mcore_to_pyt_state_dict(sharded, False)
            planner = LazyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp.save(state, storage_writer=writer, planner=planner)

    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    torch.distributed.barrier()
    try:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, checkpoint_dir, sharded_strategy=StreamingSave())
    finally:
        materialise.release()


__all__ = ["Materialiser", "check_meta", "meta_tensors", "save_streamed"]

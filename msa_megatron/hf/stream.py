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

Why not the stock writers: Megatron's ``FileSystemWriterAsync.prepare_write_data``
resolves every item up front (for its asynchronous copy to host), and torch's
``FileSystemWriter`` keeps every tensor of a file referenced until the file is closed (for
its safetensors output format); either would hold the whole model. The writer here
resolves, writes and drops one item at a time, with DCP's own ``_write_item`` and the
torch.save serialisation Megatron uses, so the files are the same PyTorch DCP format
(``__0_0.distcp`` + ``.metadata``) and load with ``dist_checkpointing.load`` at any
TP/PP/EP.
"""

from __future__ import annotations

import contextlib
import inspect
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
    the parameter with ``produce(name)`` (cached until the next parameter) and takes the view.
    ``produced`` counts how often each parameter was made (more than once only if the writer
    interleaves views of different parameters); ``on_new`` is called once per parameter."""

    def __init__(self, params: Dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                 on_new: Optional[Callable[[str], None]] = None):
        self._owner = {t.untyped_storage()._cdata: name for name, t in params.items()}
        if len(self._owner) != len(params):
            raise RuntimeError("two model tensors share one storage (tied weights?): the streamed writer needs one "
                               "storage per tensor")
        self.params = params
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
            ref = self.params[name]
            value = self._produce(name).to(ref.dtype).contiguous()
            if value.shape != ref.shape:
                raise RuntimeError(f"{name}: produced shape {tuple(value.shape)} != model shape {tuple(ref.shape)}")
            self._cached, self._value = name, value
            first = name not in self.produced
            self.produced[name] = self.produced.get(name, 0) + 1
            if first and self._on_new is not None:
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
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.futures import Future

    try:
        from torch.distributed.checkpoint.filesystem import SerializationFormat
    except ImportError:  # older torch: torch.save is the only format
        SerializationFormat = None
    _WRITE_ARGS = inspect.signature(_write_item).parameters

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                data = materialise(data)
            return data

    class StreamingWriter(FileSystemWriter):
        """DCP's file writer, one file per rank, each item resolved, written and dropped.
        (torch's own loop keeps every tensor of a file until the file is closed.)"""

        def write_data(self, plan, planner):
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            # _write_item's signature across torch versions (as Megatron's writer calls it)
            lead = [self.transforms] if "transforms" in _WRITE_ARGS else []
            fmt = {"serialization_format": SerializationFormat.TORCH_SAVE} if "serialization_format" in _WRITE_ARGS \
                else {}
            items = [i for i in plan.items if i.type == WriteItemType.BYTE_IO] + \
                [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
            results = []
            with open(os.path.join(str(self.path), name), "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach().cpu()
                        if data.untyped_storage().nbytes() != data.nbytes:  # a view: write only its elements
                            data = data.clone()
                    results.append(_write_item(*lead, stream, data, item, name, **fmt))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            future = Future()
            future.set_result(results)
            return future

    class StreamingSave(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist format, written through DCP with the streaming writer."""

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            state = mcore_to_pyt_state_dict(sharded, False)
            planner = LazyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
            writer = StreamingWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp.save(state, storage_writer=writer, planner=planner)

    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    torch.distributed.barrier()
    try:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, checkpoint_dir, sharded_strategy=StreamingSave())
    finally:
        materialise.release()


__all__ = ["Materialiser", "check_meta", "meta_tensors", "save_streamed"]

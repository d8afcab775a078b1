"""Safetensors directories, read and written one tensor at a time.

Reading opens every shard with ``safe_open`` (memory-mapped); a tensor is materialised
only when asked for, so a conversion holds one tensor (or one fused group) at a time.
Writing fills shards up to ``max_shard_bytes`` and writes HF's index file when there is
more than one shard, the layout ``from_pretrained`` expects.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _require_safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("Hugging Face conversion needs safetensors: pip install -e .[hf]") from None
    return safe_open, save_file


class SafetensorsReader:
    """Tensors of an HF model directory by name; records which names were read."""

    def __init__(self, directory: str):
        safe_open, _ = _require_safetensors()
        index = os.path.join(directory, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: Dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_NAME)):
            files, weight_map = [SINGLE_NAME], {}
        else:
            found = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(directory) else []
            hint = f" (found {found[:3]}: re-save with safe_serialization=True)" if found else ""
            raise FileNotFoundError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._handles = {name: safe_open(os.path.join(directory, name), framework="pt") for name in files}
        self.location: Dict[str, str] = {}
        for name, handle in self._handles.items():
            for key in handle.keys():
                self.location[key] = name
        self.read: Set[str] = set()

    def keys(self) -> List[str]:
        return sorted(self.location)

    def has(self, key: str) -> bool:
        return key in self.location

    def get(self, key: str) -> torch.Tensor:
        if key not in self.location:
            raise KeyError(f"tensor {key!r} is not in the checkpoint")
        self.read.add(key)
        return self._handles[self.location[key]].get_tensor(key)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._handles[self.location[key]].get_slice(key).get_shape())


class SafetensorsWriter:
    """Add tensors one by one; a shard is written once it reaches ``max_shard_bytes``."""

    def __init__(self, directory: str, max_shard_bytes: int = 4 << 30):
        _, self._save = _require_safetensors()
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        os.makedirs(directory, exist_ok=True)
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[List[str]] = []
        self._total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous().clone()  # own storage: no views into a larger tensor
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        n = len(self._shards)
        self._save(self._pending, os.path.join(self.directory, f".shard-{n:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Name the shards as HF does; returns the file names."""
        self._flush()
        n = len(self._shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(os.path.join(self.directory, f".shard-{i:05d}.safetensors"), os.path.join(self.directory, name))
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self._shards) for k in keys}
            with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)
        return names


def progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool = True):
    """tqdm when installed and enabled; otherwise the iterable itself (the caller logs)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        import logging

        logging.getLogger("msa_megatron.hf").info("%s: tqdm is not installed, no progress bar", desc)
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="layer")


__all__ = ["INDEX_NAME", "SINGLE_NAME", "SafetensorsReader", "SafetensorsWriter", "progress"]

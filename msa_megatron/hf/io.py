"""Safetensors directories, read and written one tensor at a time.

Reading parses the safetensors headers (shapes, dtypes) and reads a tensor's bytes only
when asked for, into a fresh tensor (no memory map: see SafetensorsReader), so a
conversion holds one tensor (or one fused group) at a time.
Writing fills shards up to ``max_shard_bytes`` and writes HF's index file when there is
more than one shard, the layout ``from_pretrained`` expects.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
SINGLE_NAME = "model.safetensors"


def _require_safetensors():
    """safetensors' writer (the reader below parses the format itself)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("Hugging Face export needs safetensors: pip install -e .[hf]") from None
    return save_file


class _Entry:
    __slots__ = ("file", "dtype", "shape", "start", "nbytes")

    def __init__(self, file: str, dtype: str, shape: Tuple[int, ...], start: int, nbytes: int):
        self.file, self.dtype, self.shape, self.start, self.nbytes = file, dtype, shape, start, nbytes


def read_header(path: str) -> Dict[str, _Entry]:
    """The safetensors header (8-byte little-endian length, then JSON): name -> entry, with
    absolute byte offsets, checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        header = json.loads(f.read(n))
    out: Dict[str, _Entry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        if not 0 <= begin <= stop or 8 + n + stop > size:
            raise ValueError(f"{path}: tensor {key!r} has data offsets {info['data_offsets']} outside the file")
        out[key] = _Entry(path, info["dtype"], tuple(info["shape"]), 8 + n + begin, stop - begin)
    return out


class SafetensorsReader:
    """Tensors of an HF model directory by name; records which names were read.

    Reads with ``readinto`` into a fresh tensor rather than ``safe_open``: safetensors maps
    the files and returns tensors over the mapping, so every page touched stays in the
    process's resident set until the file is closed (file-backed, reclaimable, but counted
    in RSS and cgroup limits): reading a model that way shows the whole model resident.
    """

    def __init__(self, directory: str):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this reader supports little-endian hosts only")
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
        self._entries: Dict[str, _Entry] = {}
        for name in files:
            self._entries.update(read_header(os.path.join(directory, name)))
        self.location: Dict[str, str] = {k: os.path.basename(e.file) for k, e in self._entries.items()}
        self._files: Dict[str, Any] = {}
        self.read: Set[str] = set()

    def keys(self) -> List[str]:
        return sorted(self._entries)

    def has(self, key: str) -> bool:
        return key in self._entries

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise KeyError(f"tensor {key!r} is not in the checkpoint")
        e = self._entries[key]
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {e.dtype} is not supported: allowed values are "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        return e

    def get(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        dtype = SAFETENSORS_DTYPES[e.dtype]
        numel = math.prod(e.shape)
        if numel * torch.empty((), dtype=dtype).element_size() != e.nbytes:
            raise ValueError(f"tensor {key!r}: {e.nbytes} bytes for shape {e.shape} of {e.dtype}")
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        f = self._files.get(e.file)
        if f is None:
            f = self._files[e.file] = open(e.file, "rb", buffering=0)
        f.seek(e.start)
        view, done = memoryview(buf.numpy()), 0
        while done < e.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"tensor {key!r}: {e.file} ended early")
            done += n
        self.read.add(key)
        return buf.view(dtype).reshape(e.shape)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entry(key).shape

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (from the header only)."""
        e = self._entry(key)
        return torch.empty(e.shape, dtype=SAFETENSORS_DTYPES[e.dtype], device="meta")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class SafetensorsWriter:
    """Add tensors one by one; a shard is written once it reaches ``max_shard_bytes``."""

    def __init__(self, directory: str, max_shard_bytes: int = 4 << 30):
        self._save = _require_safetensors()
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


def _tqdm(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        import logging

        logging.getLogger("msa_megatron.hf").info("%s: tqdm is not installed, no progress bar", desc)
        return None
    return tqdm


def progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool = True, unit: str = "layer"):
    """tqdm when installed and enabled; otherwise the iterable itself (the caller logs)."""
    tqdm = _tqdm(desc) if enabled else None
    return iterable if tqdm is None else tqdm(iterable, total=total, desc=desc, unit=unit)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "tensor"):
    """A bar updated by hand (``update``/``close``), for work driven by someone else's loop."""
    tqdm = _tqdm(desc) if enabled else None
    return _NoBar() if tqdm is None else tqdm(total=total, desc=desc, unit=unit)


__all__ = ["INDEX_NAME", "SAFETENSORS_DTYPES", "SINGLE_NAME", "SafetensorsReader", "SafetensorsWriter", "progress",
           "progress_bar"]

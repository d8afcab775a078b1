"""Helpers shared by the MSA ops: input checks, query positions, document bounds, process
switches read from the environment, and log-once announcements.

Why one module: the kernels used to borrow private helpers of the reference and each kernel
file carried its own copy of the interpreter test, the poison switch and the announcer. It
depends on torch only (no Triton), so the reference (``ops/naive.py``, base layer) may use it
too: see the layer table in tests/test_import_graph.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

log = logging.getLogger("msa_megatron.ops")


# ----------------------------------------------------------------------------- environment
def env_flag(name: str, default: bool = False) -> bool:
    """A 0/1 process switch: true iff the variable is "1" (unset: ``default``)."""
    return os.environ.get(name, "1" if default else "0") == "1"


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``: the CPU test-suite); read per call."""
    return env_flag("TRITON_INTERPRET")


def check_positions_enabled() -> bool:
    """Range checks that need a device sync run on CUDA only with ``MSA_CHECK_POSITIONS=1``."""
    return env_flag("MSA_CHECK_POSITIONS")


#: Fill kernel outputs and partial buffers with NaN (or a sentinel) before the kernels run, so
#: an element a kernel fails to write shows up (``MSA_POISON_OUTPUTS=1``). Each kernel module
#: keeps its own copy of this switch (``triton_sparse_attn.POISON_OUTPUTS``,
#: ``triton_index.POISON_OUTPUTS``), which tests and GPU checks flip per module.
POISON_OUTPUTS = env_flag("MSA_POISON_OUTPUTS")

#: Host-side block_idx range checks (one sync per call) instead of the device assert.
DEBUG_CHECKS = env_flag("MSA_DEBUG_CHECKS")


# ----------------------------------------------------------------------------- log once
#: Keys already announced in this process (one set for every ops module; tests discard keys).
ANNOUNCED: set = set()


def announce(key: str, message: str) -> None:
    """Log ``message`` once per process and key: which path runs, and why (no silent fallbacks)."""
    if key not in ANNOUNCED:
        ANNOUNCED.add(key)
        log.warning(message)


# ----------------------------------------------------------------------------- input checks
class UnsupportedInputError(ValueError):
    """An input shape, dtype or device the Triton kernels do not handle."""


def check_shapes(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> Tuple[int, int]:
    """(hq, g) of q [b, sq, hq, d] and k / v [b, sk, g, d]; hq must be a multiple of g."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [b, s, heads, d]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    hq, g = q.shape[2], k.shape[2]
    if hq % g != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({g})")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in [b, s, heads]")
    return hq, g


def default_q_pos(sq: int, sk: int, device: torch.device) -> Tensor:
    """Positions of sq queries that are the last sq tokens of an sk-token sequence."""
    return torch.arange(sk - sq, sk, device=device, dtype=torch.long)


def positions(q_pos: Optional[Tensor], sq: int, sk: int, device) -> Tensor:
    """int64 [sq] query positions (default: the last sq), checked to lie in [0, sk) (a sync)."""
    if q_pos is None:
        return default_q_pos(sq, sk, device)
    q_pos = q_pos.to(device=device, dtype=torch.long)
    if q_pos.shape != (sq,):
        raise ValueError(f"q_pos must have shape [{sq}], got {tuple(q_pos.shape)}")
    if sq and (int(q_pos.min()) < 0 or int(q_pos.max()) >= sk):
        raise ValueError(f"q_pos must lie in [0, {sk - 1}] (keys cover positions 0..sk-1)")
    return q_pos


def kernel_positions(q_pos: Optional[Tensor], sq: int, sk: int, device) -> Tensor:
    """int32 [sq] positions as the main-branch kernels read them (no range check: no sync)."""
    if q_pos is None:
        return torch.arange(sk - sq, sk, device=device, dtype=torch.int32)
    if q_pos.shape != (sq,):
        raise ValueError(f"q_pos must have shape [{sq}], got {tuple(q_pos.shape)}")
    return q_pos.to(device=device, dtype=torch.int32).contiguous()


@dataclass(frozen=True)
class DocArgs:
    """Kernel arguments for the per-query document lower bound (``on=False``: the pointer is
    a dummy that no compiled instruction reads)."""

    ptr: Tensor
    stride_b: int
    on: bool


def doc_args(doc_start: Optional[Tensor], b: int, sq: int, q_pos: Tensor) -> DocArgs:
    """doc_start [b, sq] or [sq] (shared by the batch) -> int64 kernel argument, checked
    0 <= doc_start <= q_pos on CPU and when MSA_CHECK_POSITIONS=1 (a device sync)."""
    if doc_start is None:
        return DocArgs(q_pos, 0, False)
    if doc_start.dtype.is_floating_point or doc_start.dtype == torch.bool:
        raise UnsupportedInputError(f"doc_start must hold integers, got {doc_start.dtype}")
    if tuple(doc_start.shape) not in ((b, sq), (sq,)):
        raise UnsupportedInputError(f"doc_start must have shape [{b}, {sq}] or [{sq}], got {tuple(doc_start.shape)}")
    if doc_start.device != q_pos.device:
        raise UnsupportedInputError(f"doc_start is on {doc_start.device}, the index inputs on {q_pos.device}")
    ds = doc_start.to(torch.int64)
    ds = ds.view(1, sq) if ds.dim() == 1 else ds
    ds = ds if ds.stride(-1) == 1 else ds.contiguous()
    if sq and (ds.device.type == "cpu" or check_positions_enabled()):
        if bool((ds < 0).any()) or bool((ds > q_pos[None, :]).any()):
            raise UnsupportedInputError("doc_start must satisfy 0 <= doc_start[b, t] <= q_pos[t] "
                                        "(its document starts at or before the query)")
    return DocArgs(ds, ds.stride(0) if ds.shape[0] > 1 else 0, True)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


__all__ = ["ANNOUNCED", "DEBUG_CHECKS", "DocArgs", "POISON_OUTPUTS", "UnsupportedInputError", "announce",
           "check_positions_enabled", "check_shapes", "default_q_pos", "doc_args", "env_flag", "interpreting",
           "kernel_positions", "next_pow2", "positions"]

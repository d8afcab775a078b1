"""The reverse index of a block selection, built once per selection: a CSR over key blocks.

``block_idx`` [b, g, sq, K] says which key blocks each (query, slot) pair attends; the
KV-outer kernels need the transpose: for each (batch, group, key block) the pairs that chose
it. The index kernels (index LSE, KL backward: ``triton_index.ReverseIndex``) and the main
kernels (``triton_sparse_attn.build_plan``) cut this one CSR into their own work items, so the
op builds it once per call (``ops/triton_op.py``) and hands it to both.

One stable sort of int32 keys (b * g + g_i) * nb + block (unused -1 slots get the key past
the last segment and sort last), then the segment bounds by binary search. Entries are flat
pair ids ``e = ((b_i * g + g_i) * sq + t) * K + slot`` (``block_idx.view(-1)[e]``),
ascending in ``t`` inside a segment (the sort is stable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass
class SelectionCSR:
    """Segment ``s = (b_i * g + g_i) * nb + block`` holds ``order[seg_start[s]:seg_end[s]]``.

    ``order`` [E = b * g * sq * K] int32 (int64 beyond 2**31 entries); ``seg_start``,
    ``seg_end`` [b * g * nb] int64. ``key`` records what it was built from (shape, nb, device,
    storage), so a consumer handed a CSR of another selection rebuilds instead of misreading."""

    order: Tensor
    seg_start: Tensor
    seg_end: Tensor
    nb: int
    shape: Tuple[int, int, int, int]
    key: tuple

    @property
    def counts(self) -> Tensor:
        """Pairs per segment, int64 [b * g * nb]."""
        return self.seg_end - self.seg_start


def _key(block_idx: Tensor, nb: int) -> tuple:
    return (tuple(block_idx.shape), nb, str(block_idx.device), block_idx.data_ptr())


def build_csr(block_idx: Tensor, nb: int) -> SelectionCSR:
    """The CSR of ``block_idx`` [b, g, sq, K] (entries in [-1, nb)). Keys and ``order`` are
    int32 when the entry count allows (1M tokens x 4 groups x top-16 = 64M entries: 256 MB per
    array instead of 512 MB, and no [E] int64 temporaries)."""
    b, g, sq, K = block_idx.shape
    dev = block_idx.device
    nkeys = b * g * nb
    n_entries = b * g * sq * K
    idt = torch.int32 if max(n_entries, nkeys + 1) < 2**31 else torch.int64
    bg = torch.arange(b * g, device=dev, dtype=idt).view(b, g, 1, 1) * nb
    blk = block_idx.to(idt)
    key = torch.where(blk >= 0, blk + bg, torch.full_like(blk, nkeys)).reshape(-1)
    del blk
    sorted_key, order = torch.sort(key, stable=True)
    del key
    order = order.to(idt)
    keys = torch.arange(nkeys, device=dev, dtype=idt)
    seg_start = torch.searchsorted(sorted_key, keys, right=False)  # int64 [nkeys]
    seg_end = torch.searchsorted(sorted_key, keys, right=True)
    return SelectionCSR(order, seg_start, seg_end, nb, (b, g, sq, K), _key(block_idx, nb))


def csr_for(block_idx: Tensor, nb: int, csr: Optional[SelectionCSR] = None) -> SelectionCSR:
    """``csr`` when it was built from this ``block_idx`` (same tensor, shape and nb), else a new one."""
    if csr is not None and csr.key == _key(block_idx, nb):
        return csr
    return build_csr(block_idx, nb)


__all__ = ["SelectionCSR", "build_csr", "csr_for"]

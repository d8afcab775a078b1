"""SIGTERM (preemption, scheduler time limit, torchrun shutdown) -> finish the current
step, save a checkpoint, exit cleanly. The handler only sets a flag; the loop polls it
after every step and agrees on it across ranks, so all ranks save the same step."""

from __future__ import annotations

import signal
from typing import List, Optional

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: Optional[int] = None
        self._previous: List = []
        for sig in signals:
            self._previous.append((sig, signal.signal(sig, self._handler)))

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        """Collective: True if any rank has received the signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def restore(self) -> None:
        for sig, prev in self._previous:
            signal.signal(sig, prev)
        self._previous = []


__all__ = ["PreemptionFlag"]

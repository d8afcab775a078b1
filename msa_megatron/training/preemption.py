"""SIGTERM (preemption, scheduler time limit, torchrun shutdown) or Ctrl-C (SIGINT) ->
finish the current step, save a checkpoint, exit cleanly. The handler only sets a flag;
the loop polls it after every step and agrees on it across ranks, so all ranks save the
same step. A second Ctrl-C aborts at once (KeyboardInterrupt, no save)."""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: Optional[int] = None
        self._previous: List = []
        for sig in signals:
            self._previous.append((sig, signal.signal(sig, self._handler)))

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        if signum == signal.SIGINT and self.received is None:
            print("\nCtrl-C: finishing this step, saving a checkpoint, exiting (Ctrl-C again aborts without saving)",
                  file=sys.stderr, flush=True)
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

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

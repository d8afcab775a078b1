"""Detect a non-finite loss or gradient before the optimizer applies it, and say where.

The cheap check runs every step: finiteness of the reduced loss and of this rank's DDP
gradient buffers, one all-reduce for the whole job. Only when it fires does the expensive
part run: every rank lists the parameters whose gradients are non-finite (by module name,
so the layer shows) and the MSA layers whose tracked KL is non-finite; rank 0 reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (train.nan_policy=stop)."""


@dataclass
class NonFiniteReport:
    step: int
    loss_finite: bool
    grads_finite: bool
    bad_params: List[str] = field(default_factory=list)
    bad_layers: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.loss_finite and self.grads_finite

    def message(self) -> str:
        what = [w for w, bad in (("loss", not self.loss_finite), ("gradient", not self.grads_finite)) if bad]
        text = f"non-finite {' and '.join(what)} at step {self.step}"
        if self.bad_params:
            shown = self.bad_params[:8]
            more = f" (+{len(self.bad_params) - 8} more)" if len(self.bad_params) > 8 else ""
            text += "; non-finite gradients in: " + ", ".join(shown) + more
        if self.bad_layers:
            text += "; non-finite MSA statistics in: " + ", ".join(self.bad_layers)
        return text


def _buffers(chunk) -> list:
    return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))


def local_grads_finite(model_chunks) -> bool:
    for chunk in model_chunks:
        for buf in _buffers(chunk):
            if not torch.isfinite(buf.grad_data).all():
                return False
    return True


def check_step(step: int, loss: float, model_chunks, device: torch.device) -> NonFiniteReport:
    """Collective. ``loss`` must be the same on every rank (the reduced LM loss)."""
    grads_ok = local_grads_finite(model_chunks)
    flag = torch.tensor([0.0 if grads_ok else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    report = NonFiniteReport(step, math.isfinite(loss), flag.item() == 0.0)
    if not report.grads_finite:
        report.bad_params = _gather_names(_local_bad_params(model_chunks))
    return report


def _local_bad_params(model_chunks) -> List[str]:
    from megatron.core import parallel_state as ps

    rank = f"tp{ps.get_tensor_model_parallel_rank()}/pp{ps.get_pipeline_model_parallel_rank()}"
    bad = []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None and not torch.isfinite(g).all():
                bad.append(f"{_strip(name)} [{rank}]")
    return bad


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _gather_names(names: List[str]) -> List[str]:
    if not dist.is_initialized():
        return sorted(set(names))
    out: List[List[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, names)
    return sorted({n for part in out for n in part})


def bad_msa_layers(msa_metrics: Dict[str, float]) -> List[str]:
    return sorted(k for k, v in msa_metrics.items() if "/layer_" in k and not math.isfinite(v))


def inject_nan_grad(model_chunks, name_substring: str) -> int:
    """Debug hook (train.debug.nan_grad_*): make the gradient of matching params NaN."""
    hits = 0
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if name_substring in name and getattr(p, "main_grad", None) is not None:
                p.main_grad.fill_(float("nan"))
                hits += 1
    return hits


__all__ = ["NonFiniteError", "NonFiniteReport", "bad_msa_layers", "check_step", "inject_nan_grad", "local_grads_finite"]

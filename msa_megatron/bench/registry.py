"""Registry of benchmark implementations: small on purpose.

API (for impl modules such as ``impls_index.py`` / ``impls_main.py``)::

    from msa_megatron.bench.registry import Bench, Case, Skip, register

    @register("my-impl", "one line saying what it measures")
    def my_impl(case: Case) -> Bench:
        if case.L > 2**18:
            raise Skip("L too large for X")        # printed and recorded, never silent
        q = case.randn(case.batch, case.L, case.hq, case.d)   # set-up: not timed
        ...
        return Bench(
            fwd=lambda: run_forward(...),            # timed; None if there is no forward
            fwdbwd=lambda: run_forward_backward(...),# timed; None if no backward
            fwd_flops=case.sparse_fwd_flops(),       # FLOPs of one fwd call (for TF/s)
            fwdbwd_flops=case.sparse_fwd_flops() + case.sparse_bwd_flops(),
            grad_to_none=[q, k, v],                  # leaves whose .grad is reset between reps
            note="anything worth a footnote",
        )

* A factory receives a :class:`Case` (length, head layout, MSA settings, dtype, device;
  ``case.fwd_only`` is True above the harness's backward limit: then ``fwdbwd`` is not
  timed and may be omitted) and returns a :class:`Bench` of zero-argument callables.
  Set-up (allocations, warm caches, autotuning) happens in the factory, untimed.
* Raise :class:`Skip` with a reason when the impl cannot run this case (L too large,
  missing backend, ...). ``torch.cuda.OutOfMemoryError`` anywhere is caught by the harness
  and recorded as a skip with reason "out of memory"; any other exception is recorded
  as an error with its message and the harness goes on with the next impl.
* FLOP helpers on :class:`Case` follow the accounting of the released MSA benchmarks
  (docs/kernels_index.md): indexer 2*D_i*H_i per causal pair; sparse forward
  2*(D_qk+D_v)*H_q per selected pair; backward 2*(3*D_qk+2*D_v)*H_q per pair; KL
  backward 2*(D_qk*H_q + 3*D_i*H_i) per (selected or causal) pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..config import MSAConfig


class Skip(Exception):
    """The impl cannot run this case; the message is the reason shown in the table."""


@dataclass(frozen=True)
class Case:
    """One benchmark point. Defaults: the paper's layout (64 q / 4 KV heads, d 128, index
    dim 128, block 128, top-16, bf16, causal, batch 1)."""

    L: int
    batch: int = 1
    hq: int = 64
    hkv: int = 4
    d: int = 128
    di: int = 128
    block: int = 128
    topk: int = 16
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    fwd_only: bool = False
    seed: int = 0
    #: Block selection the sparse impls run on (bench/selections.py: random, flex, trained, pool:C, churn:R,C).
    selection: str = "random"

    @property
    def cfg(self) -> MSAConfig:
        return MSAConfig(block_size=self.block, topk=self.topk, index_dim=self.di, num_index_heads=self.hkv)

    def randn(self, *shape: int, requires_grad: bool = False, scale: float = 1.0) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed + len(shape) * 7919 + sum(shape))
        x = torch.randn(*shape, device=self.device, dtype=self.dtype, generator=g)
        if scale != 1.0:
            x = x * scale
        return x.requires_grad_(requires_grad)

    # ------------------------------------------------------------------ pair counts
    def causal_pairs(self) -> float:
        return self.batch * self.L * (self.L + 1) / 2.0

    def selected_pairs(self) -> float:
        """Exact (query, key) pairs inside the selection: own block up to the query plus
        min(K-1, earlier blocks) full blocks, per query."""
        t = torch.arange(self.L, dtype=torch.float64)
        per_q = (t % self.block + 1) + self.block * torch.clamp(t // self.block, max=self.topk - 1)
        return self.batch * float(per_q.sum())

    # ------------------------------------------------------------------ FLOPs
    def indexer_flops(self) -> float:
        return 2.0 * self.di * self.hkv * self.causal_pairs()

    def dense_fwd_flops(self) -> float:
        return 2.0 * (2 * self.d) * self.hq * self.causal_pairs()

    def dense_bwd_flops(self) -> float:
        return 2.0 * (5 * self.d) * self.hq * self.causal_pairs()

    def sparse_fwd_flops(self) -> float:
        return 2.0 * (2 * self.d) * self.hq * self.selected_pairs()

    def sparse_bwd_flops(self) -> float:
        return 2.0 * (5 * self.d) * self.hq * self.selected_pairs()

    def kl_bwd_flops(self, dense: bool = False) -> float:
        pairs = self.causal_pairs() if dense else self.selected_pairs()
        return 2.0 * (self.d * self.hq + 3 * self.di * self.hkv) * pairs


@dataclass
class Bench:
    """Timed callables of one impl at one case (see the module docstring)."""

    fwd: Optional[Callable[[], object]]
    fwdbwd: Optional[Callable[[], object]] = None
    fwd_flops: float = 0.0
    fwdbwd_flops: float = 0.0
    grad_to_none: List[torch.Tensor] = field(default_factory=list)
    note: str = ""
    #: The selection the impl ran on (a kind of bench/selections.py) and its measured U8;
    #: None for impls without a block selection (dense, index-only).
    selection: Optional[str] = None
    u8: Optional[float] = None


Factory = Callable[[Case], Bench]
_REGISTRY: Dict[str, Factory] = {}
_DESCRIPTIONS: Dict[str, str] = {}
_USES_SELECTION: Dict[str, bool] = {}


def register(name: str, description: str = "", uses_selection: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(case) -> Bench`` under ``name`` (unique).
    ``uses_selection``: the impl runs on ``case.selection`` (the harness times it once per
    selection kind; other impls once per length)."""

    def deco(fn: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"benchmark impl {name!r} is registered twice")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().split("\n")[0]
        _USES_SELECTION[name] = uses_selection
        return fn

    return deco


def uses_selection(name: str) -> bool:
    return _USES_SELECTION.get(name, False)


def get(name: str) -> Factory:
    if name not in _REGISTRY:
        raise KeyError(f"unknown benchmark impl {name!r}; registered: {', '.join(names()) or 'none'}")
    return _REGISTRY[name]


def names() -> List[str]:
    return list(_REGISTRY)


def describe() -> Dict[str, str]:
    return dict(_DESCRIPTIONS)


__all__ = ["Bench", "Case", "Skip", "register", "get", "names", "describe", "uses_selection"]

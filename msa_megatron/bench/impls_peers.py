"""Peer implementations outside this project, on MSA's own per-token selections.

* ``fla-nsa``: flash-linear-attention's Native Sparse Attention selected-block kernel
  (``fla.ops.nsa.parallel_nsa`` of the pure-Python ``fla-core`` wheel, 0.6.x), given the
  same ``block_indices`` as the MSA main branch: only its selected-attention branch runs
  (no compression / sliding-window gates). Its forward is query-outer (one query x the G
  heads of a group per program, K/V blocks loaded per query), its backward dQ query-side
  and dK/dV over a CSR of the selection. Needs G = hq / hkv a power of two >= 16 (the
  paper layout has 16). Unused slots (-1) are skipped by fla itself.
"""

from __future__ import annotations

import torch

from . import selections as sel_mod
from .impls_main import _need_cuda, _qkv, _randn
from .registry import Bench, Case, Skip, register


@register("fla-nsa", "flash-linear-attention NSA selected-block kernel (fla-core 0.6.x) on the same selection",
          uses_selection=True)
def fla_nsa(case: Case) -> Bench:
    _need_cuda(case)
    try:
        import fla
        from fla.ops.nsa import parallel_nsa
    except ImportError as exc:
        raise Skip(f"fla-core not importable ({exc}); carry fla_core-0.6.0-py3-none-any.whl") from None
    g = case.hq // case.hkv
    if g < 16 or g & (g - 1):
        raise Skip(f"fla NSA needs hq/hkv a power of two >= 16, got {g}")
    grad = not case.fwd_only
    sel = sel_mod.make_selection(case)
    block_indices = sel.transpose(1, 2).contiguous()  # [b, L, hkv, K], -1 = unused
    q, k, v = _qkv(case, grad)
    scale = case.d ** -0.5
    kw = dict(block_indices=block_indices, block_counts=case.topk, block_size=case.block, scale=scale)

    def fwd():
        with torch.no_grad():
            return parallel_nsa(q, k, v, **kw)

    fwdbwd = None
    if grad:
        do = _randn(case, tuple(q.shape), 5)

        def fwdbwd():
            parallel_nsa(q, k, v, **kw).backward(do)

    return Bench(fwd=fwd, fwdbwd=fwdbwd, fwd_flops=case.sparse_fwd_flops(),
                 fwdbwd_flops=case.sparse_fwd_flops() + case.sparse_bwd_flops(), grad_to_none=[q, k, v],
                 note=f"fla-core {getattr(fla, '__version__', '?')}, selected branch only",
                 selection=sel_mod.describe(case), u8=sel_mod.measured_u8(case, sel))

"""The one dispatch point for the MSA op.

``msa_attention`` has the reference's signature. With ``backend='auto'`` it runs the
Triton kernels on CUDA tensors and the pure-PyTorch reference elsewhere; the choice is
logged once per (backend, reason). ``backend='triton'`` without CUDA or without the
kernels is an error, never a silent fallback."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import naive
from ..config import MSAConfig

from .common import ANNOUNCED as _announced, announce as _announce  # noqa: F401  (one log-once set for ops)

log = logging.getLogger("msa_megatron.ops")


def triton_kernels_available() -> Tuple[bool, str]:
    """(available, reason) for the Triton MSA kernels on this process."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from . import triton_op  # noqa: F401
    except ImportError as exc:  # kernels not built into this checkout or triton missing
        return False, f"Triton kernels not importable ({exc})"
    return True, "CUDA device present"


def resolve_backend(cfg: MSAConfig, device: torch.device) -> str:
    """'triton' or 'reference' for tensors on ``device``, per ``cfg.backend``."""
    if cfg.backend == "reference":
        _announce("reference-forced", "MSA: running the pure-PyTorch reference (msa.backend=reference)")
        return "reference"
    ok, reason = triton_kernels_available() if device.type == "cuda" else (False, f"tensors on {device.type}")
    if cfg.backend == "triton":
        if not ok:
            raise RuntimeError(f"msa.backend=triton cannot run: {reason}; use msa.backend=auto or reference")
        return "triton"
    if ok:
        _announce("triton-auto", "MSA: running the Triton kernels (msa.backend=auto, CUDA)")
        return "triton"
    _announce(f"reference-auto-{reason}", f"MSA: Triton kernels cannot run ({reason}); running the pure-PyTorch reference instead")
    return "reference"


def msa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    iq: Optional[Tensor],
    ik: Optional[Tensor],
    cfg: MSAConfig,
    q_pos: Optional[Tensor] = None,
    mode: Optional[str] = None,
    softmax_scale: Optional[float] = None,
    compute_recall: bool = False,
    block_idx: Optional[Tensor] = None,
    doc_start: Optional[Tensor] = None,
    **kernel_kwargs,
):
    """(q, k, v, iq, ik, cfg) -> (out, MSAAux); see :func:`msa_megatron.ops.naive.msa_attention`.
    ``block_idx`` (from :func:`msa_select`) skips the op's own selection; ``doc_start`` [b, sq]
    masks packed documents (docs/packed.md). ``kernel_kwargs`` (e.g. ``compute_kl``) go to the
    Triton op only."""
    kwargs = dict(q_pos=q_pos, mode=mode, softmax_scale=softmax_scale, compute_recall=compute_recall,
                  block_idx=block_idx)
    if doc_start is not None:
        kwargs["doc_start"] = doc_start
    if resolve_backend(cfg, q.device) == "triton":
        from .triton_op import msa_attention_triton

        return msa_attention_triton(q, k, v, iq, ik, cfg, **kwargs, **kernel_kwargs)
    return naive.msa_attention(q, k, v, iq, ik, cfg, **kwargs)


def msa_select(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Optional[Tensor] = None,
               doc_start: Optional[Tensor] = None) -> Tensor:
    """The index branch alone: int32 block indices [b, g, sq, K] (no gradient); ``doc_start``
    as in :func:`msa_attention`."""
    kw = {} if doc_start is None else {"doc_start": doc_start}
    with torch.no_grad():
        if resolve_backend(cfg, iq.device) == "triton":
            from .triton_index import index_select

            return index_select(iq, ik, cfg, q_pos, **kw)[0]
        return naive.select(iq, ik, cfg, q_pos, **kw)


__all__ = ["msa_attention", "msa_select", "resolve_backend", "triton_kernels_available"]

"""The end-to-end MSA op on the Triton kernels, with the semantics of
:func:`msa_megatron.ops.naive.msa_attention` (modes dense / msa_warmup / msa, same
:class:`~msa_megatron.ops.naive.MSAAux` fields).

Composition (forward):
    1. index branch on detached iq, ik: block selection (+ the student's LSE);
    2. main branch: sparse attention over the selection (``msa``) or dense causal attention
       (``dense`` / ``msa_warmup``), one autograd node w.r.t. q, k, v;
    3. KL distillation: one kernel call gives the KL value *and* its gradient w.r.t. iq, ik
       (teacher rebuilt from the main branch's LSE; no second attention pass); an autograd
       node w.r.t. iq, ik only returns the saved gradient times the incoming one.
So the KL never sends gradient to q/k/v and the attention output never to iq/ik.
Alternative (``KernelConfig.kl_fused``, opt-in, mode msa with a backward): the KL is computed
inside the main backward from the P it recomputes (no teacher rebuild); one autograd node
returns (out, lse, kl, entropies) and its value/stats are NaN until that backward has run.

The index branch sits behind a small seam (:data:`INDEX_BACKEND`): ``"triton"`` uses
``msa_megatron.ops.triton_index`` (the fused selection and KL-backward kernels),
``"reference"`` the pure-PyTorch reference (selection, KL terms + autograd). Switching is the
one constant (or ``MSA_INDEX_BACKEND``); a missing module is an error, never a fallback.

Dense main branch (``dense`` / ``msa_warmup``): on CUDA torch's fused SDPA ops that return the
log-sum-exp (flash for fp16/bf16 square causal, memory-efficient for fp32 or an explicit mask),
else the sparse kernel with every visible block selected, which is exactly dense causal
attention; off CUDA (the CPU tests, ``TRITON_INTERPRET=1``) always the latter. No compile step
and no donated buffers, so ``retain_graph=True`` works (see :func:`dense_plan`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..config import ATTENTION_MODES, MSAConfig
from . import naive
from . import triton_sparse_attn as _tsa
from .common import ANNOUNCED as _announced, announce as _announce  # noqa: F401  (tests discard keys)
from .common import check_positions_enabled, check_shapes, interpreting, positions
from .csr import build_csr
from .naive import MSAAux
from .triton_sparse_attn import KernelConfig, sparse_attention

log = logging.getLogger("msa_megatron.ops")

#: Index branch implementation: "triton" (ops/triton_index.py) or "reference".
INDEX_BACKEND = os.environ.get("MSA_INDEX_BACKEND", "triton")



# ----------------------------------------------------------------------------- index seam
def _index_module():
    try:
        from . import triton_index
    except ImportError as exc:
        raise ImportError(
            f"MSA index backend 'triton' needs msa_megatron.ops.triton_index ({exc}); merge the kernel-index "
            "branch or set MSA_INDEX_BACKEND=reference (msa_megatron.ops.triton_op.INDEX_BACKEND)"
        ) from exc
    return triton_index


def _backend(index_backend: Optional[str]) -> str:
    name = index_backend or INDEX_BACKEND
    if name not in ("triton", "reference"):
        raise ValueError(f"index backend {name!r} is invalid: allowed values are triton, reference")
    return name


def _select(iq: Tensor, ik: Tensor, cfg: MSAConfig, q_pos: Tensor, backend: str, given: Optional[Tensor] = None,
            need_lse: bool = True, doc_start: Optional[Tensor] = None):
    """(block_idx [b, g, sq, K] int32, index LSE over the selection [b, g, sq] or None, the
    index kernels' reverse index or None, the selection's CSR or None).

    The CSR (ops/csr.py: key block -> the (query, slot) pairs that chose it) is built here,
    once per op call, right after the selection; the index LSE, the KL kernel and the main
    kernels all cut their work items from it. ``given``: a selection computed earlier (context
    parallelism selects before gathering K/V). ``need_lse=False`` (no KL: prefill) skips the
    index LSE and the CSR (the main kernels then build their own; the selection may run in
    FP8: ``IndexConfig.fp8_prefill``)."""
    if given is not None:
        expected = (iq.shape[0], iq.shape[2], iq.shape[1], cfg.topk)
        if tuple(given.shape) != expected or given.dtype != torch.int32:
            raise ValueError(f"block_idx must be int32 {expected}; got {given.dtype} {tuple(given.shape)}")
        block_idx = given
    elif backend == "reference":
        return naive.select(iq, ik, cfg, q_pos, doc_start=doc_start), None, None, None
    elif not need_lse:
        return _index_module().index_select(iq, ik, cfg, q_pos, with_lse=False, doc_start=doc_start)[0], None, None, None
    else:
        block_idx = _index_module().index_select(iq, ik, cfg, q_pos, with_lse=False, fp8=False, doc_start=doc_start)[0]
    if backend == "reference" or not need_lse:
        return block_idx, None, None, None
    ti = _index_module()
    nb = math.ceil(ik.shape[1] / cfg.block_size)
    csr = build_csr(block_idx, nb)
    plan = ti.build_reverse_index(block_idx, nb, ti._launch_config(iq.device).items_chunk, csr=csr)
    lse = ti.selected_lse(iq, ik, block_idx, cfg, q_pos, doc_start=doc_start, plan=plan)
    return block_idx, lse, plan, csr


def _check_docs(doc_start: Optional[Tensor], b: int, sq: int, q_pos: Tensor) -> Optional[Tensor]:
    """doc_start [b, sq] or [sq] (any integer dtype) -> int64 on q's device, checked once:
    0 <= doc_start <= q_pos on CPU and with MSA_CHECK_POSITIONS=1 (on CUDA a device sync)."""
    if doc_start is None:
        return None
    if doc_start.dtype.is_floating_point or doc_start.dtype == torch.bool:
        raise ValueError(f"doc_start must hold integers, got {doc_start.dtype}")
    if tuple(doc_start.shape) not in ((b, sq), (sq,)):
        raise ValueError(f"doc_start must have shape [{b}, {sq}] or [{sq}], got {tuple(doc_start.shape)}")
    ds = doc_start.to(device=q_pos.device, dtype=torch.int64).contiguous()
    if sq and (ds.device.type == "cpu" or check_positions_enabled()):
        if bool((ds < 0).any()) or bool((ds > q_pos.view(*([1] * (ds.dim() - 1)), sq)).any()):
            raise ValueError("doc_start must satisfy 0 <= doc_start[b, t] <= q_pos[t] "
                             "(its document starts at or before the query)")
    return ds


def index_resident_bytes(iq: Tensor, ik: Tensor) -> int:
    """Bytes of the index branch a training call holds through the main backward: iq, ik,
    their gradients (same dtype) and the index LSE [b, g, sq] fp32 (2.5 GiB at 1M, paper
    layout); the main kernels' partial budgets count it (triton_sparse_attn.partial_budget)."""
    b, sq, g, _ = iq.shape
    return 2 * (iq.numel() * iq.element_size() + ik.numel() * ik.element_size()) + b * g * sq * 4


@dataclass
class _KLResult:
    kl: Tensor  # 0-dim fp32, the mean KL (detached)
    d_iq: Optional[Tensor]  # d kl / d iq (times nothing), or None when not needed
    d_ik: Optional[Tensor]
    stats: Dict[str, Tensor]  # index_entropy, main_entropy (means), when available


def _kl_reference(mode: str, q, k, iq, ik, block_idx, cfg, q_pos, scale, need_grad: bool, doc_start=None) -> _KLResult:
    with torch.enable_grad():
        iq_ = iq.detach().requires_grad_(need_grad)
        ik_ = ik.detach().requires_grad_(need_grad)
        if mode == "msa":
            terms = naive.sparse_kl_terms(q, k, iq_, ik_, block_idx, cfg, q_pos, scale, doc_start=doc_start)
        else:
            terms = naive.dense_kl_terms(q, k, iq_, ik_, cfg, q_pos, scale, doc_start=doc_start)
        kl = terms.kl / terms.rows
        d_iq = d_ik = None
        if need_grad:
            d_iq, d_ik = torch.autograd.grad(kl, [iq_, ik_])
    G = q.shape[2] // k.shape[2]
    stats = {"index_entropy": terms.index_entropy / terms.rows, "main_entropy": terms.main_entropy / (terms.rows * G)}
    return _KLResult(kl.detach(), d_iq, d_ik, stats)


def _kl_triton(mode: str, q, k, iq, ik, block_idx, main_lse, index_lse, index_plan, cfg, q_pos, scale,
               doc_start=None) -> _KLResult:
    """The KL kernel's one pass gives the value, d_iq, d_ik and (``cfg.track_entropy``) the
    entropy statistics: no reference pass on this path."""
    ti = _index_module()
    stats_kw = dict(grad_scale=1.0, softmax_scale=scale, return_stats=bool(cfg.track_entropy), doc_start=doc_start)
    if mode == "msa":
        res = ti.sparse_kl_backward(q, k, iq, ik, block_idx, main_lse, index_lse, cfg, q_pos, plan=index_plan, **stats_kw)
    else:
        res = ti.dense_kl_backward(q, k, iq, ik, main_lse, cfg, q_pos, **stats_kw)
    stats: Dict[str, Tensor] = {}
    if cfg.track_entropy:
        kl, d_iq, d_ik, stats = res
    else:
        kl, d_iq, d_ik = res
    return _KLResult(kl.detach().float().reshape(()), d_iq, d_ik, stats)


#: Elements per slice of :func:`scale_grad` (64 MiB of fp32 at a time).
SCALE_SLICE = 1 << 24


def scale_grad(d: Tensor, g: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``(d.float() * g).to(d.dtype)`` (``g`` a 0-dim tensor) in slices of :data:`SCALE_SLICE`
    elements, into ``out`` (may be ``d``: in place) or a new tensor: the same rounding without
    an fp32 copy of ``d`` (2 GiB for d_iq at 1M), and without relying on how a 0-dim device
    tensor ``g`` is promoted in ``d * g`` (it may be cast to d's dtype first)."""
    out = torch.empty(d.shape, dtype=d.dtype, device=d.device) if out is None else out
    src, dst = d.reshape(-1), out.view(-1)
    g32 = g.to(torch.float32)
    for i in range(0, src.numel(), SCALE_SLICE):
        dst[i:i + SCALE_SLICE] = (src[i:i + SCALE_SLICE].float() * g32).to(d.dtype)
    return out


class _KLFromGrads(torch.autograd.Function):
    """kl as a function of (iq, ik) whose gradient was computed together with its value."""

    @staticmethod
    def forward(ctx, iq, ik, kl, d_iq, d_ik):
        ctx.save_for_backward(d_iq, d_ik)
        return kl.clone()

    @staticmethod
    def backward(ctx, g):
        d_iq, d_ik = ctx.saved_tensors
        giq = scale_grad(d_iq, g) if ctx.needs_input_grad[0] else None
        gik = scale_grad(d_ik, g) if ctx.needs_input_grad[1] else None
        return giq, gik, None, None, None


class _SparseAttentionKLFn(torch.autograd.Function):
    """Sparse main branch whose backward also computes the indexer KL (kernel_config.kl_fused):
    (q, k, v, iq, ik) -> (out, lse, kl, index_entropy, main_entropy).

    The KL's teacher is the head-mean of the P the main backward recomputes, so its value and
    statistics exist only once that backward has run: the forward returns NaN placeholders (views
    of one buffer) that the backward fills in place. out depends on q, k, v only; kl on iq, ik
    only (the teacher is detached), as in the separate path: dkl scales d_iq, d_ik, dout the rest."""

    @staticmethod
    def forward(ctx, q, k, v, iq, ik, block_idx, block_size, q_pos, scale, config, deterministic, index_lse,
                index_scale, doc_start=None, csr=None):
        cfg = config or _tsa.default_config()
        block_idx = block_idx.contiguous()
        b, sq, hq, d = q.shape
        plan = None
        if sq:  # one reverse index for the forward and the backward
            _tsa._check_inputs(q, k, v, block_idx, block_size)
            need = _tsa.partial_bytes_per_pos(
                q, k.shape[2], block_idx.shape[-1], block_size, fwd=True, bwd=True,
                deterministic=deterministic, config=cfg, kl_di=iq.shape[-1],
                dq_partial_dtype=q.dtype if cfg.dq_partial_lowp else torch.float32)
            resident = (_tsa.main_resident_bytes(q.shape, k.shape, block_idx.shape[-1], q.dtype, bwd=True)
                        + index_resident_bytes(iq, ik) + (iq.numel() + ik.numel()) * 4)  # + the fused KL's fp32 grads
            plan = _tsa.build_plan(block_idx, k.shape[1], block_size, need, cfg, resident_bytes=resident, csr=csr)
        out, lse = _tsa.sparse_attention_fwd(q, k, v, block_idx, block_size, q_pos, scale, config=cfg, plan=plan,
                                             doc_start=doc_start)
        ctx.doc_start, ctx.csr = doc_start, csr
        holder = torch.full((3,), float("nan"), dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, block_idx, q_pos, iq, ik, index_lse)
        ctx.holder = holder.data  # filled by the backward; .data: no version bump on the outputs
        ctx.block_size, ctx.scale, ctx.cfg, ctx.plan, ctx.det, ctx.iscale = (
            block_size, scale, cfg, plan, deterministic, index_scale)
        kl, ent_i, ent_m = holder.unbind(0)
        ctx.mark_non_differentiable(lse, ent_i, ent_m)
        return out, lse, kl, ent_i, ent_m

    @staticmethod
    def backward(ctx, dout, dlse, dkl, d_ent_i, d_ent_m):
        q, k, v, out, lse, block_idx, q_pos, iq, ik, index_lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, res = _tsa.sparse_attention_bwd(
            dout, q, k, v, out, lse, block_idx, ctx.block_size, q_pos, ctx.scale, deterministic=ctx.det,
            config=ctx.cfg, plan=ctx.plan, kl=_tsa.FusedKL(iq, ik, index_lse, ctx.iscale), doc_start=ctx.doc_start,
            csr=ctx.csr)
        ctx.holder.copy_(torch.stack([res.kl, res.stats["index_entropy"], res.stats["main_entropy"]]))
        d_iq = d_ik = None
        if dkl is not None:
            if ctx.needs_input_grad[3]:
                d_iq = (res.d_iq * dkl).to(iq.dtype)
            if ctx.needs_input_grad[4]:
                d_ik = (res.d_ik * dkl).to(ik.dtype)
        return dq, dk, dv, d_iq, d_ik, None, None, None, None, None, None, None, None, None, None


class _UnionAttentionKLFn(torch.autograd.Function):
    """v2 training path (mode msa with gradients, main_impl union/auto->union): union-tile
    forward; backward = KV-outer dK/dV (no dQ half) + union-tile dQ with the indexer KL fused
    (teacher = head mean of the tile's P, student over the same tokens, d_iq in registers,
    d_ik by a deterministic owner-side pass): (q, k, v, iq, ik) -> (out, lse, kl, index_entropy,
    main_entropy). No separate KL pass. As with ``_SparseAttentionKLFn``, kl and the entropies
    are NaN placeholders until the backward has run (it fills them in place); kl depends on
    iq, ik only, out on q, k, v only."""

    @staticmethod
    def forward(ctx, q, k, v, iq, ik, block_idx, block_size, q_pos, scale, config, lists, index_lse, index_scale,
                doc_start=None, csr=None):
        from . import triton_union as _tu

        cfg = config or _tsa.default_config()
        block_idx = block_idx.contiguous()
        out, lse = _tu.union_attention_fwd(q, k, v, block_idx, block_size, q_pos, scale, config=cfg, lists=lists,
                                           doc_start=doc_start)
        ctx.doc_start, ctx.csr = doc_start, csr
        holder = torch.full((3,), float("nan"), dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, block_idx, q_pos, iq, ik, index_lse)
        ctx.holder = holder.data  # filled by the backward; .data: no version bump on the outputs
        ctx.block_size, ctx.scale, ctx.cfg, ctx.lists, ctx.iscale = block_size, scale, cfg, lists, index_scale
        kl, ent_i, ent_m = holder.unbind(0)
        ctx.mark_non_differentiable(lse, ent_i, ent_m)
        ctx.set_materialize_grads(False)  # a gradient of the KL alone sends none to q, k, v (and vice versa)
        return out, lse, kl, ent_i, ent_m

    @staticmethod
    def backward(ctx, dout, dlse, dkl, d_ent_i, d_ent_m):
        from . import triton_union as _tu

        q, k, v, out, lse, block_idx, q_pos, iq, ik, index_lse = ctx.saved_tensors
        lm_grad = dout is not None
        if dout is None:
            dout = torch.zeros_like(out)
        # the KV-outer dK/dV pass's plan (union_dkdv="kv"; no dQ partials: one chunk) over the op's
        # CSR, handed over without a reference kept here: the union backward drops it (and so the
        # CSR, 256 MiB at 1M) before its dQ pass
        dq, dk, dv, res = _tu.union_attention_bwd(
            dout, q, k, v, out, lse, block_idx, ctx.block_size, q_pos, ctx.scale, config=ctx.cfg, lists=ctx.lists,
            plan=_take_dkdv_plan(ctx, block_idx, k.shape[1]),
            kl=_tsa.FusedKL(iq, ik, index_lse, ctx.iscale), doc_start=ctx.doc_start)
        ctx.holder.copy_(torch.stack([res.kl, res.stats["index_entropy"], res.stats["main_entropy"]]))
        d_iq = d_ik = None
        if dkl is not None:  # in place: d_iq is already in iq's dtype, d_ik the fp32 accumulator (0.5 GiB at 1M)
            if ctx.needs_input_grad[3]:
                d_iq = scale_grad(res.d_iq, dkl, out=res.d_iq).to(iq.dtype)
            if ctx.needs_input_grad[4]:
                d_ik = res.d_ik.mul_(dkl).to(ik.dtype)
        if not lm_grad:
            dq = dk = dv = None
        return dq, dk, dv, d_iq, d_ik, None, None, None, None, None, None, None, None, None, None


def _take_dkdv_plan(ctx, block_idx: Tensor, sk: int):
    """The KV-outer dK/dV plan of a union backward from ``ctx.csr``, which it clears (the plan
    then holds the only reference to the CSR's order); None without a CSR or with the union dK/dV."""
    csr, ctx.csr = ctx.csr, None
    if csr is None or ctx.cfg.union_dkdv != "kv":
        return None
    return _tsa.build_plan(block_idx, sk, ctx.block_size, 0, ctx.cfg, csr=csr)


def _union_kl_lists(mode: str, backend: str, need_grad: bool, compute_kl: bool, q: Tensor, k: Tensor,
                    block_idx: Tensor, kernel_config: Optional[KernelConfig]):
    """The union lists when the v2 union path with the fused KL runs (mode msa, Triton index
    backend, iq/ik needing gradients, main_impl resolving to union), else None."""
    kc = kernel_config or _tsa.default_config()
    if not (compute_kl and mode == "msa" and backend == "triton" and need_grad):
        return None
    if kc.kl_fused and kc.main_impl == "auto":
        return None  # an explicit kl_fused=1 keeps the KV-outer fused KL unless main_impl=union is asked for
    from . import triton_union as _tu

    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    impl, lists = _tu.resolve_main_impl(kc, block_idx, q.shape[2] // k.shape[2], q.dtype, d=q.shape[3], with_kl=True)
    if impl != "union":
        return None
    _announce("kl-union", "MSA: indexer KL fused into the union-tile dQ pass (main_impl union): aux.kl and the "
                          "entropy stats are NaN until the backward has run")
    return lists


def _kl_path(mode: str, backend: str, need_grad: bool, kernel_config: Optional[KernelConfig]) -> str:
    """'fused' (KL inside the main backward) or 'separate' (the KL kernel, in the forward);
    logged once per path and reason, so a run's log says which one it uses."""
    kc = kernel_config or _tsa.default_config()
    if backend != "triton":
        if kc.kl_fused:
            raise ValueError("kernel_config kl_fused=1 needs the Triton index backend (it consumes the Triton index LSE)")
        return "separate"  # the reference KL terms with autograd
    if not kc.kl_fused:
        _announce("kl-separate", "MSA: indexer KL by the separate KL kernel in the forward "
                                 "(kernel_config kl_fused=0)")
        return "separate"
    if mode != "msa":
        _announce("kl-separate-warmup", f"MSA: mode {mode}: dense-teacher KL by the separate KL kernel "
                                        "(kl_fused applies to mode msa only)")
        return "separate"
    if not need_grad:
        _announce("kl-separate-nograd", "MSA: no gradient for iq/ik: KL by the separate KL kernel in the forward "
                                        "(kl_fused needs a backward)")
        return "separate"
    _announce("kl-fused", "MSA: indexer KL fused into the main backward (kernel_config kl_fused=1): aux.kl and the "
                          "entropy stats are NaN until that backward has run")
    return "fused"


# ----------------------------------------------------------------------------- dense main branch
#: Dense main-branch kernels (``dense`` / ``msa_warmup``): "auto" picks per call (see
#: :func:`dense_plan`); "flash", "efficient" or "triton" force one (an error where it cannot run).
DENSE_IMPLS = ("auto", "flash", "efficient", "triton")
DENSE_IMPL = "auto"

#: Largest explicit causal mask (bytes, [sq, sk] in q's dtype, kept for the backward) handed to
#: the efficient kernel for arbitrary q_pos; above it the Triton kernel with the full selection runs.
MASK_BUDGET_BYTES = 256 << 20


@dataclass(frozen=True)
class DensePlan:
    """Which kernel runs the dense main branch and why (logged once per distinct reason)."""

    impl: str  # "flash" | "efficient" | "triton"
    square: bool  # query i sees keys 0..i (keys past the last query dropped): is_causal, no mask
    reason: str


def dense_plan(device_type: str, dtype: torch.dtype, d: int, sq: int, sk: int, square: bool,
               capability: Tuple[int, int] = (9, 0), impl: str = "auto", strict_determinism: bool = False) -> DensePlan:
    """Pure dispatch rule (no tensors, testable on CPU).

    CUDA: torch's flash-attention op when fp16/bf16, head dim a multiple of 8 up to 256, sm80+
    and a square causal pattern (flash's is_causal is only unambiguous when sq == sk); else
    torch's memory-efficient op (any of fp32/fp16/bf16; is_causal when square, otherwise an
    explicit additive mask up to MASK_BUDGET_BYTES); else the Triton sparse kernel with every
    visible block selected (exact, any q_pos). Off CUDA: always the Triton kernel (interpreter).
    ``strict_determinism`` (torch.use_deterministic_algorithms(True) without warn_only): the
    efficient op's backward would refuse to run, so it is never chosen.
    Both torch ops return the natural-log LSE and have autograd formulas (no compile step, no
    donated buffers: retain_graph=True works)."""
    if impl not in DENSE_IMPLS:
        raise ValueError(f"dense impl {impl!r} is invalid: allowed values are {', '.join(DENSE_IMPLS)}")
    mask_bytes = sq * (-(-sk // 16) * 16) * torch.empty((), dtype=dtype).element_size()
    why_not = {}
    if device_type != "cuda":
        why_not["flash"] = why_not["efficient"] = f"tensors on {device_type}"
    elif sq == 0 or sk == 0:
        why_not["flash"] = why_not["efficient"] = "empty sequence"
    else:
        if dtype not in (torch.float16, torch.bfloat16):
            why_not["flash"] = f"{str(dtype)[6:]} inputs (flash needs fp16/bf16)"
        elif d % 8 or d > 256:
            why_not["flash"] = f"head dim {d} (flash needs a multiple of 8 up to 256)"
        elif tuple(capability) < (8, 0):
            why_not["flash"] = f"sm{capability[0]}{capability[1]} (flash needs sm80+)"
        elif not square:
            why_not["flash"] = "q_pos / sq != sk needs an explicit causal mask"
        if d % 8:
            why_not["efficient"] = f"head dim {d} (efficient attention here needs a multiple of 8)"
        elif strict_determinism:
            why_not["efficient"] = "deterministic algorithms on (efficient attention's backward is not deterministic)"
        elif not square and mask_bytes > MASK_BUDGET_BYTES:
            why_not["efficient"] = (f"the explicit causal mask would take {mask_bytes >> 20} MiB "
                                    f"(> MASK_BUDGET_BYTES {MASK_BUDGET_BYTES >> 20} MiB)")
    if impl != "auto":
        if impl in why_not:
            raise ValueError(f"dense impl {impl!r} cannot run here: {why_not[impl]}")
        return DensePlan(impl, square, f"dense impl {impl} requested")
    if "flash" not in why_not:
        return DensePlan("flash", square, "fp16/bf16, square causal pattern")
    if "efficient" not in why_not:
        how = "is_causal" if square else f"explicit causal mask ({mask_bytes >> 20} MiB)"
        return DensePlan("efficient", square, f"{why_not['flash']}; {how}")
    return DensePlan("triton", square, f"{why_not['efficient']}: Triton kernel, every visible block selected")


def _square_causal(q_pos: Tensor, default_pos: bool, sq: int, sk: int) -> bool:
    """Query i sees exactly keys 0..i: default positions with sq == sk, or q_pos == 0..sq-1."""
    if default_pos:
        return sq == sk
    return 0 < sq <= sk and bool(torch.equal(q_pos, torch.arange(sq, device=q_pos.device, dtype=q_pos.dtype)))


# The two torch ops, behind names the CPU tests can replace with the CPU op of the same contract.
def _flash_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return res[0], res[1]


def _efficient_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], causal: bool,
                  scale: float) -> Tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return res[0], res[1]


def causal_bias(q_pos: Tensor, sk: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [sq, sk] (0 where key <= q_pos, -inf after), a view of rows padded to a
    multiple of 16 elements (the memory-efficient kernel's bias alignment)."""
    sk_pad = -(-sk // 16) * 16
    keys = torch.arange(sk_pad, device=q_pos.device)
    bias = torch.zeros(q_pos.shape[0], sk_pad, device=q_pos.device, dtype=dtype)
    return bias.masked_fill_(keys[None, :] > q_pos[:, None], float("-inf"))[:, :sk]


def _sdpa_dense(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, plan: DensePlan, scale: float) -> Tuple[Tensor, Tensor]:
    """Dense causal GQA through one of torch's fused SDPA ops: (out [b, sq, hq, d], lse [b, hq, sq]
    fp32, natural log, detached). K/V heads are repeated per query head (the ops' GQA support
    varies by version; autograd sums the repeats' gradients back)."""
    b, sq, hq, d = q.shape
    G = hq // k.shape[2]
    if plan.square:  # keys after the last query's position are never visible
        k, v = k[:, :sq], v[:, :sq]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else k.transpose(1, 2)
    vt = v.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else v.transpose(1, 2)
    if plan.impl == "flash":
        out, lse = _flash_op(qt, kt, vt, scale)
    else:
        bias = None if plan.square else causal_bias(q_pos, k.shape[1], q.dtype)[None, None].expand(b, hq, sq, -1)
        out, lse = _efficient_op(qt, kt, vt, bias, plan.square, scale)
    # efficient attention pads the LSE's query axis (to a multiple of 32)
    return out.transpose(1, 2).contiguous(), lse[:, :, :sq].detach().float().contiguous()


def full_selection(b: int, g: int, q_pos: Tensor, sk: int, block_size: int,
                   doc_start: Optional[Tensor] = None) -> Tensor:
    """block_idx selecting every causally visible block: [b, g, sq, nb] int32 (-1 = future).
    ``doc_start`` [b, sq] / [sq]: the blocks doc_start // B .. own block (the document's), in
    ascending order, -1 padding last."""
    nb = math.ceil(sk / block_size)
    blk = torch.arange(nb, device=q_pos.device, dtype=torch.int64)
    own = (q_pos.long() // block_size)[:, None]
    if doc_start is None:
        sel = torch.where(blk[None, :] <= own, blk[None, :], -1)
        return sel.to(torch.int32).expand(b, g, -1, -1).contiguous()
    first = (doc_start.long() // block_size).expand(b, -1)[..., None]  # [b, sq, 1]
    cand = first + blk  # the document's blocks first, first + 1, ... up to the own block
    sel = torch.where(cand <= own[None], cand, -1)
    return sel.to(torch.int32)[:, None].expand(b, g, -1, -1).contiguous()


def dense_attention_triton(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, default_pos: bool, scale: float,
                           block_size: int, kernel_config: Optional[KernelConfig] = None,
                           deterministic: bool = True, impl: Optional[str] = None,
                           doc_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Dense causal main branch: (out, lse [b, hq, sq] fp32 natural log, detached);
    out differentiable w.r.t. q, k, v, and the graph may be retained (retain_graph=True).

    ``impl`` (default :data:`DENSE_IMPL`): see :func:`dense_plan`. The chosen kernel and the
    reason are logged once. With "auto", a torch op that rejects the inputs at launch (a
    RuntimeError, e.g. a kernel missing for this GPU) is logged and replaced by the Triton
    kernel; a forced impl raises instead. ``deterministic`` applies to the Triton kernel; the
    torch ops follow ``torch.use_deterministic_algorithms``.

    ``doc_start`` (packed documents, checked by the caller): always the Triton kernel with every
    visible same-document block selected (exact; no torch SDPA document mask yet), logged once."""
    impl = impl or DENSE_IMPL
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    if doc_start is not None:
        if impl not in ("auto", "triton"):
            raise ValueError(f"dense impl {impl!r} cannot run with doc_start (packed documents): allowed values "
                             "are auto, triton")
        _announce("dense-docs", "MSA dense main branch with packed documents: Triton kernel with every visible "
                                "same-document block selected (exact; torch SDPA has no document mask here yet)")
        sel = full_selection(b, k.shape[2], q_pos, sk, block_size, doc_start)
        return sparse_attention(q, k, v, sel, block_size, q_pos, scale, config=kernel_config,
                                deterministic=deterministic, doc_start=doc_start)
    cuda = q.device.type == "cuda"
    square = cuda and sq > 0 and _square_causal(q_pos, default_pos, sq, sk)
    cap = torch.cuda.get_device_capability(q.device) if cuda else (0, 0)
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    plan = dense_plan(q.device.type, q.dtype, d, sq, sk, square, cap, impl, strict)
    # once per (kernel, pattern, dtype, head dim): a bounded set, whatever the lengths
    _announce(f"dense-{plan.impl}-{plan.square}-{q.dtype}-{d}", f"MSA dense main branch: {plan.impl} ({plan.reason})")
    if plan.impl != "triton":
        try:
            return _sdpa_dense(q, k, v, q_pos, plan, scale)
        except RuntimeError as exc:
            if impl != "auto":
                raise
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            _announce(f"dense-fail-{plan.impl}-{q.dtype}-{d}",
                      f"MSA dense main branch: torch {plan.impl} attention failed for {str(q.dtype)[6:]} head dim {d} "
                      f"({msg}); running the Triton kernel with every visible block selected instead")
    sel = full_selection(b, k.shape[2], q_pos, sk, block_size)
    return sparse_attention(q, k, v, sel, block_size, q_pos, scale, config=kernel_config, deterministic=deterministic)


# ----------------------------------------------------------------------------- the op
def msa_attention_triton(
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
    *,
    kernel_config: Optional[KernelConfig] = None,
    deterministic: bool = True,
    index_backend: Optional[str] = None,
    compute_kl: bool = True,
    doc_start: Optional[Tensor] = None,
) -> Tuple[Tensor, MSAAux]:
    """(q, k, v, iq, ik, cfg) -> (out, MSAAux), as :func:`msa_megatron.ops.naive.msa_attention`.

    ``aux.kl`` is the mean KL, differentiable w.r.t. iq and ik only; ``aux.block_idx`` the
    selection (msa and msa_warmup); ``aux.lse`` the main branch's LSE; ``aux.stats`` holds
    index_entropy / main_entropy (detached means) and, with ``compute_recall``, selection recall (a
    dense reference pass: call on sampled steps). ``deterministic=False`` lets the sparse
    backward accumulate dQ with atomics (faster, not bitwise reproducible).
    ``compute_kl=False`` (inference / prefill, not in the reference) skips the KL and the
    entropy statistics: ``aux.kl`` is None. ``kernel_config.kl_fused`` (mode msa, iq/ik needing
    gradients): the KL is computed inside the main backward; ``aux.kl`` and the entropy stats
    are then NaN until that backward has run (logged once; see docs/kernels_main.md).
    ``doc_start`` [b, sq] or [sq] (int): packed documents (docs/packed.md), keys before each
    query's document start are invisible to selection, main branch and KL in every mode."""
    mode = mode or cfg.mode
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode={mode!r} is invalid: allowed values are dense, msa_warmup, msa")
    check_shapes(q, k, v)
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"msa_attention_triton needs CUDA tensors (got {q.device}); CPU runs only under TRITON_INTERPRET=1")
    backend = _backend(index_backend)
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    default_pos = q_pos is None
    pos = positions(q_pos, sq, sk, q.device)
    ds = _check_docs(doc_start, b, sq, pos)
    aux = MSAAux()
    dense_kw = dict(block_size=cfg.block_size, kernel_config=kernel_config, deterministic=deterministic, doc_start=ds)
    if mode == "dense" or iq is None:
        if mode != "dense":
            raise ValueError(f"mode {mode!r} needs the index branch inputs iq and ik")
        out, aux.lse = dense_attention_triton(q, k, v, pos, default_pos, scale, **dense_kw)
        return out, aux
    if ik is None:
        raise ValueError(f"mode {mode!r} needs the index branch inputs iq and ik")
    if iq.shape[2] != g:
        raise ValueError(f"index heads ({iq.shape[2]}) must equal KV heads ({g}): one per GQA group")
    iq_d, ik_d = iq.detach(), ik.detach()
    block_idx, index_lse, index_plan, csr = _select(iq_d, ik_d, cfg, pos, backend, given=block_idx,
                                                    need_lse=compute_kl, doc_start=ds)
    aux.block_idx = block_idx
    need_grad = torch.is_grad_enabled() and (iq.requires_grad or ik.requires_grad)
    lists = _union_kl_lists(mode, backend, need_grad, compute_kl, q, k, block_idx, kernel_config)
    fused = None
    if lists is not None:  # v2: union tile, KL inside its dQ pass (docs/kernels_main.md "v2: union tile")
        fused = _UnionAttentionKLFn.apply(q, k, v, iq, ik, block_idx, cfg.block_size, pos, scale, kernel_config, lists,
                                          index_lse, cfg.index_softmax_scale, ds, csr)
    elif compute_kl and _kl_path(mode, backend, need_grad, kernel_config) == "fused":
        fused = _SparseAttentionKLFn.apply(q, k, v, iq, ik, block_idx, cfg.block_size, pos, scale, kernel_config,
                                           deterministic, index_lse, cfg.index_softmax_scale, ds, csr)
    if fused is not None:  # KL and its stats come from the main backward (NaN until it has run)
        out, aux.lse, aux.kl, ent_i, ent_m = fused
        if cfg.track_entropy:
            aux.stats.update(index_entropy=ent_i, main_entropy=ent_m)
    else:
        if mode == "msa":
            extra = index_resident_bytes(iq, ik) if compute_kl else 0
            out, aux.lse = sparse_attention(q, k, v, block_idx, cfg.block_size, pos, scale,
                                            config=kernel_config, deterministic=deterministic, doc_start=ds, csr=csr,
                                            extra_resident_bytes=extra)
        else:
            out, aux.lse = dense_attention_triton(q, k, v, pos, default_pos, scale, **dense_kw)
        if compute_kl:
            qd, kd = q.detach(), k.detach()
            if backend == "reference":
                res = _kl_reference(mode, qd, kd, iq_d, ik_d, block_idx, cfg, pos, scale, need_grad, doc_start=ds)
            else:
                res = _kl_triton(mode, qd, kd, iq_d, ik_d, block_idx, aux.lse, index_lse, index_plan, cfg, pos, scale,
                                 doc_start=ds)
            aux.kl = _KLFromGrads.apply(iq, ik, res.kl, res.d_iq, res.d_ik) if need_grad else res.kl
            aux.stats.update(res.stats)
    if compute_recall:
        aux.stats["recall"] = naive.selection_recall(q.detach(), k.detach(), block_idx, cfg.block_size, pos, scale,
                                                         doc_start=ds)
    return out, aux


__all__ = ["DENSE_IMPL", "DENSE_IMPLS", "DensePlan", "INDEX_BACKEND", "causal_bias", "dense_attention_triton",
           "dense_plan", "full_selection", "msa_attention_triton"]

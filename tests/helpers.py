"""Shared test helpers: relative errors, NaN poisoning of kernel outputs, fp64 reference
runs of the MSA op with the LM and KL gradients taken separately, random inputs, timing.

Used by tests/gpu (CUDA, and their CPU-interpreter subset) and tests/ops. Importing this
module imports no Triton kernel (the interpreter switch must be set before that)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

LEAVES = ("q", "k", "v", "iq", "ik")


# ----------------------------------------------------------------------------- errors
def rel_err(a: Optional[Tensor], b: Optional[Tensor]) -> float:
    """Relative Frobenius error ||a - b|| / ||b|| in fp64 (NaN anywhere in a -> nan, so a
    poisoned element that was never written fails every tolerance)."""
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if torch.isnan(a).any() or torch.isinf(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_abs(a: Tensor) -> float:
    return a.detach().abs().max().item() if a.numel() else 0.0


def check_errors(errs: Dict[str, float], tol: Dict[str, float], where: str) -> None:
    """Assert every errs[name] <= tol[name] (a name without tolerance is an error: no
    unchecked metric); the message lists all errors, so one failure shows the whole picture."""
    missing = [n for n in errs if n not in tol]
    assert not missing, f"{where}: no tolerance for {missing}"
    bad = {n: e for n, e in errs.items() if not e <= tol[n]}  # NaN fails
    assert not bad, f"{where}: above tolerance {{{', '.join(f'{n}: {e:.3g} > {tol[n]:.3g}' for n, e in bad.items())}}}" \
                    f" (all: {', '.join(f'{n}={e:.2g}' for n, e in errs.items())})"


# ----------------------------------------------------------------------------- poisoning
@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Kernel outputs pre-filled with NaN / sentinels (both kernel modules), so an element a
    kernel fails to write shows up in the comparison."""
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T

    old = (T.POISON_OUTPUTS, TI.POISON_OUTPUTS)
    T.POISON_OUTPUTS = TI.POISON_OUTPUTS = True
    try:
        yield
    finally:
        T.POISON_OUTPUTS, TI.POISON_OUTPUTS = old


# ----------------------------------------------------------------------------- inputs
def make_inputs(b: int, sq: int, sk: int, hq: int, g: int, d: int, di: int, seed: int, dtype: torch.dtype,
                device: str, zero_q: bool = False) -> List[Tensor]:
    """q, k, v, iq, ik leaves (requires_grad) drawn on the CPU from ``seed`` (same values on
    every device), cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = mk(b, sq, hq, d)
    if zero_q:  # uniform teacher
        q = torch.zeros_like(q).requires_grad_()
    return [q, mk(b, sk, g, d), mk(b, sk, g, d), mk(b, sq, g, di), mk(b, sk, di)]


def random_positions(sq: int, sk: int, seed: int, device: str) -> Tensor:
    """sq sorted distinct positions in [0, sk) that include 0 and sk - 1."""
    gen = torch.Generator().manual_seed(seed)
    mid = torch.randperm(sk - 2, generator=gen)[: max(0, sq - 2)] + 1
    return torch.sort(torch.cat([torch.tensor([0, sk - 1]), mid])).values[:sq].to(device)


# ----------------------------------------------------------------------------- separate LM / KL gradients
@dataclass
class OpResult:
    out: Tensor
    lse: Optional[Tensor]
    kl: Optional[Tensor]
    block_idx: Optional[Tensor]
    stats: Dict[str, Tensor]
    lm_grads: Dict[str, Optional[Tensor]]  # d <out, dout> / d(q, k, v)
    kl_grads: Dict[str, Optional[Tensor]] = field(default_factory=dict)  # d kl / d(iq, ik)


def random_block_selection(L: int, seed: int, groups: int, block: int, topk: int, device: str) -> Tensor:
    """[1, groups, L, topk] int32, generated on ``device`` (fast at 1M tokens on a GPU): own block
    + topk-1 distinct random earlier blocks per (query, group), ascending, -1 padding."""
    nb = math.ceil(L / block)
    out = torch.full((1, groups, L, topk), -1, dtype=torch.int32, device=device)
    blk = torch.arange(nb, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, (1 << 27) // (groups * nb))
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        own = torch.arange(s0, s1, device=device) // block
        sc = torch.rand(1, groups, s1 - s0, nb, device=device, generator=g)
        sc.masked_fill_(blk[None, :] > own[:, None], -1.0).masked_fill_(blk[None, :] == own[:, None], 2.0)
        val, idx = torch.topk(sc, min(topk, nb), dim=-1)
        idx = torch.sort(torch.where(val >= 0, idx, torch.full_like(idx, nb)), dim=-1).values
        out[:, :, s0:s1, : idx.shape[-1]] = torch.where(idx == nb, -1, idx).to(torch.int32)
    return out


def run_separate(fn: Callable, leaves: Sequence[Tensor], dout: Tensor, kl_first: bool = False) -> OpResult:
    """out, aux = fn(*leaves); the LM loss <out, dout> and the KL are differentiated one after
    the other with retain_graph=True (the pattern of the gradient-isolation tests and of a
    trainer logging the two losses' gradients)."""
    out, aux = fn(*leaves)
    lm_loss = (out.float() * dout.float()).sum()
    lm_leaves, kl_leaves = list(leaves[:3]), list(leaves[3:])

    def lm():
        return dict(zip(LEAVES[:3], torch.autograd.grad(lm_loss, lm_leaves, retain_graph=True)))

    def kl():
        if aux.kl is None:
            return {}
        return dict(zip(LEAVES[3:], torch.autograd.grad(aux.kl, kl_leaves, retain_graph=True)))

    if kl_first:
        kg = kl()
        lg = lm()
    else:
        lg = lm()
        kg = kl()
    return OpResult(out.detach(), None if aux.lse is None else aux.lse.detach(),
                    None if aux.kl is None else aux.kl.detach(), aux.block_idx,
                    {n: v.detach() for n, v in aux.stats.items()}, lg, kg)


def reference_op(leaves: Sequence[Tensor], dout: Tensor, cfg, mode: str, q_pos: Optional[Tensor] = None,
                 block_idx: Optional[Tensor] = None) -> OpResult:
    """The pure-PyTorch reference in fp64 on the same (rounded) input values, LM and KL
    gradients taken separately. ``block_idx``: the kernel's selection, so the attention / KL
    comparison does not depend on near-tie selection differences (checked on its own)."""
    from msa_megatron.ops import naive as R

    f = [x.detach().double().requires_grad_() for x in leaves]

    def fn(q, k, v, iq, ik):
        return R.msa_attention(q, k, v, iq if mode != "dense" else None, ik if mode != "dense" else None, cfg,
                               q_pos=q_pos, mode=mode, block_idx=block_idx)

    return run_separate(fn, f, dout.double())


def compare(res: OpResult, ref: OpResult, mode: str) -> Dict[str, float]:
    """Relative errors of every output, statistic and gradient (names as the tolerance tables)."""
    errs = {"out": rel_err(res.out, ref.out), "lse": rel_err(res.lse, ref.lse)}
    for n in LEAVES[:3]:
        errs["d" + n] = rel_err(res.lm_grads[n], ref.lm_grads[n])
    if mode != "dense":
        errs["kl"] = rel_err(res.kl, ref.kl)
        for n in LEAVES[3:]:
            errs["d_" + n] = rel_err(res.kl_grads[n], ref.kl_grads[n])
        for n in ("index_entropy", "main_entropy"):
            if n in res.stats:
                errs[n] = rel_err(res.stats[n], ref.stats[n])
    return errs


# ----------------------------------------------------------------------------- tolerances
def fp16_index_grad_tol(rows: int, sk: int, iscale: float) -> float:
    """fp16 d(iq, ik) tolerance, from the mechanism (docs/kernels.md, "fp16 index gradients").

    The KL kernel rounds dS = iscale * (Q - P) / rows to the input dtype before its two dots (as
    flash attention rounds dS). fp16's smallest normal is 2^-14 ~ 6.1e-5, its subnormal spacing
    2^-24 ~ 6e-8: with |Q - P| ~ 1 / visible tokens, dS ~ iscale / (rows * sk) falls into the
    subnormal range and carries an absolute rounding error ~ 2^-25 instead of a relative 2^-11,
    so the gradient's relative error grows ~ 2^-24 * rows * sk / iscale. bf16 (fp32's exponent
    range) has no such loss. Measured on CPU (interpreter, same arithmetic), b=3, T=432, 3 groups,
    di=48, q = 0: d_iq 4.0e-2 in fp16, 3.5e-3 in bf16 at the same gradient norm, and 2.5e-4 in
    fp16 when dS is not divided by rows inside the kernel (normalizer=1, divided after): range,
    not an ill-conditioned metric. 0.1 * 2^-24 * rows * sk / iscale = 7e-2 there (1.75x the
    measurement); 1e-2 is the fp16 level without underflow. A kernel fix (scale dS into fp16's
    normal range, divide the fp32 accumulators after) is described in docs/kernels.md."""
    return 1e-2 + 0.1 * 2.0 ** -24 * rows * sk / iscale


# ----------------------------------------------------------------------------- timing
def timed_ms(fn: Callable[[], object], reps: int = 5, device: str = "cuda") -> float:
    """Median wall time of fn() in ms (CUDA events on CUDA after one warm-up call; plain
    perf_counter elsewhere)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[len(ts) // 2]


def nblocks(sk: int, block: int) -> int:
    return math.ceil(sk / block)

"""Benchmark impls of the index branch and the dense baselines.

* ``cudnn-dense`` / ``flash-dense``: causal dense attention through torch SDPA with one
  backend forced (GQA keys/values expanded to the query heads at set-up, untimed).
* ``index-torch``: plain torch index branch on the GPU (matmul -> causal mask -> block
  max -> forced blocks -> torch.topk -> sort), in query chunks bounding memory.
* ``index-fused``: :func:`msa_megatron.ops.triton_index.index_select` (selection + index
  LSE); fwd+bwd adds :func:`sparse_kl_backward` (KL value and d_iq, d_ik).
* ``index-fused-select`` / ``index-fused-scoreonly``: the selection kernel alone, with and
  without its running top-K: their ratio is the top-K overhead. ``index-fused-select-fp8``:
  the opt-in FP8 e4m3 selection; ``index-fused-select-3stage``: the former 3-stage config.
* ``kl-sparse-fused``: :func:`sparse_kl_backward` alone (its inputs precomputed).
* ``kl-dense-fused``: warmup KL. fwd = dense index LSE pass; fwd+bwd = the whole
  :func:`dense_kl_backward` (index LSE pass + gradient pass).

The KL impls take the main-branch LSE as an input (another kernel produces it): here a
finite placeholder (log of the selected / causal token count) stands in; the work done
does not depend on its values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import Bench, Case, Skip, register

#: Dense attention beyond this length takes tens of seconds per call: skipped by default.
DENSE_MAX_L = 1 << 18


def _need_cuda(case: Case) -> None:
    if not torch.cuda.is_available() or not str(case.device).startswith("cuda"):
        raise Skip("needs a CUDA device")


def _index_inputs(case: Case):
    iq = case.randn(case.batch, case.L, case.hkv, case.di)
    ik = case.randn(case.batch, case.L, case.di)
    return iq, ik


def _sdpa_impl(case: Case, backend_name: str) -> Bench:
    _need_cuda(case)
    if case.L > DENSE_MAX_L:
        raise Skip(f"dense attention at L={case.L} takes tens of seconds per call (limit {DENSE_MAX_L}; "
                   "raise msa_megatron.bench.impls_index.DENSE_MAX_L to run it)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    G = case.hq // case.hkv
    need_grad = not case.fwd_only
    q = case.randn(case.batch, case.hq, case.L, case.d, requires_grad=need_grad)
    k = case.randn(case.batch, case.hkv, case.L, case.d).repeat_interleave(G, 1).requires_grad_(need_grad)
    v = case.randn(case.batch, case.hkv, case.L, case.d, scale=0.5).repeat_interleave(G, 1).requires_grad_(need_grad)

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with sdpa_kernel(backend):  # fails here (-> recorded) if the backend cannot run this case
        F.scaled_dot_product_attention(q[:, :, :256].detach(), k[:, :, :256].detach(), v[:, :, :256].detach(), is_causal=True)
    do = torch.randn_like(q) if need_grad else None

    def fwdbwd():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(do)

    return Bench(fwd=fwd, fwdbwd=fwdbwd if need_grad else None, fwd_flops=case.dense_fwd_flops(),
                 fwdbwd_flops=case.dense_fwd_flops() + case.dense_bwd_flops(), grad_to_none=[q, k, v],
                 note=f"GQA K/V expanded to {case.hq} heads")


@register("cudnn-dense", "causal dense attention, torch SDPA cuDNN backend")
def cudnn_dense(case: Case) -> Bench:
    return _sdpa_impl(case, "CUDNN_ATTENTION")


@register("flash-dense", "causal dense attention, torch SDPA flash backend")
def flash_dense(case: Case) -> Bench:
    return _sdpa_impl(case, "FLASH_ATTENTION")


def torch_index_select(iq: torch.Tensor, ik: torch.Tensor, block: int, topk: int, local_blocks: int = 1,
                       init_blocks: int = 0, chunk_bytes: int = 4 << 30) -> torch.Tensor:
    """Plain torch index branch: [b, g, sq, K] block indices (sq == sk, default positions).

    Scores in the inputs' dtype (fp32 accumulation inside the matmul), block max, forced
    blocks +inf, torch.topk, ascending sort, -1 for invisible picks."""
    b, L, g, di = iq.shape
    nb = math.ceil(L / block)
    K = min(topk, nb)
    out = torch.empty(b, g, L, topk, device=iq.device, dtype=torch.int32)
    out.fill_(-1)
    chunk = max(block, (chunk_bytes // (g * nb * block * 4)) // block * block)
    blk = torch.arange(nb, device=iq.device)
    key_pos = torch.arange(nb * block, device=iq.device)
    ikp = F.pad(ik, (0, 0, 0, nb * block - L))  # [b, nb*B, di]
    for bi in range(b):
        for s0 in range(0, L, chunk):
            s1 = min(L, s0 + chunk)
            pos = torch.arange(s0, s1, device=iq.device)
            sc = torch.matmul(iq[bi, s0:s1].transpose(0, 1), ikp[bi].t()).float()  # [g, c, nb*B]
            sc.masked_fill_(key_pos[None, None, :] > pos[None, :, None], float("-inf"))
            bs = sc.view(g, s1 - s0, nb, block).amax(-1)  # [g, c, nb]
            own = (pos // block)[:, None]
            forced = ((blk[None, :] <= own) & (blk[None, :] > own - local_blocks)) | (
                (blk[None, :] < init_blocks) & (blk[None, :] <= own))
            bs.masked_fill_(forced[None], float("inf"))
            vals, idx = torch.topk(bs, K, dim=-1)
            idx = torch.where(vals > float("-inf"), idx, torch.full_like(idx, nb))  # drop invisible picks
            idx = torch.sort(idx, dim=-1).values
            out[bi, :, s0:s1, :K] = torch.where(idx == nb, torch.full_like(idx, -1), idx).int()
    return out


@register("index-torch", "plain torch index branch: matmul + block max + topk (chunked)")
def index_torch(case: Case) -> Bench:
    _need_cuda(case)
    iq, ik = _index_inputs(case)
    cfg = case.cfg
    return Bench(fwd=lambda: torch_index_select(iq, ik, cfg.block_size, cfg.topk, cfg.local_blocks, cfg.init_blocks),
                 fwd_flops=case.indexer_flops(), note="selection only (no LSE)")


def _kl_operands(case: Case, dense: bool):
    q = case.randn(case.batch, case.L, case.hq, case.d)
    k = case.randn(case.batch, case.L, case.hkv, case.d)
    t = torch.arange(case.L, device=case.device, dtype=torch.float32)
    if dense:
        n_tok = t + 1
    else:
        n_tok = (t % case.block + 1) + case.block * torch.clamp(torch.floor(t / case.block), max=case.topk - 1)
    main_lse = torch.log(n_tok).view(1, 1, -1).expand(case.batch, case.hq, -1).contiguous()
    return q, k, main_lse


@register("index-fused", "Triton index_select (selection + index LSE); fwd+bwd adds sparse_kl_backward")
def index_fused(case: Case) -> Bench:
    _need_cuda(case)
    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    fwdbwd = None
    if not case.fwd_only:
        q, k, main_lse = _kl_operands(case, dense=False)

        def fwdbwd():
            sel, lse, plan = TI.index_select(iq, ik, cfg, return_plan=True)
            return TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, lse, cfg, plan=plan)

    return Bench(fwd=lambda: TI.index_select(iq, ik, cfg), fwdbwd=fwdbwd, fwd_flops=case.indexer_flops(),
                 fwdbwd_flops=case.indexer_flops() + case.kl_bwd_flops(),
                 note="fwd = selection + reverse index + index LSE")


@register("kl-sparse-fused", "Triton sparse_kl_backward alone (selection, index LSE and reverse index precomputed)")
def kl_sparse_fused(case: Case) -> Bench:
    _need_cuda(case)
    if case.fwd_only:
        raise Skip("backward-only impl: not timed above the fwd+bwd length limit")
    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    q, k, main_lse = _kl_operands(case, dense=False)
    sel, lse, plan = TI.index_select(iq, ik, cfg, return_plan=True)
    return Bench(fwd=None, fwdbwd=lambda: TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, lse, cfg, plan=plan),
                 fwdbwd_flops=case.kl_bwd_flops(), note="KL value + d_iq + d_ik only")


@register("index-fused-select", "Triton selection kernel alone (running top-K, no LSE)")
def index_fused_select(case: Case) -> Bench:
    _need_cuda(case)
    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    q_pos = torch.arange(case.L, device=case.device)
    return Bench(fwd=lambda: TI._launch_select(iq, ik, cfg, q_pos, score_only=False), fwd_flops=case.indexer_flops())


@register("index-fused-select-fp8", "Triton selection kernel on FP8 e4m3 iq/ik (quantisation included)")
def index_fused_select_fp8(case: Case) -> Bench:
    _need_cuda(case)
    from ..ops import triton_index as TI

    if TI.FP8_DTYPE is None:
        raise Skip("torch has no float8_e4m3fn")
    iq, ik = _index_inputs(case)
    cfg = case.cfg
    return Bench(fwd=lambda: TI.index_select_fp8(iq, ik, cfg), fwd_flops=case.indexer_flops(),
                 note="iq per-row / ik per-tensor scales; TF/s counted as bf16-equivalent FLOPs")


@register("index-fused-select-3stage", "Triton selection kernel with the former 3 pipeline stages (for comparison)")
def index_fused_select_3stage(case: Case) -> Bench:
    _need_cuda(case)
    import dataclasses

    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    q_pos = torch.arange(case.L, device=case.device)
    three = dataclasses.replace(TI.DEFAULT_INDEX_CONFIG, sel_stages=3)

    def fwd():
        saved, TI.DEFAULT_INDEX_CONFIG = TI.DEFAULT_INDEX_CONFIG, three
        try:
            return TI._launch_select(iq, ik, cfg, q_pos, score_only=False)
        finally:
            TI.DEFAULT_INDEX_CONFIG = saved

    return Bench(fwd=fwd, fwd_flops=case.indexer_flops(), note="sel_stages=3 (default is 2)")


@register("index-fused-scoreonly", "Triton selection kernel without the top-K (block max only): top-K cost baseline")
def index_fused_scoreonly(case: Case) -> Bench:
    _need_cuda(case)
    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    q_pos = torch.arange(case.L, device=case.device)
    return Bench(fwd=lambda: TI._launch_select(iq, ik, cfg, q_pos, score_only=True), fwd_flops=case.indexer_flops())


@register("kl-dense-fused", "warmup KL: fwd = dense index LSE pass, fwd+bwd = dense_kl_backward")
def kl_dense_fused(case: Case) -> Bench:
    _need_cuda(case)
    if case.L > DENSE_MAX_L:
        raise Skip(f"dense KL at L={case.L} is a dense pass over all heads (limit {DENSE_MAX_L})")
    from ..ops import triton_index as TI

    iq, ik = _index_inputs(case)
    cfg = case.cfg
    fwdbwd = None
    if not case.fwd_only:
        q, k, main_lse = _kl_operands(case, dense=True)

        def fwdbwd():
            return TI.dense_kl_backward(q, k, iq, ik, main_lse, cfg)

    return Bench(fwd=lambda: TI.dense_index_lse(iq, ik, cfg), fwdbwd=fwdbwd, fwd_flops=case.indexer_flops(),
                 fwdbwd_flops=case.indexer_flops() + case.kl_bwd_flops(dense=True),
                 note="compare fwd+bwd with one dense attention fwd")

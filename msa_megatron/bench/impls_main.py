"""Benchmark impls of MSA's main branch and of the whole MSA op (for ``msa-bench``).

* ``flex-blocksparse``: torch FlexAttention with a block mask at MSA's budget but a coarser
  pattern: one set of top-k blocks (the diagonal one + k-1 random earlier ones) per
  128-query tile, shared by all heads. The anchor the sparse kernel is compared with.
* ``msa-main``: :func:`msa_megatron.ops.triton_sparse_attn.sparse_attention` (default kernel
  config, deterministic dQ) on the case's selection; the default kind ``random`` is each
  query's own block + k-1 distinct random earlier blocks, independently per (query, group):
  the worst case for locality (no two neighbouring queries share their blocks).
  fwd = ``sparse_attention_fwd`` (reverse index included); fwd+bwd = autograd fwd + bwd.
* ``msa-main-qouter``: the same selection through the query-outer forward (one query x G
  heads per program): the simple design, fwd only.
* ``msa-main-tiled``: ``msa-main`` on exactly the ``flex-blocksparse`` pattern (every query of
  a 128-query tile shares the tile's blocks): apples-to-apples with the anchor, and the
  locality-rich case (q rows re-read from L2).
* ``msa-main-atomic``: ``msa-main`` with dQ accumulated by fp32 atomics (non-deterministic).
* ``msa-op``: the whole op :func:`msa_megatron.ops.triton_op.msa_attention_triton` in mode
  ``msa`` on random iq/ik: fwd = prefill (no grad, no KL: index selection without LSE + main
  forward); fwd+bwd = training step (selection, main forward, KL value + d_iq/d_ik in one
  kernel, main backward). Entropy statistics off (``track_entropy=False``).

Selections: every sparse impl runs on ``case.selection`` (``msa-bench --selections``;
bench/selections.py: random, flex, trained, pool:C, churn:R,C) and records it with its measured
U8; ``flex-blocksparse`` always runs its own pattern (kind ``flex``), ``flex-union`` runs
Flex on any selection (per-tile union of blocks + a per-token mask). ``msa-main-kv`` /
``-union`` / ``-auto`` and ``msa-op-kv`` / ``-auto`` pick ``KernelConfig(main_impl=...)``
(rows say "n/a: main_impl not available" until that field exists); ``msa-op-fp8`` is the
prefill with the FP8 selection.

``MSA_MAIN_KERNEL="fwd_rows=64,bwd_block_n=64,..."`` changes the kernel config of every
impl here (see :class:`~msa_megatron.ops.triton_sparse_attn.KernelConfig`) for sweeps.

``python -m msa_megatron.bench.impls_main speedup OUT/bench.json`` prints each impl's
speedup over ``cudnn-dense`` at the same length (measured in the same run; where it was
skipped, the anchor numbers of the project brief, marked as such).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields, replace
from typing import Dict, List, Optional

import torch

from .. import selection_stats as ss
from . import selections as sel_mod
from .registry import Bench, Case, Skip, register

#: cuDNN dense anchors measured on one H100 (project brief; 64 q / 4 KV heads, d 128, bf16,
#: causal): (fwd ms, fwd+bwd ms). Used by ``speedup`` only where no dense run was recorded.
CUDNN_ANCHORS_MS = {1 << 17: (515.0, 1858.0), 1 << 20: (35600.0, None)}


def _need_cuda(case: Case) -> None:
    if not torch.cuda.is_available() or not str(case.device).startswith("cuda"):
        raise Skip("needs a CUDA device")


def _gen(case: Case, salt: int) -> torch.Generator:
    return torch.Generator(device=case.device).manual_seed(case.seed * 1000 + salt)


def _randn(case: Case, shape, salt: int, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, device=case.device, dtype=case.dtype, generator=_gen(case, salt))
    return x.requires_grad_(requires_grad)


def _qkv(case: Case, grad: bool):
    q = _randn(case, (case.batch, case.L, case.hq, case.d), 1, grad)
    k = _randn(case, (case.batch, case.L, case.hkv, case.d), 2, grad)
    v = _randn(case, (case.batch, case.L, case.hkv, case.d), 3, grad)
    return q, k, v


def random_token_selection(case: Case, chunk_elems: int = 1 << 28) -> torch.Tensor:
    """block_idx [b, g, L, K] int32: own block + K-1 distinct random earlier blocks per
    (query, group), ascending, -1 where fewer than K blocks are visible."""
    b, g, L, B, K = case.batch, case.hkv, case.L, case.block, case.topk
    nb = math.ceil(L / B)
    out = torch.full((b, g, L, K), -1, dtype=torch.int32, device=case.device)
    blk = torch.arange(nb, device=case.device)
    gen = _gen(case, 7)
    chunk = max(1, chunk_elems // (b * g * nb))
    for s0 in range(0, L, chunk):
        s1 = min(L, s0 + chunk)
        own = torch.arange(s0, s1, device=case.device) // B
        score = torch.rand(b, g, s1 - s0, nb, device=case.device, generator=gen)
        score.masked_fill_(blk[None, :] > own[:, None], -1.0)
        score.masked_fill_(blk[None, :] == own[:, None], 2.0)
        val, idx = torch.topk(score, min(K, nb), dim=-1)
        idx = torch.where(val >= 0, idx, torch.full_like(idx, nb))
        idx = torch.sort(idx, dim=-1).values
        out[:, :, s0:s1, : idx.shape[-1]] = torch.where(idx == nb, -1, idx).to(torch.int32)
    return out


# ----------------------------------------------------------------------------- FlexAttention anchor
_flex = None


def _compiled_flex():
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def _tile_table(case: Case):
    """Per 128-query tile i: up to k-1 distinct random blocks < i, ascending ([n, k-1], 0-padded)
    and their count. The one pattern behind flex-blocksparse and msa-main-tiled."""
    B, K = case.block, case.topk
    n = math.ceil(case.L / B)
    i = torch.arange(n, device=case.device)
    score = torch.rand(n, n, device=case.device, generator=_gen(case, 11))
    score.masked_fill_(i[None, :] >= i[:, None], -1.0)
    kf = min(K - 1, max(n - 1, 0))
    idx = torch.zeros(n, max(kf, 1), dtype=torch.long, device=case.device)
    if kf > 0:
        val, top = torch.topk(score, kf, dim=-1)
        top = torch.sort(torch.where(val >= 0, top, torch.full_like(top, n)), dim=-1).values
        idx = torch.where(top == n, 0, top)
    return idx, torch.clamp(i, max=K - 1)


def tile_block_mask(case: Case):
    """FlexAttention BlockMask: per 128-query tile, the diagonal block (causal mask_mod) + up to
    k-1 random earlier blocks (full), the same for all heads."""
    from torch.nn.attention.flex_attention import BlockMask

    B = case.block
    n = math.ceil(case.L / B)
    dev = case.device
    i = torch.arange(n, device=dev)
    idx, cnt = _tile_table(case)
    full_idx = torch.zeros(1, 1, n, n, dtype=torch.int32, device=dev)
    full_idx[0, 0, :, : idx.shape[1]] = idx.to(torch.int32)
    full_num = cnt.to(torch.int32).view(1, 1, n)
    part_idx = torch.zeros(1, 1, n, n, dtype=torch.int32, device=dev)
    part_idx[0, 0, :, 0] = i.to(torch.int32)
    part_num = torch.ones(1, 1, n, dtype=torch.int32, device=dev)
    # The element mask also encodes the block table, so that every flex path (compiled kernel:
    # evaluated on the diagonal blocks only; eager reference: everywhere) gives one answer.
    table = torch.zeros(n, n, dtype=torch.bool, device=dev)
    table[i, i] = True
    keep = torch.arange(idx.shape[1], device=dev)[None, :] < cnt[:, None]
    table[i.view(-1, 1).expand_as(idx)[keep], idx[keep]] = True

    def selected_causal(b, h, qi, ki):
        return (qi >= ki) & table[qi // B, ki // B]

    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=B, mask_mod=selected_causal,
                                    seq_lengths=(case.L, case.L))


def tile_token_selection(case: Case) -> torch.Tensor:
    """block_idx [b, g, L, K]: every query of a 128-query tile gets the tile's blocks of
    :func:`tile_block_mask` (+ its own block): the FlexAttention anchor's exact pattern."""
    B, K = case.block, case.topk
    idx, cnt = _tile_table(case)
    n = idx.shape[0]
    i = torch.arange(n, device=case.device)
    kf = idx.shape[1]
    sel = torch.where(torch.arange(kf, device=case.device)[None, :] < cnt[:, None], idx, -1)
    sel = torch.cat([sel, i[:, None], torch.full((n, K - 1 - kf), -1, device=case.device, dtype=torch.long)], 1)
    sel = torch.sort(torch.where(sel < 0, n, sel), dim=-1).values
    sel = torch.where(sel == n, -1, sel).to(torch.int32)  # [n, K]
    tok = sel.repeat_interleave(B, dim=0)[: case.L]
    return tok.view(1, 1, case.L, K).expand(case.batch, case.hkv, -1, -1).contiguous()


@register("flex-blocksparse", "FlexAttention, one top-k block set per 128-query tile (the anchor)")
def flex_blocksparse(case: Case) -> Bench:
    """Always its own pattern (selection kind ``flex``), whatever ``case.selection`` says:
    timed once per length; ``flex-union`` runs Flex on the other selections."""
    _need_cuda(case)
    case = replace(case, selection="flex")
    return _flex_bench(case, tile_block_mask(case), note="same budget, blocks shared by a 128-query tile and all heads",
                       selection="flex", u8=sel_mod.measured_u8(case))


def _flex_bench(case: Case, mask, note: str, selection: str, u8: float) -> Bench:
    """FlexAttention (compiled) fwd / fwd+bwd with ``mask``, on the case's q/k/v."""
    grad = not case.fwd_only
    q, k, v = (x.transpose(1, 2) for x in _qkv(case, False))  # [b, h, L, d] views
    q, k, v = (x.contiguous().requires_grad_(grad) for x in (q, k, v))
    flex = _compiled_flex()

    def fwd():
        with torch.no_grad():
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

    do = torch.randn_like(q) if grad else None

    def fwdbwd():
        flex(q, k, v, block_mask=mask, enable_gqa=True).backward(do)

    return Bench(fwd=fwd, fwdbwd=fwdbwd if grad else None, fwd_flops=case.sparse_fwd_flops(),
                 fwdbwd_flops=case.sparse_fwd_flops() + case.sparse_bwd_flops(), grad_to_none=[q, k, v],
                 note=note, selection=selection, u8=u8)


#: Membership buffers of flex-union, one per shape: mask_mod reads the buffer, whose data is
#: replaced in place, so the compiled Flex kernel of a shape serves every selection kind.
_UNION_MEMBER: Dict[tuple, torch.Tensor] = {}


def union_block_mask(case: Case, sel: torch.Tensor):
    """FlexAttention BlockMask for a per-token selection ``sel`` [1, g, L, K]: per 128-query
    tile and KV group, the union of the tile's selected blocks (every block partial), and a
    mask_mod keeping key j for query t iff t >= j and t's group selected j's block. This is
    how Flex runs MSA's own selections: its work is the per-tile union (U128 blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    if case.batch != 1:
        raise Skip("flex-union supports batch 1")
    B, L, g, G = case.block, case.L, case.hkv, case.hq // case.hkv
    n = math.ceil(L / B)
    dev = sel.device
    s = sel[0].long()  # [g, L, K]
    own = (torch.arange(L, device=dev) // B).view(1, L, 1)
    key = (g, L, n, str(dev))
    member = _UNION_MEMBER.get(key)
    if member is None:
        _UNION_MEMBER.clear()
        member = _UNION_MEMBER[key] = torch.zeros(g, L, n, dtype=torch.bool, device=dev)
    member.zero_()
    member.scatter_(-1, torch.where(s >= 0, s, own.expand_as(s)), True)  # -1 slots: the own block (always in)
    padded = torch.zeros(g, n * B, n, dtype=torch.bool, device=dev)
    padded[:, :L] = member
    union = padded.view(g, n, B, n).any(2)  # [g, tiles, blocks]
    kv_num = union.sum(-1).to(torch.int32)
    kv_idx = torch.sort((~union).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    kv_num = kv_num.repeat_interleave(G, 0)[None]  # [1, hq, tiles]
    kv_idx = kv_idx.repeat_interleave(G, 0)[None]  # [1, hq, tiles, blocks]

    def selected_causal(b, h, qi, ki):
        return (qi >= ki) & member[h // G, qi, ki // B]

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=B, mask_mod=selected_causal, seq_lengths=(L, L))
    u128 = float(union.sum(-1).double().mean())
    return mask, u128


@register("flex-union", "FlexAttention on MSA's per-token selection (per-tile union of blocks + token mask)",
          uses_selection=True)
def flex_union(case: Case) -> Bench:
    _need_cuda(case)
    sel = sel_mod.make_selection(case)
    mask, u128 = union_block_mask(case, sel)
    return _flex_bench(case, mask, note=f"per-tile union: {u128:.0f} blocks per 128 queries (U128), all partial",
                       selection=sel_mod.describe(case), u8=sel_mod.measured_u8(case, sel))


# ----------------------------------------------------------------------------- the sparse main branch
def main_impl_config(main_impl: Optional[str]):
    """The default KernelConfig, with ``main_impl`` set when given. The field comes with the
    union-tile main branch (helper "kmain"); without it such rows say n/a (a Skip)."""
    from ..ops import triton_sparse_attn as T

    cfg = T.default_config()
    if main_impl is None:
        return cfg
    if "main_impl" not in {f.name for f in fields(T.KernelConfig)}:
        raise Skip("n/a: main_impl not available (KernelConfig has no main_impl field in this checkout)")
    return replace(cfg, main_impl=main_impl)


def _main_bench(case: Case, config=None, deterministic: bool = True, fwd_only: bool = False, note: str = "",
                tiled: bool = False) -> Bench:
    _need_cuda(case)
    from ..ops import triton_sparse_attn as T

    cfg = config or T.default_config()
    grad = not (case.fwd_only or fwd_only)
    if tiled:
        case = replace(case, selection="flex")
    bidx = sel_mod.make_selection(case)
    q, k, v = _qkv(case, grad)
    B = case.block

    fwd_fn, fn = T.sparse_attention_fwd, T.sparse_attention
    if cfg.fwd_impl == "q":  # the query-outer baseline lives in bench/qouter.py, not in ops/
        from .qouter import qouter_attention, qouter_attention_fwd

        fwd_fn, fn = qouter_attention_fwd, qouter_attention

    def fwd():
        if cfg.fwd_impl == "q":
            return fwd_fn(q.detach(), k.detach(), v.detach(), bidx, B, config=cfg)
        # through the dispatch point (main_impl kv / union / auto; no gradient: the prefill
        # limit): sparse_attention_fwd itself is the KV-outer forward whatever main_impl says
        # (runs 9 and 11 timed that for the -union / -auto rows' fwd column)
        return fn(q.detach(), k.detach(), v.detach(), bidx, B, config=cfg)

    fwdbwd = None
    if grad:
        do = _randn(case, tuple(q.shape), 5)

        def fwdbwd():
            out, _ = fn(q, k, v, bidx, B, config=cfg, deterministic=deterministic)
            out.backward(do)

    return Bench(fwd=fwd, fwdbwd=fwdbwd, fwd_flops=case.sparse_fwd_flops(),
                 fwdbwd_flops=case.sparse_fwd_flops() + case.sparse_bwd_flops(), grad_to_none=[q, k, v],
                 note=note or f"{cfg.fwd_impl}-outer fwd", selection=sel_mod.describe(case),
                 u8=sel_mod.measured_u8(case, bidx))


@register("msa-main", "MSA main branch: Triton sparse attention, default kernel config (fwd, fwd+bwd)",
          uses_selection=True)
def msa_main(case: Case) -> Bench:
    return _main_bench(case)


@register("msa-main-kv", "MSA main branch, old path: KernelConfig(main_impl='kv') (KV-outer + combine)",
          uses_selection=True)
def msa_main_kv(case: Case) -> Bench:
    return _main_bench(case, main_impl_config("kv"), note="main_impl=kv (old path)")


@register("msa-main-union", "MSA main branch, new path: KernelConfig(main_impl='union') (GQA-packed union tile)",
          uses_selection=True)
def msa_main_union(case: Case) -> Bench:
    return _main_bench(case, main_impl_config("union"), note="main_impl=union (new path)")


@register("msa-main-auto", "MSA main branch: KernelConfig(main_impl='auto') (dispatch by measured union size)",
          uses_selection=True)
def msa_main_auto(case: Case) -> Bench:
    return _main_bench(case, main_impl_config("auto"), note="main_impl=auto")


@register("msa-main-qouter", "MSA main branch, query-outer forward (one query x G heads per program)",
          uses_selection=True)
def msa_main_qouter(case: Case) -> Bench:
    from ..ops import triton_sparse_attn as T

    return _main_bench(case, replace(T.default_config(), fwd_impl="q"), fwd_only=True, note="query-outer fwd")


@register("msa-main-tiled", "MSA main branch on the flex-blocksparse pattern (blocks shared per 128-query tile)")
def msa_main_tiled(case: Case) -> Bench:
    return _main_bench(case, tiled=True, note="same blocks as flex-blocksparse (per-tile sets): locality-rich")


@register("msa-main-atomic", "MSA main branch with fp32-atomic dQ (non-deterministic backward)", uses_selection=True)
def msa_main_atomic(case: Case) -> Bench:
    if case.fwd_only:
        raise Skip("backward variant: fwd is msa-main's")
    return _main_bench(case, deterministic=False, note="dQ by fp32 atomics")


# ----------------------------------------------------------------------------- the whole op
def _op_bench(case: Case, main_impl: Optional[str] = None, note: str = "") -> Bench:
    """The whole op. Selection kind ``random``: the op selects from random iq/ik itself (the
    measured U8 is that of its own selection). Any other kind: the selection is handed to
    the op (``block_idx=``) and the index selection kernel still runs on iq/ik inside the
    timed call (prefill: without LSE), so the cost stays that of the whole op."""
    _need_cuda(case)
    from ..ops import triton_index as TI
    from ..ops.triton_op import msa_attention_triton

    kcfg = main_impl_config(main_impl)
    grad = not case.fwd_only
    q, k, v = _qkv(case, grad)
    iq = _randn(case, (case.batch, case.L, case.hkv, case.di), 8, grad)
    ik = _randn(case, (case.batch, case.L, case.di), 9, grad)
    cfg = replace(case.cfg, track_entropy=False)
    own = case.selection == "random"
    if own:
        sel = TI.index_select(iq.detach(), ik.detach(), cfg, with_lse=False)[0]
        u8, kind = float(ss.union_sizes(sel, 8).double().mean()), "random (the op's own, random iq/ik)"
        del sel
        given = None
    else:
        given = sel_mod.make_selection(case)
        u8, kind = sel_mod.measured_u8(case, given), sel_mod.describe(case)
    kw = dict(mode="msa", kernel_config=kcfg)

    def fwd():
        with torch.no_grad():
            if given is not None:
                TI.index_select(iq, ik, cfg, with_lse=False)
            return msa_attention_triton(q, k, v, iq, ik, cfg, compute_kl=False, block_idx=given, **kw)

    fwdbwd = None
    if grad:
        do = _randn(case, tuple(q.shape), 5)
        one = torch.ones((), device=case.device)

        def fwdbwd():
            if given is not None:
                with torch.no_grad():
                    TI.index_select(iq.detach(), ik.detach(), cfg, with_lse=False)
            out, aux = msa_attention_triton(q, k, v, iq, ik, cfg, block_idx=given, **kw)
            torch.autograd.backward([out, aux.kl], [do, one])

    main = case.sparse_fwd_flops()
    return Bench(fwd=fwd, fwdbwd=fwdbwd, fwd_flops=case.indexer_flops() + main,
                 fwdbwd_flops=case.indexer_flops() + main + case.sparse_bwd_flops() + case.kl_bwd_flops(),
                 grad_to_none=[q, k, v, iq, ik], note=note or "stats off", selection=kind, u8=u8)


@register("msa-op", "whole MSA op: fwd = prefill (index + main), fwd+bwd = training step incl. KL",
          uses_selection=True)
def msa_op(case: Case) -> Bench:
    return _op_bench(case)


@register("msa-op-fp8", "whole MSA op, prefill with the FP8 e4m3 selection (IndexConfig.fp8_prefill)",
          uses_selection=True)
def msa_op_fp8(case: Case) -> Bench:
    import dataclasses

    from ..ops import triton_index as TI

    b = _op_bench(replace(case, fwd_only=True), note="FP8 selection (iq per-row, ik per-tensor scales); prefill only")
    fp8 = dataclasses.replace(TI.DEFAULT_INDEX_CONFIG, fp8_prefill=True)
    inner = b.fwd

    def fwd():
        saved, TI.DEFAULT_INDEX_CONFIG = TI.DEFAULT_INDEX_CONFIG, fp8
        try:
            return inner()
        finally:
            TI.DEFAULT_INDEX_CONFIG = saved

    b.fwd, b.fwdbwd = fwd, None
    return b


@register("msa-op-kv", "whole MSA op with KernelConfig(main_impl='kv') (old main path)", uses_selection=True)
def msa_op_kv(case: Case) -> Bench:
    return _op_bench(case, "kv", note="main_impl=kv (old path); stats off")


@register("msa-op-auto", "whole MSA op with KernelConfig(main_impl='auto') (new main path)", uses_selection=True)
def msa_op_auto(case: Case) -> Bench:
    return _op_bench(case, "auto", note="main_impl=auto (new path); stats off")


# ----------------------------------------------------------------------------- speedup table
def speedup_table(records: List[Dict], baseline: str = "cudnn-dense") -> str:
    """Markdown: each impl's fwd / fwd+bwd time and its speedup over ``baseline`` at equal L."""
    base: Dict[int, Dict[str, Optional[float]]] = {}
    for r in records:
        if r["impl"] == baseline and r.get("status") == "ok":
            base[r["L"]] = {"fwd": r.get("fwd_ms"), "fwdbwd": r.get("fwdbwd_ms"), "src": "measured"}
    for L, (f, fb) in CUDNN_ANCHORS_MS.items():
        base.setdefault(L, {"fwd": f, "fwdbwd": fb, "src": "brief anchor"})
    lines = [f"| impl | L | fwd ms | x vs {baseline} | fwd+bwd ms | x vs {baseline} | baseline |",
             "|---|---|---|---|---|---|---|"]

    def ratio(b, x):
        return f"{b / x:.1f}" if b and x else "-"

    for r in records:
        if r["impl"] == baseline or r.get("status") != "ok":
            continue
        bl = base.get(r["L"], {})
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {r['impl']} | {r['L']} | {fmt(r.get('fwd_ms'))} | {ratio(bl.get('fwd'), r.get('fwd_ms'))} | "
                     f"{fmt(r.get('fwdbwd_ms'))} | {ratio(bl.get('fwdbwd'), r.get('fwdbwd_ms'))} | {bl.get('src', 'none')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msa_megatron.bench.impls_main")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speedup", help="speedups over cudnn-dense from a bench.json")
    s.add_argument("bench_json")
    s.add_argument("--baseline", default="cudnn-dense")
    args = p.parse_args(argv)
    with open(args.bench_json) as f:
        print(speedup_table(json.load(f), args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())

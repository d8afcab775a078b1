"""Worker side of the op-level CP tests: run in spawned gloo processes by
tests/experiments/test_cp_exchange.py.

Every rank builds the same full-sequence inputs (seeded), computes the CP=1 result with the
reference op on the whole sequence, then its CP piece with ``msa_attention_cp`` on its
load-balanced chunks, and returns the largest differences; the parent asserts on them."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from msa_megatron.ops import naive
from msa_megatron.config import MSAConfig
from msa_megatron.experiments import cp_exchange as cpx
from msa_megatron.megatron import context_parallel as cpl


def light_shutdown() -> None:
    """The harness's shutdown without importing megatron when this process never did
    (the import alone costs ~15-40 s per process on a loaded 2-core runner)."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_gloo() -> None:
    import msa_megatron.megatron.parallel as parallel

    parallel.shutdown_distributed = light_shutdown  # read by the harness at exit
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def make_inputs(seed: int, b: int, s: int, hq: int, g: int, d: int, di: int, dtype, index: bool = True,
                hot_blocks: Optional[List[int]] = None, block_size: int = 16) -> Dict[str, torch.Tensor]:
    """Full-sequence q, k, v, iq, ik. ``hot_blocks``: make every query's index scores peak on
    these key blocks (a concentrated selection, shared by all queries)."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "q": torch.randn(b, s, hq, d, generator=gen),
        "k": torch.randn(b, s, g, d, generator=gen),
        "v": torch.randn(b, s, g, d, generator=gen),
    }
    if index:
        t["iq"] = torch.randn(b, s, g, di, generator=gen)
        t["ik"] = torch.randn(b, s, di, generator=gen)
        if hot_blocks:
            for blk in hot_blocks:
                t["ik"][:, blk * block_size:(blk + 1) * block_size, 0] += 40.0
            t["iq"][..., 0] = t["iq"][..., 0].abs() + 1.0
    return {k: v.to(dtype) for k, v in t.items()}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a-b| relative to max(1, |b|max), in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max()))) if a.numel() else 0.0


def run_case(case: Dict, group, cp: int, rank: int, data_seed: int) -> Dict:
    cfg = MSAConfig(**case["cfg"])
    dtype = getattr(torch, case.get("dtype", "float64"))
    b, s, hq, g, d, di = (case[k] for k in ("b", "s", "hq", "g", "d", "di"))
    mode = case.get("mode", "msa")
    index = mode != "dense"
    recall = case.get("recall", False)
    full = make_inputs(data_seed, b, s, hq, g, d, di, dtype, index=index, hot_blocks=case.get("hot_blocks"),
                       block_size=cfg.block_size)
    gen = torch.Generator().manual_seed(data_seed + 1)
    w = torch.randn(b, s, hq, d, generator=gen).to(dtype)

    # CP=1: the reference on the whole sequence
    ref_in = {k: v.clone().requires_grad_() for k, v in full.items()}
    out1, aux1 = naive.msa_attention(ref_in["q"], ref_in["k"], ref_in["v"], ref_in.get("iq"), ref_in.get("ik"),
                                         cfg, mode=mode, compute_recall=recall)
    acc = torch.promote_types(dtype, torch.float32)
    loss1 = (out1.to(acc) * w.to(acc)).sum() + (aux1.kl if aux1.kl is not None else 0.0)
    loss1.backward()

    # CP: this rank's chunks
    loc = {k: cpl.split_for_cp(v, cp, rank).clone().requires_grad_() for k, v in full.items()}
    cpl.COMM_COUNTER = {}
    out, aux = cpx.msa_attention_cp(loc["q"], loc["k"], loc["v"], loc.get("iq"), loc.get("ik"), cfg, group=group,
                                    mode=mode, compute_recall=recall, kv_exchange=case.get("kv_exchange", "allgather"))
    kl_term = aux.kl * cpl.kl_weight_for_cp(cp) if aux.kl is not None else 0.0
    loss = (out.to(acc) * cpl.split_for_cp(w, cp, rank).to(acc)).sum() + kl_term
    loss.backward()
    counter, cpl.COMM_COUNTER = cpl.COMM_COUNTER, None
    reduced = cpl.reduce_aux_over_cp(aux, group)

    res = {"name": case["name"], "rank": rank, "comm": counter}
    res["out"] = _err(out, cpl.split_for_cp(out1, cp, rank))
    res["lse"] = _err(aux.lse, cpl.split_for_cp(aux1.lse, cp, rank, seq_dim=2))
    for k in loc:
        res[f"d{k}"] = _err(loc[k].grad, cpl.split_for_cp(ref_in[k].grad, cp, rank))
    if aux1.block_idx is not None:
        expect = cpl.split_for_cp(aux1.block_idx, cp, rank, seq_dim=2)
        res["block_idx_equal"] = bool(torch.equal(aux.block_idx, expect))
        # facts making the case meaningful: selections reaching blocks owned elsewhere, and
        # own-block starts before this rank's chunk (the local block straddles a chunk edge)
        c = s // (2 * cp)
        q_pos = cpl.zigzag_positions(s // cp, cp, rank)
        blk = aux.block_idx.long()
        tok0 = (blk.clamp_min(0) * cfg.block_size)
        owner = cpl._chunk_owner(tok0 // c, cp)
        res["remote_selected"] = int(((blk >= 0) & (owner != rank)).sum())
        own_start = (q_pos // cfg.block_size) * cfg.block_size
        res["local_block_straddles"] = int((cpl._chunk_owner(own_start // c, cp) != rank).sum())
        res["union"] = cpx.measured_selected_volume(aux.block_idx, cp, rank, max(1, c // cfg.block_size),
                                                    cfg.block_size, d, torch.finfo(dtype).bits // 8) \
            if c % cfg.block_size == 0 else None
    if aux1.kl is not None:
        res["kl"] = _err(reduced["kl"], aux1.kl)
    for key, val in aux1.stats.items():
        res[f"stat_{key}"] = _err(reduced[key], val)
    res["stat_keys_equal"] = sorted(aux1.stats) == sorted(aux.stats)
    return res


def op_worker(rank: int, plan: List[Dict]) -> List[Dict]:
    """``plan``: cases, each with ``groups`` (list of rank lists forming CP groups; every
    rank must be in exactly one) and an optional ``expect_error`` substring."""
    import time

    init_gloo()
    results = []
    for i, case in enumerate(plan):
        t0 = time.perf_counter()
        groups = [dist.new_group(ranks) for ranks in case["groups"]]  # collective: same order everywhere
        gi = next(j for j, ranks in enumerate(case["groups"]) if rank in ranks)
        group, cp, cp_rank = cpl.cp_group_and_rank(groups[gi])
        if case.get("expect_error"):
            try:
                run_case(case, group, cp, cp_rank, data_seed=1000 * i + gi)
            except (cpl.CPLayoutError, ValueError, NotImplementedError) as exc:
                results.append({"name": case["name"], "rank": rank, "error": str(exc)})
            else:
                results.append({"name": case["name"], "rank": rank, "error": None})
            continue
        if case.get("gloo_without_reduce_scatter"):  # what torch < 2.6 gloo does
            def unsupported(*args, **kwargs):
                raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

            saved = {n: getattr(dist, n) for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)}
            for n in saved:
                setattr(dist, n, unsupported)
            try:
                res = run_case(case, group, cp, cp_rank, data_seed=1000 * i + gi)
            finally:
                for n, f in saved.items():
                    setattr(dist, n, f)
            res["fallback_logged"] = cpl._rs_fallback_logged
        else:
            res = run_case(case, group, cp, cp_rank, data_seed=1000 * i + gi)
        res["cp"], res["group"], res["seconds"] = cp, gi, time.perf_counter() - t0
        results.append(res)
    return results

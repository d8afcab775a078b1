"""Research: the op-level CP function and an alternative K/V exchange, kept for tests and docs.

Production CP (the Megatron backend) lives in :mod:`msa_megatron.megatron.context_parallel`:
all-gather of K/V/ik in global order, reduce-scatter in backward. This module holds what only
tests and docs/context_parallel.md use:

* :func:`msa_attention_cp`: the MSA op on one CP rank's chunks (``kv_exchange='allgather'``
  is the production exchange at the op level; tests compare it with CP=1);
* ``kv_exchange='selected'``: instead of all-gathering K/V, fetch only the blocks this
  rank's queries selected (ik is still all-gathered: selection needs every key); see
  docs/context_parallel.md for when it pays off (rarely, for training-size chunks);
* :class:`CommModel`, :func:`measured_selected_volume`, :func:`format_comm_table`: the
  communication-volume model of both exchanges.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import MSAConfig
from ..megatron import context_parallel as _cp
from ..megatron.context_parallel import (
    CPLayoutError,
    _all_gather,
    _chunk_owner,
    _count,
    cp_group_and_rank,
    gather_sequence,
    zigzag_chunks,
    zigzag_positions,
)
from ..ops import msa_attention, resolve_backend
from ..ops.naive import MSAAux

#: How K/V reach the queries. ``allgather``: every rank gets the whole sequence (exact for
#: every mode). ``selected``: only the blocks selected by this rank's queries (mode 'msa').
KV_EXCHANGES = ("allgather", "selected")


def check_cp_sequence(s_local: int, cp_size: int, block_size: int, kv_exchange: str = "allgather") -> int:
    """:func:`msa_megatron.megatron.context_parallel.check_cp_sequence` plus the rule of the
    ``selected`` exchange: c = S/(2 cp) must be a multiple of ``block_size``, so that every key
    block lives whole on one rank and is fetched from one owner."""
    if kv_exchange not in KV_EXCHANGES:
        raise CPLayoutError(f"kv_exchange={kv_exchange!r} is invalid: allowed values are " + ", ".join(KV_EXCHANGES))
    chunk = _cp.check_cp_sequence(s_local, cp_size)
    if kv_exchange == "selected" and chunk % block_size != 0:
        seq_len = s_local * cp_size
        unit = 2 * cp_size * block_size
        raise CPLayoutError(
            f"context parallelism with kv_exchange='selected': sequence length {seq_len} with cp={cp_size} gives "
            f"chunks of {chunk} tokens (S/(2*cp)), not a multiple of msa.block_size={block_size}: allowed sequence "
            f"lengths are multiples of 2*cp*block_size={unit} (or use kv_exchange='allgather')"
        )
    return chunk


# ----------------------------------------------------------------------------- selected-blocks exchange
@dataclasses.dataclass
class _BlockPlan:
    """Who sends which (batch, group, block) to whom; identical on every rank."""

    send_idx: Tensor  # [n_send] flat (b, g, local block) indices into this rank's blocks, grouped by peer
    send_counts: List[int]  # blocks sent to each peer
    recv_idx: Tensor  # [n_recv] flat (b, g, global block) indices of the received blocks, grouped by peer
    recv_counts: List[int]
    need: Tensor  # [b, g, nb] bool: blocks this rank's queries selected (own and remote)


def _local_block_map(cp: int, rank: int, chunk_blocks: int, device) -> Tensor:
    """Global block ids [2 * chunk_blocks] of this rank's local blocks, in local order."""
    first, second = zigzag_chunks(cp, rank)
    ar = torch.arange(chunk_blocks, device=device)
    return torch.cat([ar + first * chunk_blocks, ar + second * chunk_blocks])


def _block_plan(block_idx: Tensor, cp: int, rank: int, chunk_blocks: int, group) -> _BlockPlan:
    b, g, _, _ = block_idx.shape
    nb = 2 * cp * chunk_blocks
    blk = block_idx.long()
    need = torch.zeros(b, g, nb + 1, dtype=torch.bool, device=blk.device)
    need.scatter_(2, torch.where(blk >= 0, blk, nb).reshape(b, g, -1), True)
    need = need[..., :nb].contiguous()
    need_all = need.new_empty((cp,) + tuple(need.shape)).to(torch.uint8)
    _all_gather(need_all, need.to(torch.uint8), group)
    _count("selected_plan", need.numel() * (cp - 1))
    need_all = need_all.bool()
    owner = _chunk_owner(torch.arange(nb, device=blk.device) // chunk_blocks, cp)  # [nb]
    # global block -> position among the owner's local blocks
    chunk = torch.arange(nb, device=blk.device) // chunk_blocks
    local_pos = torch.where(chunk < cp, 0, chunk_blocks) + torch.arange(nb, device=blk.device) % chunk_blocks
    send_idx, send_counts, recv_idx, recv_counts = [], [], [], []
    mine = owner == rank
    for peer in range(cp):
        if peer == rank:
            send_counts.append(0)
            recv_counts.append(0)
            continue
        req = need_all[peer] & mine  # what peer needs from me
        bi, gi, gb = req.nonzero(as_tuple=True)
        send_idx.append((bi * g + gi) * (2 * chunk_blocks) + local_pos[gb])
        send_counts.append(int(bi.numel()))
        got = need & (owner == peer)  # what I need from peer, in peer's (b, g, block) order
        bi, gi, gb = got.nonzero(as_tuple=True)
        recv_idx.append((bi * g + gi) * nb + gb)
        recv_counts.append(int(bi.numel()))
    empty = torch.zeros(0, dtype=torch.long, device=blk.device)
    return _BlockPlan(torch.cat(send_idx) if send_idx else empty, send_counts,
                      torch.cat(recv_idx) if recv_idx else empty, recv_counts, need)


class _FetchSelectedBlocks(torch.autograd.Function):
    """Full-sequence K/V buffers holding this rank's own chunks plus the remote blocks its
    queries selected (every other block is zero and is never read by mode 'msa'); backward
    returns the remote blocks' gradients to their owners (all-to-all) and adds them."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, plan: _BlockPlan, group, cp: int, rank: int, block: int):
        b, s_local, g, d = k.shape
        c = s_local // 2
        cb = c // block
        nb = 2 * cp * cb
        ctx.meta = (plan, group, cp, rank, block, k.shape)
        kv = torch.stack([k, v])  # [2, b, s_local, g, d]
        # [b, g, local blocks, 2, B, d]: one row per (b, g, block), K and V together
        rows = kv.view(2, b, 2 * cb, block, g, d).permute(1, 4, 2, 0, 3, 5).reshape(b * g * 2 * cb, 2 * block * d)
        send = rows.index_select(0, plan.send_idx)
        recv = rows.new_empty(sum(plan.recv_counts), 2 * block * d)
        row_bytes = rows.shape[1] * rows.element_size()
        dist.all_to_all_single(recv, send, [n for n in plan.recv_counts], [n for n in plan.send_counts], group=group)
        _count("selected_kv", recv.shape[0] * row_bytes)
        full = rows.new_zeros(b * g * nb, 2 * block * d)
        full.index_copy_(0, plan.recv_idx, recv)
        own = _local_block_map(cp, rank, cb, k.device)
        own_rows = ((torch.arange(b * g, device=k.device)[:, None] * nb) + own[None, :]).reshape(-1)
        full.index_copy_(0, own_rows, rows)
        full = full.view(b, g, nb, 2, block, d).permute(3, 0, 2, 4, 1, 5).reshape(2, b, nb * block, g, d)
        ctx.own_rows = own_rows
        return full[0], full[1]

    @staticmethod
    def backward(ctx, gk: Optional[Tensor], gv: Optional[Tensor]):
        plan, group, cp, rank, block, shape = ctx.meta
        b, s_local, g, d = shape
        cb = s_local // 2 // block
        nb = 2 * cp * cb
        ref = gk if gk is not None else gv
        gk = gk if gk is not None else torch.zeros_like(ref)
        gv = gv if gv is not None else torch.zeros_like(ref)
        rows = torch.stack([gk, gv]).view(2, b, nb, block, g, d).permute(1, 4, 2, 0, 3, 5).reshape(b * g * nb, -1)
        back = rows.index_select(0, plan.recv_idx)  # grads of the blocks I fetched, to their owners
        got = rows.new_empty(sum(plan.send_counts), rows.shape[1])
        dist.all_to_all_single(got, back, list(plan.send_counts), list(plan.recv_counts), group=group)
        _count("selected_dkv", got.shape[0] * rows.shape[1] * rows.element_size())
        local = rows.index_select(0, ctx.own_rows)  # [b*g*2cb, 2*B*d], local block order
        local.index_add_(0, plan.send_idx, got)
        local = local.view(b, g, 2 * cb, 2, block, d).permute(3, 0, 2, 4, 1, 5).reshape(2, b, s_local, g, d)
        return local[0], local[1], None, None, None, None, None


def _select_fn(device: torch.device, cfg: MSAConfig):
    """The selection the op will make, computed ahead so that the blocks can be fetched."""
    if resolve_backend(cfg, device) != "reference":
        raise NotImplementedError(
            "kv_exchange='selected' needs the selection before the op runs; msa_megatron.ops exposes no Triton "
            "selection yet (see docs/context_parallel.md: proposed msa_select / block_idx argument): "
            "use kv_exchange='allgather' with msa.backend=triton"
        )
    from ..ops.naive import select

    return select


# ----------------------------------------------------------------------------- the CP op
def msa_attention_cp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    iq: Optional[Tensor],
    ik: Optional[Tensor],
    cfg: MSAConfig,
    group: Optional[dist.ProcessGroup] = None,
    mode: Optional[str] = None,
    softmax_scale: Optional[float] = None,
    compute_recall: bool = False,
    kv_exchange: str = "allgather",
) -> Tuple[Tensor, MSAAux]:
    """The MSA op on this CP rank's chunks: q [b, s_local, hq, d], k/v [b, s_local, g, d],
    iq [b, s_local, g, di], ik [b, s_local, di] in Megatron's load-balanced layout.

    Returns the op's (out, aux) for the local queries: out [b, s_local, hq, d],
    aux.lse [b, hq, s_local], aux.block_idx [b, g, s_local, K] of *global* block ids,
    aux.kl / aux.stats means over this rank's rows (see the module docstring for the CP
    reduction). ``group=None``: Megatron's CP group; no CP -> exactly ``msa_attention``."""
    group, cp, rank = cp_group_and_rank(group)
    mode = mode or cfg.mode
    if cp == 1:
        return msa_attention(q, k, v, iq, ik, cfg, mode=mode, softmax_scale=softmax_scale,
                             compute_recall=compute_recall)
    s_local = q.shape[1]
    for name, t in (("k", k), ("v", v), ("iq", iq), ("ik", ik)):
        if t is not None and t.shape[1] != s_local:
            raise ValueError(f"CP: {name} has {t.shape[1]} local tokens, q has {s_local}: all inputs must be "
                             "this rank's chunks of one sequence")
    check_cp_sequence(s_local, cp, cfg.block_size, kv_exchange)
    q_pos = zigzag_positions(s_local, cp, rank, device=q.device)
    if kv_exchange == "allgather" or mode != "msa" or compute_recall or iq is None:
        if kv_exchange == "selected":
            raise CPLayoutError(
                f"kv_exchange='selected' needs mode 'msa' with the index branch and no recall sampling "
                f"(got mode={mode!r}, compute_recall={compute_recall}): dense passes read every key; "
                "use kv_exchange='allgather'"
            )
        k_full, v_full, ik_full = gather_sequence([k, v, ik], group)
        return msa_attention(q, k_full, v_full, iq, ik_full, cfg, q_pos=q_pos, mode=mode,
                             softmax_scale=softmax_scale, compute_recall=compute_recall)
    # selected blocks: ik first (selection needs every key), then only the selected K/V blocks
    (ik_full,) = gather_sequence([ik], group)
    select = _select_fn(q.device, cfg)
    block_idx = select(iq.detach(), ik_full.detach(), cfg, q_pos)
    plan = _block_plan(block_idx, cp, rank, s_local // 2 // cfg.block_size, group)
    k_full, v_full = _FetchSelectedBlocks.apply(k, v, plan, group, cp, rank, cfg.block_size)
    out, aux = msa_attention(q, k_full, v_full, iq, ik_full, cfg, q_pos=q_pos, mode=mode,
                             softmax_scale=softmax_scale, compute_recall=False)
    used = aux.block_idx.long()
    fetched = torch.gather(plan.need, 2, used.clamp_min(0).flatten(2)).view_as(used) | (used < 0)
    if not bool(fetched.all()):
        raise RuntimeError("MSA CP kv_exchange='selected': the op selected blocks that were not fetched "
                           "(its selection differs from the pre-selection); use kv_exchange='allgather'")
    return out, aux


# ----------------------------------------------------------------------------- communication model
@dataclasses.dataclass(frozen=True)
class CommModel:
    """Per-layer, per-rank communication of the CP layer (bytes, batch 1)."""

    seq_len: int
    cp: int
    num_kv_heads: int = 4
    head_dim: int = 128
    index_dim: int = 128
    bytes_per_element: int = 2
    block_size: int = 128
    topk: int = 16

    @property
    def frac(self) -> float:  # share of a full-sequence buffer a rank receives in a ring collective
        return (self.cp - 1) / self.cp

    def allgather(self) -> Dict[str, float]:
        """fwd: all-gather of K, V and ik; bwd: reduce-scatter of dK, dV and d(ik)."""
        per_token = (2 * self.num_kv_heads * self.head_dim + self.index_dim) * self.bytes_per_element
        vol = self.frac * self.seq_len * per_token
        return {"fwd": vol, "bwd": vol}

    def selected(self, union_fraction: float) -> Dict[str, float]:
        """fwd: all-gather of ik + the request masks + the remote K/V blocks selected by this
        rank's queries; bwd: reduce-scatter of d(ik) + dK/dV of those blocks back to owners.
        ``union_fraction``: share of the remote (b, group, block) pairs in the union of the
        rank's selections (1 = every block, as for independent selections at training sizes)."""
        nb = self.seq_len // self.block_size
        ik = self.frac * self.seq_len * self.index_dim * self.bytes_per_element
        masks = (self.cp - 1) * self.num_kv_heads * nb  # one byte per (group, block) and peer
        kv = union_fraction * self.frac * self.seq_len * 2 * self.num_kv_heads * self.head_dim * self.bytes_per_element
        return {"fwd": ik + masks + kv, "bwd": ik + kv}

    def selected_min_union(self) -> float:
        """Union fraction when all queries of a rank share one selection (best case):
        k - local_blocks remote blocks per group out of the remote ones."""
        nb_remote = self.frac * self.seq_len / self.block_size
        return min(1.0, (self.topk - 1) / nb_remote)

    def independent_union(self) -> float:
        """Expected union fraction when each of the S/cp local queries picks its k-1
        non-local blocks independently and uniformly among all nb = S/B blocks (a favourable
        assumption: real queries see fewer blocks, which only grows the union). Miss
        probability (1 - (k-1)/nb)^(S/cp) ~ exp(-(k-1) B / cp): independent of S."""
        s_local = self.seq_len // self.cp
        nb = self.seq_len // self.block_size
        return 1.0 - (1.0 - (self.topk - 1) / nb) ** s_local


def measured_selected_volume(block_idx: Tensor, cp: int, rank: int, chunk_blocks: int, block_size: int,
                             head_dim: int, bytes_per_element: int = 2) -> Dict[str, float]:
    """What ``kv_exchange='selected'`` would fetch for a real selection, without
    communicating: ``block_idx`` [b, g, s_local, K] holds the global block ids selected by
    this rank's queries (``aux.block_idx``), ``chunk_blocks`` = S / (2 cp B). Returns the
    remote (b, group, block) pairs in the union, the union fraction (of all remote pairs)
    and the forward K/V bytes. Useful to log on sampled steps of a real run."""
    b, g = block_idx.shape[:2]
    nb = 2 * cp * chunk_blocks
    blk = block_idx.long()
    need = torch.zeros(b, g, nb + 1, dtype=torch.bool, device=blk.device)
    need.scatter_(2, torch.where(blk >= 0, blk, nb).reshape(b, g, -1), True)
    owner = _chunk_owner(torch.arange(nb, device=blk.device) // chunk_blocks, cp)
    remote = need[..., :nb] & (owner != rank)
    pairs = float(remote.sum())
    total = float(b * g * (nb - 2 * chunk_blocks))
    return {"remote_blocks": pairs, "union_fraction": pairs / total if total else 0.0,
            "kv_bytes": pairs * 2 * block_size * head_dim * bytes_per_element}


def format_comm_table(seq_lens: Sequence[int] = (131072, 1048576), cps: Sequence[int] = (2, 4, 8, 16),
                      **model_kwargs) -> str:
    """Markdown table of per-rank, per-layer bytes (MiB) for both designs."""
    rows = ["| S | cp | all-gather fwd | all-gather bwd | selected fwd (u=1) | selected bwd (u=1) | "
            "selected fwd (best u) | best u | indep. u |",
            "|---|---|---|---|---|---|---|---|---|"]
    mib = float(1 << 20)
    for s in seq_lens:
        for cp in cps:
            m = CommModel(seq_len=s, cp=cp, **model_kwargs)
            ag, worst, best_u = m.allgather(), m.selected(1.0), m.selected_min_union()
            best = m.selected(best_u)
            rows.append(f"| {s // 1024}K | {cp} | {ag['fwd'] / mib:.1f} | {ag['bwd'] / mib:.1f} | "
                        f"{worst['fwd'] / mib:.1f} | {worst['bwd'] / mib:.1f} | {best['fwd'] / mib:.1f} | "
                        f"{best_u:.4f} | {m.independent_union():.4f} |")
    return "\n".join(rows)


__all__ = [
    "CommModel", "KV_EXCHANGES", "check_cp_sequence", "format_comm_table", "measured_selected_volume",
    "msa_attention_cp",
]

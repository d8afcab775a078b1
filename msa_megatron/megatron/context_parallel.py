"""Context parallelism (CP) for the MSA op, exact to CP=1.

Megatron-Core splits a sequence of S tokens into 2*cp chunks of c = S/(2*cp) tokens and
gives CP rank r chunks r and 2*cp-1-r (causal load balance), concatenated: a rank holds
``s_local = 2c`` tokens. Each local query must still select among *all* causal keys of the
sequence and attend to the selected blocks wherever they live. This module is the CP layer
of the op, independent of the attention module:

1. the global positions of the local queries (:func:`zigzag_positions`);
2. the keys in global order: the index key ``ik`` and K/V are all-gathered over the CP group
   and un-zigzagged (:func:`gather_sequence`, one packed collective);
3. :func:`msa_megatron.ops.msa_attention` with ``q_pos`` = those positions: block ids and
   the local-block rule use global positions, so selection is the CP=1 selection;
4. in backward, dK/dV/d(ik) return to their owners by reduce-scatter (the autograd
   function's backward), with the inverse reordering.

The Megatron backend calls :func:`gather_kv_for_cp` from ``MSACoreAttention`` (or
:func:`gather_kv_and_select_for_cp`, which overlaps the selection with the K/V transfer;
``modes.set_cp_select_overlap`` switches it);
:func:`validate_cp_sequence_length` checks a training length up front.

This module is the production seam only. The op-level CP function ``msa_attention_cp``, the
alternative selected-blocks K/V exchange and the communication-volume model are research
code used by tests and docs: :mod:`msa_megatron.experiments.cp_exchange`.

Loss / statistics convention (documented in docs/context_parallel.md): ``aux.kl`` and
``aux.stats`` keep the op's meaning, means over this rank's rows. Every CP rank has the same
number of rows, so the CP=1 value is the mean over CP ranks (:func:`reduce_aux_over_cp`),
and the CP=1 gradient is obtained by back-propagating ``aux.kl / cp`` on every rank: the
schedules scale the aux-loss gradient by ``cp / num_microbatches`` and DDP averages
gradients over DP x CP, so the net weight of rank r's term is exactly ``1/cp``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import MSAConfig
from ..ops import resolve_backend
from ..ops.naive import MSAAux

log = logging.getLogger("msa_megatron.cp")

class CPLayoutError(ValueError):
    """A sequence length / block size / CP size combination the CP layer cannot run."""


# ----------------------------------------------------------------------------- layout
def cp_group_and_rank(group: Optional[dist.ProcessGroup]) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, size, rank); ``group=None`` means Megatron's context-parallel group when
    parallel_state is initialised, else no CP."""
    if group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                group = parallel_state.get_context_parallel_group()
        except ImportError:  # megatron-core absent: the op layer still works with explicit groups
            group = None
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def check_cp_sequence(s_local: int, cp_size: int) -> int:
    """Validate a CP split and return the chunk length c = S / (2 cp).

    Megatron's load-balanced split needs S divisible by 2*cp (s_local even). That is all:
    keys are reassembled in global order, so blocks straddling a chunk boundary do not
    change the selection."""
    if cp_size < 1:
        raise CPLayoutError(f"context parallel size cp={cp_size} is invalid: allowed values are integers >= 1")
    seq_len = s_local * cp_size
    if s_local < 2 or s_local % 2 != 0:
        raise CPLayoutError(
            f"context parallelism: sequence length {seq_len} (local {s_local} tokens per rank) with cp={cp_size} "
            f"cannot be split into 2*cp={2 * cp_size} equal chunks: allowed sequence lengths are positive "
            f"multiples of 2*cp={2 * cp_size}"
        )
    return s_local // 2


def zigzag_chunks(cp_size: int, cp_rank: int) -> Tuple[int, int]:
    """The two global chunk indices Megatron gives CP rank ``cp_rank``."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_positions(s_local: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global positions [s_local] (int64) of a rank's tokens in Megatron's load-balanced
    layout (chunk r then chunk 2*cp-1-r)."""
    if s_local % 2 != 0:
        raise CPLayoutError(f"local sequence length {s_local} must be even (two chunks per CP rank)")
    c = s_local // 2
    first, second = zigzag_chunks(cp_size, cp_rank)
    ar = torch.arange(c, device=device, dtype=torch.long)
    return torch.cat([ar + first * c, ar + second * c])


def split_for_cp(x: Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> Tensor:
    """Rank ``cp_rank``'s piece of a full-sequence tensor, exactly as Megatron's
    ``get_batch_on_this_cp_rank`` cuts it (used by tests and the GPU check)."""
    s = x.shape[seq_dim]
    if s % (2 * cp_size) != 0:
        raise CPLayoutError(f"sequence length {s} is not a multiple of 2*cp={2 * cp_size}")
    pos = zigzag_positions(s // cp_size, cp_size, cp_rank, device=x.device)
    return x.index_select(seq_dim, pos)


def _chunk_owner(chunk: Tensor, cp_size: int) -> Tensor:
    """CP rank owning each global chunk index."""
    return torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)


# ----------------------------------------------------------------------------- collectives
#: Optional byte counter: {name: bytes received by this rank}. Tests compare it with the
#: analytic volume model; None (the default) costs nothing.
COMM_COUNTER: Optional[Dict[str, int]] = None


def _count(name: str, nbytes: int) -> None:
    if COMM_COUNTER is not None:
        COMM_COUNTER[name] = COMM_COUNTER.get(name, 0) + int(nbytes)


def _all_gather(out: Tensor, inp: Tensor, group, async_op: bool = False):
    """out [cp, *inp.shape] <- every rank's inp, in rank order (concatenated along dim 0,
    the shape gloo insists on). ``async_op``: returns the work handle to wait on."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out.view(-1, *inp.shape[1:]), inp, group=group, async_op=async_op)


_rs_fallback_logged = False


def _reduce_scatter(out: Tensor, inp: Tensor, group) -> None:
    """Sum-reduce-scatter along dim 0. Gloo builds of torch < 2.6 lack reduce_scatter: there
    the same sums come from an all-reduce and a slice (twice the traffic; logged once)."""
    global _rs_fallback_logged
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        fn(out, inp.view(-1, *out.shape[1:]), group=group)
    except RuntimeError as exc:
        if dist.get_backend(group) != "gloo" or "support" not in str(exc).lower():
            raise
        if not _rs_fallback_logged:
            _rs_fallback_logged = True
            log.warning("MSA CP: gloo lacks reduce_scatter in this torch build; using all_reduce + slice (%s)", exc)
        full = inp.clone()
        dist.all_reduce(full, group=group)
        out.copy_(full[dist.get_rank(group)])


def _unzigzag(halves: Tensor) -> Tensor:
    """[cp, b, 2, c, ...] (rank, batch, which of the rank's two chunks, token) -> [b, 2cp, c, ...]
    in global chunk order: global chunk j is rank j's first chunk for j < cp, else rank
    (2cp-1-j)'s second chunk. One copy."""
    cp = halves.shape[0]
    return torch.stack([halves[j, :, 0] if j < cp else halves[2 * cp - 1 - j, :, 1] for j in range(2 * cp)], dim=1)


def merge_from_cp(pieces: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`split_for_cp` along dim 1: every rank's [b, s_local, ...] piece, in
    CP-rank order -> the [b, S, ...] sequence (what the all-gather reassembles; the GPU check
    simulates CP with it on one device). Differentiable."""
    cp, (b, s_local) = len(pieces), pieces[0].shape[:2]
    if s_local % 2:
        raise CPLayoutError(f"local sequence length {s_local} must be even (two chunks per CP rank)")
    halves = torch.stack(list(pieces)).view(cp, b, 2, s_local // 2, *pieces[0].shape[2:])
    return _unzigzag(halves).reshape(b, cp * s_local, *pieces[0].shape[2:])


class _ZigzagAllGather(torch.autograd.Function):
    """All-gather of same-dtype tensors [b, s_local, ...] over the CP group, returned in
    global token order [b, S, ...]; backward reduce-scatters the gradients to their owners.

    The local tensors are packed along the feature dim so that one collective carries all
    of them (K, V and ik: one launch instead of three). ``while_in_flight`` (optional, no
    grad) runs between launching the collective asynchronously and waiting for it: the
    selection overlaps the K/V transfer (:func:`gather_kv_and_select_for_cp`)."""

    @staticmethod
    def forward(ctx, group, cp_size: int, while_in_flight, *xs: Tensor):
        b, s_local = xs[0].shape[:2]
        c = s_local // 2
        widths = [x[0, 0].numel() for x in xs]
        ctx.group, ctx.cp, ctx.widths, ctx.shapes = group, cp_size, widths, [x.shape for x in xs]
        local = torch.cat([x.reshape(b, s_local, -1) for x in xs], dim=-1)
        gathered = local.new_empty((cp_size,) + tuple(local.shape))
        if while_in_flight is None:
            _all_gather(gathered, local, group)
        else:
            work = _all_gather(gathered, local, group, async_op=True)
            try:
                while_in_flight()
            finally:
                work.wait()
        _count("allgather", local.numel() * local.element_size() * (cp_size - 1))
        halves = gathered.view(cp_size, b, 2, c, -1)
        outs, off = [], 0
        for x, w in zip(xs, widths):
            outs.append(_unzigzag(halves[..., off:off + w]).view(b, 2 * cp_size * c, *x.shape[2:]))
            off += w
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        cp, widths = ctx.cp, ctx.widths
        ref = next(g for g in grads if g is not None)
        b, S = ref.shape[:2]
        c = S // (2 * cp)
        packed = ref.new_zeros(cp, b, 2, c, sum(widths)) if any(g is None for g in grads) else \
            ref.new_empty(cp, b, 2, c, sum(widths))
        # rank-major chunk order (0, 2cp-1, 1, 2cp-2, ...): rank r's two chunks side by side
        order = torch.tensor([j for r in range(cp) for j in zigzag_chunks(cp, r)], device=ref.device)
        off = 0
        for g, w in zip(grads, widths):
            if g is not None:
                per_rank = g.reshape(b, 2 * cp, c, w).index_select(1, order).view(b, cp, 2, c, w)
                packed[..., off:off + w].copy_(per_rank.transpose(0, 1))
            off += w
        local = ref.new_empty(b, 2 * c, sum(widths))
        _reduce_scatter(local, packed.view(cp, b, 2 * c, -1), ctx.group)
        _count("reduce_scatter", local.numel() * local.element_size() * (cp - 1))
        out, off = [], 0
        for shape, w in zip(ctx.shapes, widths):
            out.append(local[..., off:off + w].reshape(shape))
            off += w
        return (None, None, None, *out)


def gather_sequence(tensors: Sequence[Optional[Tensor]], group=None) -> List[Optional[Tensor]]:
    """Differentiable all-gather over CP of [b, s_local, ...] tensors into global order
    [b, S, ...] (None passes through). Tensors of one dtype share one collective."""
    group, cp, _ = cp_group_and_rank(group)
    if cp == 1:
        return list(tensors)
    out: List[Optional[Tensor]] = [None] * len(tensors)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        gathered = _ZigzagAllGather.apply(group, cp, None, *[tensors[i] for i in idx])
        for i, g in zip(idx, gathered):
            out[i] = g
    return out


def gather_kv_for_cp(k: Tensor, v: Tensor, ik: Optional[Tensor], group=None
                     ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The attention module's CP seam: this rank's k, v [b, s_local, g, d] and ik
    [b, s_local, di] -> K, V, ik over the whole sequence in global order and ``q_pos``
    [s_local] (global positions of the local queries). Without CP: unchanged, q_pos None."""
    group, cp, rank = cp_group_and_rank(group)
    if cp == 1:
        return k, v, ik, None
    check_cp_sequence(k.shape[1], cp)
    k_full, v_full, ik_full = gather_sequence([k, v, ik], group)
    return k_full, v_full, ik_full, zigzag_positions(k.shape[1], cp, rank, device=k.device)


@functools.lru_cache(maxsize=None)
def _triton_op_accepts_block_idx() -> bool:
    import inspect

    from ..ops.triton_op import msa_attention_triton

    return "block_idx" in inspect.signature(msa_attention_triton).parameters


def _op_accepts_block_idx(cfg: MSAConfig, device: torch.device) -> Tuple[bool, str]:
    """Whether the op behind ``ops.msa_attention`` for this device takes a precomputed
    selection (guards against a Triton op from before it did)."""
    backend = resolve_backend(cfg, device)
    return backend == "reference" or _triton_op_accepts_block_idx(), backend


def gather_kv_and_select_for_cp(k: Tensor, v: Tensor, iq: Tensor, ik: Tensor, cfg: MSAConfig, group=None, *,
                                doc_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The seam with the selection overlapping the K/V transfer: all-gather ik first (1/(2g+1)
    of the bytes for di = d), launch the K/V all-gather asynchronously, run ``ops.msa_select``
    (the O(S^2/cp) index pass) while it is in flight, then wait. Returns (K, V, ik_full, q_pos,
    block_idx); pass ``block_idx`` to ``ops.msa_attention`` so the op does not select again.
    Same values and gradients as :func:`gather_kv_for_cp` + the op's own selection; one more
    collective per direction (ik travels alone). Needs CP > 1. ``doc_start`` [b, s_local]
    (packed documents, global key coordinates of the local queries) restricts the selection."""
    from ..ops import msa_select

    group, cp, rank = cp_group_and_rank(group)
    if cp == 1:
        raise ValueError("gather_kv_and_select_for_cp needs a context-parallel group of size > 1")
    ok, backend = _op_accepts_block_idx(cfg, k.device)
    if not ok:
        raise NotImplementedError(
            f"CP select-first overlap needs ops.msa_attention to accept block_idx, which this {backend} op does "
            "not: disable it (msa_megatron.megatron.modes.set_cp_select_overlap(model, False))")
    if k.dtype != v.dtype:
        raise ValueError(f"CP: k and v must share a dtype for the packed all-gather (got {k.dtype}, {v.dtype})")
    check_cp_sequence(k.shape[1], cp)
    q_pos = zigzag_positions(k.shape[1], cp, rank, device=k.device)
    (ik_full,) = gather_sequence([ik], group)
    found: Dict[str, Tensor] = {}

    def select_now() -> None:
        found["block_idx"] = msa_select(iq.detach(), ik_full.detach(), cfg, q_pos, doc_start=doc_start)

    k_full, v_full = _ZigzagAllGather.apply(group, cp, select_now, k, v)
    return k_full, v_full, ik_full, q_pos, found["block_idx"]


def validate_cp_sequence_length(seq_len: int, cp: int, msa: Optional[MSAConfig] = None, tp: int = 1,
                                sequence_parallel: bool = False) -> int:
    """Check a training sequence length against the CP layout before any batch is cut and
    return the tokens per CP rank (S / cp). The trainer calls it: its sequence length comes
    from the data config, which the model config never sees.

    Megatron's load-balanced split needs S to be a multiple of 2*cp; with sequence
    parallelism the S/cp local tokens are split again over TP. MSA layers add no rule of
    their own (keys are all-gathered in global order, so key blocks may straddle chunks);
    ``msa`` is taken so that callers need not know that."""
    for name, value in (("seq_length", seq_len), ("context_parallel_size", cp), ("tensor_model_parallel_size", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CPLayoutError(f"{name}={value!r} is invalid: allowed values are integers >= 1")
    if msa is not None and not isinstance(msa, MSAConfig):
        raise TypeError(f"msa must be an MSAConfig or None, got {type(msa).__name__}")
    sp_split = tp if sequence_parallel and tp > 1 else 1
    rules = []  # (modulus, how it reads)
    if cp > 1:
        rules.append((2 * cp, f"2*context_parallel_size={2 * cp} (Megatron's load-balanced CP split: 2*cp equal "
                              "chunks, rank r holds chunks r and 2*cp-1-r)"))
    if sp_split > 1:
        rules.append((cp * tp, f"context_parallel_size*tensor_model_parallel_size={cp * tp} (sequence parallelism "
                               "splits each rank's S/cp tokens over TP)"))
    broken = [text for unit, text in rules if seq_len % unit]
    if broken:
        unit = math.lcm(*(u for u, _ in rules))
        raise CPLayoutError(
            f"seq_length={seq_len} cannot be split with context_parallel_size={cp}"
            + (f", tensor_model_parallel_size={tp}, sequence_parallel=True" if sp_split > 1 else "")
            + f": it must be a multiple of {' and of '.join(broken)}; allowed seq_length values are multiples of {unit}"
        )
    return seq_len // cp


# ----------------------------------------------------------------------------- reductions for logging
def reduce_aux_over_cp(aux: MSAAux, group=None) -> Dict[str, Tensor]:
    """CP=1 values of the KL and the statistics (detached): the mean over CP ranks of the
    per-rank means (every rank holds the same number of query rows). One all-reduce.
    Collective: every rank of the CP group must call it."""
    group, cp, _ = cp_group_and_rank(group)
    names = (["kl"] if aux.kl is not None else []) + sorted(aux.stats)
    if not names:
        return {}
    values = [aux.kl if n == "kl" else aux.stats[n] for n in names]
    vec = torch.stack([x.detach().to(torch.float64).reshape(()) for x in values])
    if cp > 1:
        dist.all_reduce(vec, group=group)
        vec = vec / cp
    return {n: vec[i] for i, n in enumerate(names)}


def kl_weight_for_cp(cp_size: int) -> float:
    """Weight on a rank's mean KL whose gradient, under Megatron's CP-aware aux-loss scale
    (x cp / num_microbatches) and DP x CP gradient averaging, equals the CP=1 gradient."""
    return 1.0 / cp_size


__all__ = [
    "COMM_COUNTER", "CPLayoutError", "check_cp_sequence", "cp_group_and_rank", "gather_kv_and_select_for_cp",
    "gather_kv_for_cp", "gather_sequence", "kl_weight_for_cp", "merge_from_cp", "reduce_aux_over_cp", "split_for_cp",
    "validate_cp_sequence_length", "zigzag_chunks", "zigzag_positions",
]

"""Needle selection in the passkey probe: did MSA's index select the block a copy needs?

On GPU (run 14) MSA copied the probe's records as well as dense attention at short
distances but fell behind at long ones. Accuracy alone cannot tell whether the index branch
missed the block holding the record (a selection failure) or selected it and the main branch
did not use it. At answer position t the token to copy sits at ``t + 1 - distance[t]`` (an
induction head at t attends there); its key block is the *needle*, and an MSA layer *hits*
when any of its KV groups selected that block for query t.

The positions are the probe accuracy's (answer_mask over positions 0..s-2, as
:func:`~msa_megatron.experiments.assoc_recall.bucket_counts` scores them), bucketed by the
same function (``counts_by_bucket``): ``d<lo>_<hi>`` holds lo <= distance < hi.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

from ..experiments.assoc_recall import counts_by_bucket

Counts = List[int]  # [hits, count]


def needle_hits(block_idx: Tensor, answer_mask: Tensor, distance: Tensor, block_size: int) -> Tensor:
    """hit [b, s] bool: at each answer position t (answer_mask, t < s - 1), whether the needle
    block (t + 1 - distance[t]) // block_size is among block_idx[b, :, t, :] (any KV group,
    any slot); False elsewhere. block_idx [b, g, s, K] is one layer's selection, queries at
    positions 0..s-1; its unused slots are -1 and needles are >= 0, so they never match."""
    if block_idx.dim() != 4:
        raise ValueError(f"block_idx must be [b, g, s, K]; got shape {tuple(block_idx.shape)}")
    b, _, s, _ = block_idx.shape
    if tuple(answer_mask.shape) != (b, s) or tuple(distance.shape) != (b, s):
        raise ValueError(f"answer_mask {tuple(answer_mask.shape)} and distance {tuple(distance.shape)} must be "
                         f"[b, s] = {(b, s)}, as block_idx {tuple(block_idx.shape)}")
    mask = answer_mask.to(block_idx.device, torch.bool).clone()
    mask[:, -1] = False  # as the accuracy: the last position predicts no token of the sequence
    bi, ti = mask.nonzero(as_tuple=True)
    source = ti + 1 - distance.to(block_idx.device)[bi, ti].long()
    bad = (source < 0) | (source > ti)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"distance must lie in [1, t + 1] at answer positions t (the copied token precedes its "
                         f"query); got {int(distance[bi[i], ti[i]])} at t={int(ti[i])} of row {int(bi[i])}")
    needle = source // block_size
    chosen = block_idx[bi, :, ti, :].long()  # [n, g, K]
    hit = torch.zeros_like(mask)
    hit[bi, ti] = (chosen == needle.view(-1, 1, 1)).flatten(1).any(1)
    return hit


def hit_counts(hit: Tensor, answer_mask: Tensor, distance: Tensor, edges: Sequence[int] = ()
               ) -> Tuple[Counts, Dict[str, Counts]]:
    """(overall [hits, count] over all answer positions, {"d<lo>_<hi>": [hits, count]}) of a
    hit map from :func:`needle_hits`. Counts, not fractions, so batches and layers add up."""
    mask = answer_mask.to(hit.device, torch.bool)[:, :-1]
    hit, dist = hit[:, :-1], distance.to(hit.device)[:, :-1]
    return [int(hit[mask].sum()), int(mask.sum())], counts_by_bucket(hit, mask, dist, edges)


def needle_counts(block_idx: Tensor, answer_mask: Tensor, distance: Tensor, block_size: int,
                  edges: Sequence[int] = ()) -> Tuple[Counts, Dict[str, Counts]]:
    """One layer's needle selection on one batch: (overall [hits, count], per bucket)."""
    return hit_counts(needle_hits(block_idx, answer_mask, distance, block_size), answer_mask, distance, edges)


class NeedleTally:
    """Needle hits over the probe's batches, per MSA layer and distance bucket.

    :meth:`add` takes the selections MSA layers captured in one batch's forward
    (``{"layer_index", "block_size", "block_idx"}``, see MSACoreAttention.capture_selection),
    so only counts outlive the batch. Under tensor parallelism each rank holds its own KV
    groups: ``tp_group`` ORs the hit maps over it (every TP rank must call add).

    Besides the mean over layers it counts, per bucket, each layer alone and *any* layer: run
    15 found one layer selecting the needle ~95% of the time while the mean over seven layers
    read ~50%, and a copy needs only the layer that does the copying to reach the record."""

    def __init__(self, edges: Sequence[int] = (), tp_group=None):
        self.edges = list(edges)
        self.tp_group = tp_group
        self.layers: Dict[int, Counts] = {}
        self.layer_buckets: Dict[Tuple[int, str], Counts] = {}
        self.any_total: Counts = [0, 0]
        self.any_buckets: Dict[str, Counts] = {}

    def add(self, records: Iterable[dict], answer_mask: Tensor, distance: Tensor) -> None:
        any_hit = None
        for rec in records:
            hit = needle_hits(rec["block_idx"], answer_mask, distance, rec["block_size"])
            if self.tp_group is not None and self.tp_group.size() > 1:
                import torch.distributed as dist

                hit = hit.to(torch.int32)
                dist.all_reduce(hit, op=dist.ReduceOp.MAX, group=self.tp_group)
                hit = hit.bool()
            any_hit = hit if any_hit is None else any_hit | hit
            layer = int(rec["layer_index"])
            total, per = hit_counts(hit, answer_mask, distance, self.edges)
            _add(self.layers.setdefault(layer, [0, 0]), total)
            for label, counts in per.items():
                _add(self.layer_buckets.setdefault((layer, label), [0, 0]), counts)
        if any_hit is not None:
            total, per = hit_counts(any_hit, answer_mask, distance, self.edges)
            _add(self.any_total, total)
            for label, counts in per.items():
                _add(self.any_buckets.setdefault(label, [0, 0]), counts)

    def metrics(self, key: str) -> Dict[str, float]:
        """Fractions over answer positions (empty buckets and layers left out): ``key`` and
        ``key/d<lo>_<hi>``, the mean over MSA layers; ``key/layer_<i>`` and
        ``key/layer_<i>/d<lo>_<hi>``, one layer; ``key/any`` and ``key/any/d<lo>_<hi>``, the
        positions where at least one MSA layer selected the needle."""
        out: Dict[str, float] = {}
        hits = sum(h for h, _ in self.layers.values())
        count = sum(n for _, n in self.layers.values())
        if count:
            out[key] = hits / count
        buckets: Dict[str, Counts] = {}  # the mean over layers: every layer's counts of a bucket added
        for (_, label), counts in self.layer_buckets.items():
            _add(buckets.setdefault(label, [0, 0]), counts)
        out.update({f"{key}/{label}": h / n for label, (h, n) in buckets.items() if n})
        out.update({f"{key}/layer_{i}": h / n for i, (h, n) in sorted(self.layers.items()) if n})
        out.update({f"{key}/layer_{i}/{label}": h / n for (i, label), (h, n) in sorted(self.layer_buckets.items()) if n})
        if self.any_total[1]:
            out[f"{key}/any"] = self.any_total[0] / self.any_total[1]
        out.update({f"{key}/any/{label}": h / n for label, (h, n) in self.any_buckets.items() if n})
        return out


def _add(into: Counts, counts: Counts) -> None:
    into[0] += counts[0]
    into[1] += counts[1]


__all__ = ["NeedleTally", "hit_counts", "needle_counts", "needle_hits"]

"""Multi-query associative recall (MQAR) inside long byte-level sequences.

Each example plants ``num_pairs`` key-value pairs at the start of a sequence, fills the
middle with ordinary text (or random bytes), and asks about ``num_queries`` of the keys
at the end: the model must predict a key's value right after seeing the key again. The
distance between a pair and its query is most of the sequence, so a sliding window
shorter than that cannot answer, while attention that can *select* the pair's block can.

Token layout (byte-level vocabulary): keys come from ``key_range``, values from
``value_range`` (high bytes, rare in ASCII source text), so a query is unambiguous.

    [k1 v1 k2 v2 ... kn vn] [filler ...] [kq1 vq1 kq2 vq2 ...]

``answer_mask[t]`` is True where token t is a query key, i.e. where the next-token
prediction at t must be the key's value; accuracy is measured only there.

Distance layout (``distance_buckets`` set, issue 19): the queries still close the sequence,
but each queried pair is planted at a controlled distance before its query, drawn uniformly
from one bucket [edge_i, edge_{i+1}) (queries cycle through the buckets), so accuracy can be
read per distance: a sliding window of W keys can only answer buckets below W, attention
that selects the pair's block can answer all of them. Unqueried pairs go anywhere free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class AssocRecallSpec:
    seq_len: int = 4096
    num_pairs: int = 16
    num_queries: int = 16
    key_range: Tuple[int, int] = (160, 208)
    value_range: Tuple[int, int] = (208, 256)
    #: Edges of the distance buckets (query key position - pair key position); empty: the
    #: classic layout (all pairs at the start).
    distance_buckets: Tuple[int, ...] = ()

    def validate(self) -> "AssocRecallSpec":
        nk = self.key_range[1] - self.key_range[0]
        nv = self.value_range[1] - self.value_range[0]
        if not (1 <= self.num_pairs <= nk):
            raise ValueError(f"assoc_recall.num_pairs={self.num_pairs} is invalid: allowed values are 1..{nk} (distinct keys)")
        if nv < 1:
            raise ValueError(f"assoc_recall.value_range={self.value_range} is invalid: it must be a non-empty range")
        if not (1 <= self.num_queries <= self.num_pairs):
            raise ValueError(f"assoc_recall.num_queries={self.num_queries} is invalid: allowed values are 1..num_pairs")
        if self.seq_len < 2 * (self.num_pairs + self.num_queries) + 1:
            raise ValueError(f"assoc_recall.seq_len={self.seq_len} is invalid: it must exceed 2*(num_pairs+num_queries)")
        e = tuple(self.distance_buckets)
        if e:
            q, top = self.num_queries, self.seq_len - 2 * self.num_queries
            if len(e) < 2 or any(not isinstance(x, int) for x in e) or any(a >= b for a, b in zip(e, e[1:])):
                raise ValueError(f"assoc_recall.distance_buckets={list(e)} is invalid: allowed values are >= 2 "
                                 "strictly increasing integer edges")
            if e[0] < 2 * q or e[-1] > top:
                raise ValueError(f"assoc_recall.distance_buckets={list(e)} is invalid: edges must lie in "
                                 f"[2*num_queries={2 * q}, seq_len - 2*num_queries={top}]")
            if self.num_pairs * 2 + 2 * q > self.seq_len // 2:
                raise ValueError(f"assoc_recall.num_pairs={self.num_pairs} is invalid with distance_buckets: "
                                 f"allowed values keep the pairs under half of seq_len={self.seq_len}")
        return self

    def bucket_labels(self) -> List[str]:
        e = self.distance_buckets
        return [f"d{a}_{b}" for a, b in zip(e, e[1:])]


def make_example(spec: AssocRecallSpec, gen: torch.Generator, filler: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One example: tokens [seq_len] (int64) and answer_mask [seq_len] (bool).

    ``filler``: a 1-D token tensor to cut the middle from (e.g. corpus text); random
    low bytes (< key_range[0]) when None."""
    tokens, answer_mask, _ = make_example_with_distance(spec, gen, filler)
    return tokens, answer_mask


def _filler(spec: AssocRecallSpec, gen: torch.Generator, filler: Optional[torch.Tensor], n: int) -> torch.Tensor:
    if filler is not None and filler.numel() >= n:
        start = int(torch.randint(0, filler.numel() - n + 1, (1,), generator=gen))
        return filler[start:start + n].long().clamp_max(spec.key_range[0] - 1)
    return torch.randint(0, spec.key_range[0], (n,), generator=gen)


def make_example_with_distance(spec: AssocRecallSpec, gen: torch.Generator, filler: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`make_example`, plus distance [seq_len] (int64): at each query key, its
    position minus its pair key's position; 0 elsewhere."""
    spec.validate()
    if spec.distance_buckets:
        return _distance_example(spec, gen, filler)
    n, q = spec.num_pairs, spec.num_queries
    keys = spec.key_range[0] + torch.randperm(spec.key_range[1] - spec.key_range[0], generator=gen)[:n]
    values = torch.randint(spec.value_range[0], spec.value_range[1], (n,), generator=gen)
    pairs = torch.stack([keys, values], 1).flatten()
    asked = torch.randperm(n, generator=gen)[:q]
    queries = torch.stack([keys[asked], values[asked]], 1).flatten()
    middle = _filler(spec, gen, filler, spec.seq_len - pairs.numel() - queries.numel())
    tokens = torch.cat([pairs, middle, queries])
    answer_mask = torch.zeros(spec.seq_len, dtype=torch.bool)
    answer_mask[spec.seq_len - 2 * q::2] = True  # positions of the query keys
    distance = torch.zeros(spec.seq_len, dtype=torch.long)
    qpos = torch.arange(spec.seq_len - 2 * q, spec.seq_len, 2)
    distance[qpos] = qpos - 2 * asked
    return tokens, answer_mask, distance


def _distance_example(spec: AssocRecallSpec, gen: torch.Generator, filler: Optional[torch.Tensor]):
    L, n, q, e = spec.seq_len, spec.num_pairs, spec.num_queries, spec.distance_buckets
    keys = spec.key_range[0] + torch.randperm(spec.key_range[1] - spec.key_range[0], generator=gen)[:n]
    values = torch.randint(spec.value_range[0], spec.value_range[1], (n,), generator=gen)
    tokens = _filler(spec, gen, filler, L)
    used = torch.zeros(L, dtype=torch.bool)
    used[L - 2 * q:] = True
    answer_mask = torch.zeros(L, dtype=torch.bool)
    distance = torch.zeros(L, dtype=torch.long)
    nb = len(e) - 1
    first = int(torch.randint(0, nb, (1,), generator=gen))  # rotate so every bucket gets queries

    def free2(lo: int, hi: int) -> torch.Tensor:
        """Starts p in [lo, hi) with positions p and p + 1 both free."""
        lo = max(lo, 0)
        ok = ~used[lo:hi] & ~used[lo + 1:hi + 1]
        return ok.nonzero().flatten() + lo

    for i in range(n):
        # uniform over the free slots (a pair takes 2 positions): queried pairs at a distance in
        # their bucket, the others anywhere before the queries; fails only if no slot is left
        if i < q:
            b = (first + i) % nb
            qp = L - 2 * q + 2 * i
            slots = free2(qp - e[b + 1] + 1, qp - e[b] + 1)
        else:
            slots = free2(0, L - 2 * q - 1)
        if slots.numel() == 0:
            raise ValueError(f"assoc_recall: no free slot for pair {i} of {n} in seq_len={L} "
                             f"(distance_buckets={list(e)}): use fewer num_pairs / num_queries or a longer sequence")
        p = int(slots[int(torch.randint(0, slots.numel(), (1,), generator=gen))])
        used[p:p + 2] = True
        tokens[p], tokens[p + 1] = keys[i], values[i]
        if i < q:
            qp = L - 2 * q + 2 * i
            tokens[qp], tokens[qp + 1] = keys[i], values[i]
            answer_mask[qp] = True
            distance[qp] = qp - p
    return tokens, answer_mask, distance


def bucket_counts(logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor, distance: torch.Tensor,
                  edges) -> Dict[str, List[int]]:
    """{"d<lo>_<hi>": [correct, count]} over the query keys whose distance is in [lo, hi)
    (counts, not means, so batches and ranks add up); query keys outside every bucket are not counted."""
    if logits.shape[:2] != tokens.shape or tokens.shape != answer_mask.shape or distance.shape != tokens.shape:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, "
                         f"answer_mask {tuple(answer_mask.shape)}, distance {tuple(distance.shape)}")
    ok = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    return counts_by_bucket(ok, answer_mask[:, :-1], distance[:, :-1], edges)


def counts_by_bucket(ok: torch.Tensor, mask: torch.Tensor, distance: torch.Tensor, edges) -> Dict[str, List[int]]:
    """{"d<lo>_<hi>": [ok, count]} over the masked positions whose distance is in [lo, hi): the one
    bucketing of every per-distance probe metric (accuracy here, the needle selection in
    training/needle.py), on aligned tensors of one shape."""
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        sel = mask & (distance >= lo) & (distance < hi)
        out[f"d{lo}_{hi}"] = [int(ok[sel].sum()), int(sel.sum())]
    return out


def make_batch(spec: AssocRecallSpec, batch: int, seed: int, filler: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    toks, masks = zip(*(make_example(spec, gen, filler) for _ in range(batch)))
    return torch.stack(toks), torch.stack(masks)


def recall_accuracy(logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor) -> float:
    """Fraction of query keys whose next-token argmax is the planted value.
    logits [b, s, V] predict token t+1 at position t; tokens/answer_mask [b, s]."""
    if logits.shape[:2] != tokens.shape or tokens.shape != answer_mask.shape:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, "
                         f"answer_mask {tuple(answer_mask.shape)}")
    mask = answer_mask[:, :-1]
    if not mask.any():
        raise ValueError("answer_mask marks no query position")
    pred = logits[:, :-1].argmax(-1)
    return float((pred == tokens[:, 1:])[mask].float().mean())


__all__ = ["AssocRecallSpec", "bucket_counts", "counts_by_bucket", "make_batch", "make_example", "make_example_with_distance",
           "recall_accuracy"]

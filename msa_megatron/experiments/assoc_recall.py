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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class AssocRecallSpec:
    seq_len: int = 4096
    num_pairs: int = 16
    num_queries: int = 16
    key_range: Tuple[int, int] = (160, 208)
    value_range: Tuple[int, int] = (208, 256)

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
        return self


def make_example(spec: AssocRecallSpec, gen: torch.Generator, filler: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One example: tokens [seq_len] (int64) and answer_mask [seq_len] (bool).

    ``filler``: a 1-D token tensor to cut the middle from (e.g. corpus text); random
    low bytes (< key_range[0]) when None."""
    spec.validate()
    n, q = spec.num_pairs, spec.num_queries
    keys = spec.key_range[0] + torch.randperm(spec.key_range[1] - spec.key_range[0], generator=gen)[:n]
    values = torch.randint(spec.value_range[0], spec.value_range[1], (n,), generator=gen)
    pairs = torch.stack([keys, values], 1).flatten()
    asked = torch.randperm(n, generator=gen)[:q]
    queries = torch.stack([keys[asked], values[asked]], 1).flatten()
    middle_len = spec.seq_len - pairs.numel() - queries.numel()
    if filler is not None and filler.numel() >= middle_len:
        start = int(torch.randint(0, filler.numel() - middle_len + 1, (1,), generator=gen))
        middle = filler[start:start + middle_len].long().clamp_max(spec.key_range[0] - 1)
    else:
        middle = torch.randint(0, spec.key_range[0], (middle_len,), generator=gen)
    tokens = torch.cat([pairs, middle, queries])
    answer_mask = torch.zeros(spec.seq_len, dtype=torch.bool)
    answer_mask[spec.seq_len - 2 * q::2] = True  # positions of the query keys
    return tokens, answer_mask


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


__all__ = ["AssocRecallSpec", "make_batch", "make_example", "recall_accuracy"]

"""Passkey retrieval inside long byte-level sequences: a copy probe needing no task training.

Each example plants ``num_keys`` records, one line each, in ordinary text::

    \\nKEY_QWERTY = "3fa09c1e"\\n

and repeats every record at the end of the sequence. Predicting a repeated record's value
(random hex digits) is a long-range copy: the earlier record sits at a controlled distance,
drawn per query from one of ``distance_buckets`` (queries cycle through the buckets), and
nothing nearer tells the digits. A model that copies after a matching multi-byte prefix (the
induction behaviour a code model picks up from its corpus: identifiers defined once, used
later) answers at any distance it can attend to; a sliding window only below its width; MSA
only where its index selects the record's block. Chance is 1/16 per digit.

Unlike the associative-recall task (single rare-byte keys and values, experiments/assoc_recall.py),
which a 55M model did not learn within 50M tokens (issue 19, runs 12 and 13), the probe asks for
a behaviour plain language modelling already trains, so it is scored without being trained on
(``data.passkey.train_fraction > 0`` makes it a trained task where a run needs one).

Layout of one example of ``seq_len`` tokens: filler text, the original records overwriting it
at their drawn positions, and the ``num_keys`` repeated records closing the sequence.
``answer_mask[t]`` marks positions whose next token is a digit of a repeated record's value
(teacher forcing: each digit is predicted after the true earlier digits), ``distance[t]`` the
repeated record's start minus the original's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

PREFIX, MIDDLE, SUFFIX = b"\nKEY_", b' = "', b'"\n'
NAME_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_ALPHABET = b"0123456789abcdef"
CHANCE = 1 / len(VALUE_ALPHABET)


@dataclass(frozen=True)
class PasskeySpec:
    seq_len: int = 8192
    num_keys: int = 12
    name_len: int = 6
    value_len: int = 8
    #: Edges of the distance buckets (repeated record start - original record start).
    distance_buckets: Tuple[int, ...] = (320, 1024, 2048, 3200, 4096, 6144, 7872)

    @property
    def record_len(self) -> int:
        return len(PREFIX) + self.name_len + len(MIDDLE) + self.value_len + len(SUFFIX)

    def validate(self) -> "PasskeySpec":
        q, r, e = self.num_keys, self.record_len, tuple(self.distance_buckets)
        if self.num_keys < 1:
            raise ValueError(f"passkey.num_keys={self.num_keys} is invalid: allowed values are >= 1")
        if self.name_len < 3 or self.value_len < 1:
            raise ValueError(f"passkey.name_len={self.name_len} / value_len={self.value_len} are invalid: allowed "
                             "values are name_len >= 3 (distinct names), value_len >= 1")
        if 2 * q * r > self.seq_len // 2:
            raise ValueError(f"passkey.num_keys={q} is invalid: allowed values keep the records ({2 * q * r} tokens) "
                             f"under half of seq_len={self.seq_len}")
        if len(e) < 2 or any(not isinstance(x, int) for x in e) or any(a >= b for a, b in zip(e, e[1:])):
            raise ValueError(f"passkey.distance_buckets={list(e)} is invalid: allowed values are >= 2 strictly "
                             "increasing integer edges")
        if e[0] < q * r or e[-1] > self.seq_len - q * r:
            raise ValueError(f"passkey.distance_buckets={list(e)} is invalid: edges must lie in [num_keys x record "
                             f"length = {q * r}, seq_len - {q * r} = {self.seq_len - q * r}] (seq_len={self.seq_len})")
        return self

    def bucket_labels(self) -> List[str]:
        e = self.distance_buckets
        return [f"d{a}_{b}" for a, b in zip(e, e[1:])]


def _bytes(b: bytes) -> torch.Tensor:
    return torch.tensor(list(b), dtype=torch.long)


def _names(spec: PasskeySpec, gen: torch.Generator) -> List[bytes]:
    names: List[bytes] = []
    while len(names) < spec.num_keys:
        idx = torch.randint(0, len(NAME_ALPHABET), (spec.name_len,), generator=gen).tolist()
        name = bytes(NAME_ALPHABET[i] for i in idx)
        if name not in names:
            names.append(name)
    return names


def make_example(spec: PasskeySpec, gen: torch.Generator, filler: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example: tokens [seq_len] (int64), answer_mask [seq_len] (bool), distance [seq_len]
    (int64, nonzero only under the mask). ``filler``: 1-D token tensor (held-out text) to cut
    the background from; random printable ASCII when None or too short."""
    spec.validate()
    L, q, r, e = spec.seq_len, spec.num_keys, spec.record_len, spec.distance_buckets
    if filler is not None and filler.numel() >= L:
        start = int(torch.randint(0, filler.numel() - L + 1, (1,), generator=gen))
        tokens = filler[start:start + L].long().clone()
    else:
        tokens = torch.randint(32, 127, (L,), generator=gen)
    records = []
    for name in _names(spec, gen):
        value = bytes(VALUE_ALPHABET[i] for i in torch.randint(0, len(VALUE_ALPHABET), (spec.value_len,),
                                                                   generator=gen).tolist())
        records.append(_bytes(PREFIX + name + MIDDLE + value + SUFFIX))
    used = torch.zeros(L, dtype=torch.bool)
    block = L - q * r
    used[block:] = True
    answer_mask = torch.zeros(L, dtype=torch.bool)
    distance = torch.zeros(L, dtype=torch.long)
    first_digit = len(PREFIX) + spec.name_len + len(MIDDLE)
    nb = len(e) - 1
    rotate = int(torch.randint(0, nb, (1,), generator=gen))  # every bucket gets queries
    for i, rec in enumerate(records):
        qs = block + i * r
        b = (rotate + i) % nb
        lo, hi = max(qs - e[b + 1] + 1, 0), qs - e[b] + 1  # original starts ps with e[b] <= qs - ps < e[b+1]
        occupied = torch.cat([torch.zeros(1, dtype=torch.long), used.long().cumsum(0)])
        starts = torch.arange(lo, hi)
        free = starts[(occupied[starts + r] - occupied[starts]) == 0]
        if free.numel() == 0:
            raise ValueError(f"passkey: no free slot for record {i} of {q} in seq_len={L} "
                             f"(distance_buckets={list(e)}): use fewer num_keys or a longer sequence")
        ps = int(free[int(torch.randint(0, free.numel(), (1,), generator=gen))])
        used[ps:ps + r] = True
        tokens[ps:ps + r] = rec
        tokens[qs:qs + r] = rec
        t = torch.arange(qs + first_digit - 1, qs + first_digit - 1 + spec.value_len)
        answer_mask[t] = True
        distance[t] = qs - ps
    return tokens, answer_mask, distance


__all__ = ["CHANCE", "PasskeySpec", "make_example"]

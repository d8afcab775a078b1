"""Multi-query associative recall in the trainer (data.assoc_recall, issue 10).

* :class:`AssocRecallMix` wraps the training dataset and replaces a fixed, seeded fraction
  of its samples by recall examples whose filler is the sample's own text, so the model can
  learn the task without leaving the LM objective.
* :func:`eval_batches` / :func:`assoc_recall_accuracy_of_model` give the held-out accuracy: the
  same seeded batches at every evaluation (filler from held-out text), argmax of the
  model's logits at each query key compared with the planted value.

Pairs sit at the start of the sequence and queries at its end, so every pair is about a
sequence length from its query: beyond any sliding window shorter than the sequence.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..experiments.assoc_recall import AssocRecallSpec, bucket_counts, make_example, make_example_with_distance, recall_accuracy


class AssocRecallMix(torch.utils.data.Dataset):
    """GPTDataset samples, a ``fraction`` of them (chosen per index from ``seed``) replaced by
    recall examples. Deterministic per index, so resume and data parallelism see the same data."""

    def __init__(self, base, spec: AssocRecallSpec, fraction: float, seed: int, answer_loss_weight: float = 1.0,
                 make=None):
        self.base, self.spec, self.fraction, self.seed = base, spec.validate(), float(fraction), int(seed)
        self.answer_loss_weight = float(answer_loss_weight)
        #: make(spec, gen, filler) -> (tokens, answer_mask, ...): another task's examples (the
        #: passkey probe's, data.passkey.train_fraction) mixed in the same way
        self.make = make or make_example

    def __len__(self) -> int:
        return len(self.base)

    def is_recall(self, idx: int) -> bool:
        return random.Random(self.seed * 1_000_003 + idx).random() < self.fraction

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.base[idx]
        if not self.is_recall(idx):
            return sample
        text = torch.cat([sample["tokens"], sample["labels"][-1:]])
        gen = torch.Generator().manual_seed(self.seed * 7_919 + idx)
        toks, answer = self.make(self.spec, gen, filler=text)[:2]
        out = dict(sample)
        out["tokens"], out["labels"] = toks[:-1].contiguous(), toks[1:].contiguous()
        mask = torch.ones_like(sample["loss_mask"])
        if self.answer_loss_weight != 1.0:  # position t predicts token t+1: the answer after query key t
            mask = torch.where(answer[:-1], torch.full_like(mask, self.answer_loss_weight), mask)
        out["loss_mask"] = mask
        return out


def eval_batches(spec: AssocRecallSpec, n_batches: int, micro_batch: int, seed: int, valid_ds=None, make=None
                 ) -> List[Tuple[torch.Tensor, ...]]:
    """``n_batches`` held-out (tokens [b, s], answer_mask [b, s]) pairs, s = spec.seq_len (the
    training length: every query and its answer inside the window the model sees); filler
    from ``valid_ds`` samples when given, else random bytes. With ``spec.distance_buckets``
    each item also carries distance [b, s] (see assoc_recall.make_example_with_distance).
    ``make(spec, gen, filler) -> (tokens, answer_mask, distance)`` builds another probe's examples
    (the passkey probe, experiments/passkey.py) the same way."""
    make = make or make_example_with_distance
    out = []
    gen = torch.Generator().manual_seed(seed + 4242)
    for i in range(n_batches):
        toks, masks, dists = [], [], []
        for j in range(micro_batch):
            filler = None
            if valid_ds is not None and len(valid_ds) > 0:
                s = valid_ds[(i * micro_batch + j) % len(valid_ds)]
                filler = torch.cat([s["tokens"], s["labels"][-1:]])
            t, m, d = make(spec, gen, filler=filler)
            toks.append(t)
            masks.append(m)
            dists.append(d)
        item = (torch.stack(toks), torch.stack(masks))
        out.append(item + (torch.stack(dists),) if spec.distance_buckets else item)
    return out


@torch.no_grad()
def assoc_recall_accuracy_of_model(model, batches, device, vocab_size: int, edges=None,
                                   after_forward: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]], None]] = None):
    """Mean accuracy over the batches (every rank computes all of them: PP=1, CP=1). With
    ``edges`` (and batches carrying distances): (mean, {"d<lo>_<hi>": accuracy or None}).
    ``after_forward(answer_mask, distance or None)`` runs after each batch's forward (the
    passkey probe's needle diagnostic reads the selections that forward captured)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tp = ps.get_tensor_model_parallel_world_size() if dist.is_initialized() and ps.model_parallel_is_initialized() else 1
    accs, counts = [], {}
    for tokens, mask, *distance in batches:
        tokens = tokens.to(device)
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, pos, None)  # [b, s, V/tp]
        if after_forward is not None:
            after_forward(mask, distance[0] if distance else None)
        if tp > 1:  # the output layer's logits are split over the vocabulary
            logits = gather_from_tensor_model_parallel_region(logits)
        logits = logits[..., :vocab_size]
        accs.append(recall_accuracy(logits.float(), tokens, mask.to(device)))
        if edges and distance:
            for k, (c, n) in bucket_counts(logits, tokens, mask.to(device), distance[0].to(device), edges).items():
                counts[k] = [counts.get(k, [0, 0])[0] + c, counts.get(k, [0, 0])[1] + n]
    mean = sum(accs) / len(accs)
    if not edges:
        return mean
    return mean, {k: (c / n if n else None) for k, (c, n) in counts.items()}


__all__ = ["AssocRecallMix", "eval_batches", "assoc_recall_accuracy_of_model"]

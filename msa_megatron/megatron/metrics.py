"""Per-layer MSA statistics for logging: KL, index entropy, main entropy, selection recall.

Each MSA core attention records one sample per forward (one micro-batch) into a
process-wide tracker, as detached tensors (no host sync on the hot path).
:func:`collect_msa_metrics` reduces the tracker over every rank and returns plain floats.

Reduction: every rank that holds layer ``i`` contributes (sum over its micro-batches,
count). One all-reduce (SUM) of sums and counts over the whole job, then mean = sum /
count, gives per layer the mean over micro-batches, data-parallel replicas, TP ranks
(each TP rank's value is the mean over its own KV groups, all ranks hold the same number
of groups, so the TP mean is the mean over all groups) and CP ranks (equal query chunks),
while pipeline stages that do not hold the layer contribute zeros. It is a collective:
call it on every rank.

The KL reported is the raw token-level KL (before ``kl_coeff`` and loss scaling).
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

#: Columns of one tracker row (per layer).
_FIELDS = ("kl", "count", "index_entropy", "main_entropy", "entropy_count", "recall", "recall_count")
_KL, _N, _IE, _ME, _EN, _R, _RN = range(len(_FIELDS))


class MSAMetricsTracker:
    """Accumulates per-layer sums on the device of the statistics; thread-safe enough for
    one training loop per process."""

    def __init__(self) -> None:
        self._samples: Dict[int, List[Tuple]] = {}
        self._num_layers = 0
        self._lock = threading.Lock()

    def record(self, layer_index: int, num_layers: int, kl: torch.Tensor, index_entropy: Optional[torch.Tensor] = None,
               main_entropy: Optional[torch.Tensor] = None, recall: Optional[torch.Tensor] = None) -> None:
        """Add one micro-batch's statistics of 0-based global layer ``layer_index``
        (entropies: both or neither; recall: only on sampled steps).

        Keeps detached *views*, read when the table is built: the fused-KL kernel path
        fills the KL and entropies during the backward, after this forward-time call."""
        has_entropy = index_entropy is not None and main_entropy is not None
        sample = (kl.detach(), index_entropy.detach() if has_entropy else None,
                  main_entropy.detach() if has_entropy else None, recall.detach() if recall is not None else None)
        with self._lock:
            self._num_layers = max(self._num_layers, int(num_layers), layer_index + 1)
            self._samples.setdefault(layer_index, []).append(sample)

    def reset(self) -> None:
        with self._lock:
            self._samples.clear()

    def local_table(self, device: torch.device) -> torch.Tensor:
        """[num_layers, 7] float64 table of this rank's sums (rows of absent layers are 0)."""
        with self._lock:
            table = torch.zeros(self._num_layers, len(_FIELDS), dtype=torch.float64, device=device)
            def total(values):
                return torch.stack([v.reshape(()).to(torch.float64) for v in values]).sum().to(device)

            for i, samples in self._samples.items():
                table[i, _KL], table[i, _N] = total(s[0] for s in samples), len(samples)
                with_entropy = [s for s in samples if s[1] is not None]
                if with_entropy:
                    table[i, _IE], table[i, _ME] = total(s[1] for s in with_entropy), total(s[2] for s in with_entropy)
                    table[i, _EN] = len(with_entropy)
                with_recall = [s[3] for s in samples if s[3] is not None]
                if with_recall:
                    table[i, _R], table[i, _RN] = total(with_recall), len(with_recall)
        return table

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def agree_num_layers(self, num_layers: int) -> None:
        """Adopt the job-wide layer count, so every rank's table has the same shape."""
        with self._lock:
            self._num_layers = max(self._num_layers, int(num_layers))


TRACKER = MSAMetricsTracker()


def _reduction_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collect_msa_metrics(reset: bool = True, group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
    """Reduce the tracked statistics over all ranks (``group``: default the whole job) and
    return ``indexer_kl``, ``index_entropy``, ``main_entropy`` (means over the MSA layers that
    ran), their ``.../layer_{i}`` values, and ``recall`` / ``recall/layer_{i}`` for layers whose
    recall was sampled (entropies only while ``msa.track_entropy``). Empty when no MSA layer ran in an msa mode since the last reset.
    Collective: every rank of ``group`` must call it."""
    device = _reduction_device()
    table = None
    if dist.is_initialized():
        n = torch.tensor([TRACKER.num_layers], dtype=torch.int64, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        TRACKER.agree_num_layers(int(n.item()))
        table = TRACKER.local_table(device)
        dist.all_reduce(table, group=group)
    else:
        table = TRACKER.local_table(device)
    if reset:
        TRACKER.reset()
    table = table.cpu()
    out: Dict[str, float] = {}
    means = {"indexer_kl": [], "index_entropy": [], "main_entropy": [], "recall": []}
    for i in range(table.shape[0]):
        row = table[i]
        for key, col, count in (("indexer_kl", _KL, _N), ("index_entropy", _IE, _EN), ("main_entropy", _ME, _EN)):
            if row[count] > 0:
                value = float(row[col] / row[count])
                out[f"{key}/layer_{i}"] = value
                means[key].append(value)
        if row[_RN] > 0:
            value = float(row[_R] / row[_RN])
            out[f"recall/layer_{i}"] = value
            means["recall"].append(value)
    for key, values in means.items():
        if values:
            out[key] = sum(values) / len(values)
    return out


def reset_msa_metrics() -> None:
    """Drop what was tracked since the last collect (local, not a collective)."""
    TRACKER.reset()


__all__ = ["MSAMetricsTracker", "TRACKER", "collect_msa_metrics", "reset_msa_metrics"]

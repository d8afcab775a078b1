"""The passkey probe's needle-selection diagnostic (msa_megatron/training/needle.py) on
hand-built selections: hits, misses, KV groups, unused slots, buckets, ignored positions."""

from __future__ import annotations

import pytest
import torch

from msa_megatron.experiments.assoc_recall import bucket_counts
from msa_megatron.training.needle import NeedleTally, hit_counts, needle_counts, needle_hits
from tests.dist_harness import run_distributed

BS, S = 4, 12  # block size, sequence: blocks 0..2
EDGES = [1, 4, 8, 10]


def _case():
    """block_idx [2, 2 groups, 12, 2 slots] (-1 unless set), answer_mask, distance, expected hits."""
    blk = torch.full((2, 2, S, 2), -1, dtype=torch.int32)
    mask = torch.zeros(2, S, dtype=torch.bool)
    dist = torch.zeros(2, S, dtype=torch.long)
    expected = {}

    def at(b, t, d, groups, hit=None):
        mask[b, t], dist[b, t] = True, d
        for g, sel in enumerate(groups):
            blk[b, g, t, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
        if hit is not None:
            expected[(b, t)] = hit

    at(0, 8, 5, [[1, 2], [0, -1]], hit=True)     # source 4 -> block 1, group 0: a hit
    at(0, 9, 9, [[1, 2], [2, -1]], hit=False)    # source 1 -> block 0, selected by none: a miss
    at(0, 10, 3, [[0, 1], [2, -1]], hit=True)    # source 8 -> block 2, selected by group 1 only
    at(0, 11, 4, [[2, -1], [2, -1]])             # last position: not scored (as the accuracy)
    at(1, 5, 5, [[1, -1], [-1, -1]], hit=False)  # source 1 -> block 0; -1 slots must not count as 0
    at(1, 10, 1, [[-1, -1], [-1, -1]], hit=False)  # source 10 -> block 2 = last: -1 must not wrap to it
    at(1, 8, 4, [[1, -1], [-1, -1]], hit=True)   # distance 4 = an edge: bucket d4_8, not d1_4
    at(1, 9, 10, [[0, -1], [-1, -1]], hit=True)  # distance 10 = the last edge: overall only
    blk[0, :, 6] = 1  # a position outside answer_mask whose "needle" (with distance 2) is selected
    dist[0, 6] = 2
    return blk, mask, dist, expected


def test_needle_hits_per_position():
    blk, mask, dist, expected = _case()
    hit = needle_hits(blk, mask, dist, BS)
    assert hit.shape == mask.shape and hit.dtype == torch.bool
    assert {(b, t): bool(hit[b, t]) for b, t in expected} == expected
    assert not hit[0, 6] and not hit[0, 11]  # off the mask; the last position
    assert int(hit.sum()) == sum(expected.values())


def test_needle_counts_overall_and_per_bucket():
    blk, mask, dist, _ = _case()
    total, per = needle_counts(blk, mask, dist, BS, EDGES)
    assert total == [4, 7]  # 7 scored answer positions (the last one is not), 4 hits
    assert per == {"d1_4": [1, 2], "d4_8": [2, 3], "d8_10": [0, 1]}  # distance 10 in no bucket
    # the same positions and buckets as the accuracy's bucket_counts, for a "model" right where it hits
    tokens = torch.zeros(2, S, dtype=torch.long)
    logits = torch.zeros(2, S, 2)
    logits[..., 1] = (~needle_hits(blk, mask, dist, BS)).float()  # argmax 0 (= the token) exactly at hits
    assert bucket_counts(logits, tokens, mask, dist, EDGES) == per


def test_bad_distances_are_refused():
    blk, mask, dist, _ = _case()
    for bad in (0, 10):  # the source must precede position 8 and exist: distance in [1, 9]
        d = dist.clone()
        d[0, 8] = bad
        with pytest.raises(ValueError, match="distance must lie in"):
            needle_hits(blk, mask, d, BS)
    with pytest.raises(ValueError, match="must be"):
        needle_hits(blk, mask[:, :-1], dist, BS)


def test_tally_adds_layers_and_batches():
    blk, mask, dist, _ = _case()
    tally = NeedleTally(EDGES)
    none_hit = torch.full_like(blk, -1)
    tally.add([{"layer_index": 1, "block_size": BS, "block_idx": blk},
               {"layer_index": 3, "block_size": BS, "block_idx": none_hit}], mask, dist)
    tally.add([{"layer_index": 1, "block_size": BS, "block_idx": blk}], mask, dist)
    m = tally.metrics("val_passkey_needle")
    mean_over_layers = {k: v for k, v in m.items() if "/any" not in k and k.count("/") < 2}
    assert mean_over_layers == pytest.approx({
        "val_passkey_needle": 8 / 21, "val_passkey_needle/layer_1": 8 / 14, "val_passkey_needle/layer_3": 0.0,
        "val_passkey_needle/d1_4": 2 / 6, "val_passkey_needle/d4_8": 4 / 9, "val_passkey_needle/d8_10": 0.0})
    assert NeedleTally(EDGES).metrics("k") == {}


def test_tally_per_layer_buckets_and_any_layer():
    """A layer that hits exactly where layer 1 misses: each alone is partial, the mean over the
    two layers is half, and *some* layer reached every needle (key/any = 1)."""
    blk, mask, dist, _ = _case()
    hit1 = needle_hits(blk, mask, dist, BS)
    blk5 = torch.full_like(blk, -1)
    for b, t in (mask & ~hit1).nonzero().tolist():
        blk5[b, 1, t, 0] = (t + 1 - int(dist[b, t])) // BS
    tally = NeedleTally(EDGES)
    tally.add([{"layer_index": 1, "block_size": BS, "block_idx": blk},
               {"layer_index": 5, "block_size": BS, "block_idx": blk5}], mask, dist)
    m = tally.metrics("n")
    assert m["n/layer_1"] == pytest.approx(4 / 7) and m["n/layer_5"] == pytest.approx(3 / 7)
    assert m["n"] == pytest.approx(0.5) and m["n/any"] == 1.0
    assert {k: v for k, v in m.items() if k.startswith("n/any/")} == {"n/any/d1_4": 1.0, "n/any/d4_8": 1.0,
                                                                      "n/any/d8_10": 1.0}
    assert m["n/layer_1/d1_4"] == m["n/layer_5/d1_4"] == 0.5
    assert m["n/layer_1/d4_8"] == pytest.approx(2 / 3) and m["n/layer_5/d4_8"] == pytest.approx(1 / 3)
    assert m["n/layer_1/d8_10"] == 0.0 and m["n/layer_5/d8_10"] == 1.0


def _tp_ranks(rank: int):
    """Rank r holds KV group r of the case's selection: the OR over ranks is every group's hit."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    blk, mask, distance, _ = _case()
    tally = NeedleTally(EDGES, dist.group.WORLD)
    tally.add([{"layer_index": 1, "block_size": BS, "block_idx": blk[:, rank:rank + 1].contiguous()}], mask, distance)
    return tally.metrics("n")


def test_tally_ors_kv_groups_over_tensor_parallel_ranks():
    blk, mask, dist, _ = _case()
    whole = NeedleTally(EDGES)
    whole.add([{"layer_index": 1, "block_size": BS, "block_idx": blk}], mask, dist)
    results = run_distributed(_tp_ranks, 2, timeout=120)
    assert results[0] == results[1] == whole.metrics("n")
    alone = NeedleTally(EDGES)  # rank 0 alone misses the hit of group 1
    alone.add([{"layer_index": 1, "block_size": BS, "block_idx": blk[:, :1]}], mask, dist)
    assert alone.metrics("n")["n"] < whole.metrics("n")["n"]

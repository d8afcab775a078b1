"""The selector-recall harness: recall rises with k, is 1 at full budget, and
concentrated attention beats white noise by a wide margin."""

import torch

from msa_megatron.config import MSAConfig
from msa_megatron.recall import recall_table, selection_recall_from_logits, synthetic_logits


def test_recall_rises_with_k_and_concentration_wins():
    table = recall_table(topks=(8, 16, 32), seq_len=16384, block_size=128, n_queries=64, seed=torch.seed() % 1000)
    for row in table.values():
        assert row[8] < row[16] < row[32] <= 1.0 + 1e-6
    for k in (8, 16, 32):
        assert table["concentrated"][k] > table["white"][k] + 0.3


def test_full_budget_recall_is_one():
    gen = torch.Generator().manual_seed(1)
    qpos = torch.tensor([0, 100, 511, 1000, 2047])
    logits = synthetic_logits("white", 2048, qpos, gen)
    assert abs(selection_recall_from_logits(logits, qpos, MSAConfig(block_size=128, topk=16)) - 1.0) < 1e-5


def test_white_noise_recall_near_fraction_kept():
    gen = torch.Generator().manual_seed(2)
    qpos = torch.full((64,), 16383)
    logits = synthetic_logits("white", 16384, qpos, gen)
    r = selection_recall_from_logits(logits, qpos, MSAConfig(block_size=128, topk=16))
    assert 0.125 < r < 0.25  # 16 of 128 blocks = 12.5% of keys; max-pooling helps a little

"""The associative-recall task: layout, and the accuracy metric on hand-made cases."""

import pytest
import torch

from msa_megatron.experiments.assoc_recall import AssocRecallSpec, make_batch, make_example, recall_accuracy


def test_layout_pairs_early_queries_late():
    spec = AssocRecallSpec(seq_len=200, num_pairs=6, num_queries=4)
    tokens, mask = make_example(spec, torch.Generator().manual_seed(0))
    assert tokens.shape == (200,) and mask.sum() == 4
    pairs = dict(zip(tokens[:12:2].tolist(), tokens[1:12:2].tolist()))
    assert len(pairs) == 6 and all(160 <= k < 208 for k in pairs) and all(208 <= v < 256 for v in pairs.values())
    for t in mask.nonzero().flatten().tolist():
        assert t >= 200 - 8 and pairs[int(tokens[t])] == int(tokens[t + 1])
    middle = tokens[12:192]
    assert (middle < 160).all()


def test_filler_is_used_and_clamped():
    spec = AssocRecallSpec(seq_len=64, num_pairs=2, num_queries=1)
    filler = torch.full((1000,), 250)
    tokens, _ = make_example(spec, torch.Generator().manual_seed(1), filler)
    assert (tokens[4:62] == 159).all()


def test_accuracy_on_hand_made_logits():
    tokens = torch.tensor([[170, 220, 5, 6, 170, 220]])
    mask = torch.tensor([[False, False, False, False, True, False]])
    logits = torch.zeros(1, 6, 256)
    logits[0, 4, 220] = 1.0
    assert recall_accuracy(logits, tokens, mask) == 1.0
    logits[0, 4, 221] = 2.0
    assert recall_accuracy(logits, tokens, mask) == 0.0
    tokens2, mask2 = make_batch(AssocRecallSpec(seq_len=100, num_pairs=4, num_queries=4), 3, seed=0)
    perfect = torch.nn.functional.one_hot(torch.roll(tokens2, -1, 1), 256).float()
    assert recall_accuracy(perfect, tokens2, mask2) == 1.0
    with pytest.raises(ValueError, match="no query position"):
        recall_accuracy(logits, tokens, torch.zeros_like(mask))


def test_bad_spec_errors():
    with pytest.raises(ValueError, match="num_queries"):
        AssocRecallSpec(num_pairs=2, num_queries=3).validate()
    with pytest.raises(ValueError, match="num_pairs"):
        AssocRecallSpec(num_pairs=100).validate()

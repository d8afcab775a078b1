"""The passkey copy probe: layout, distances, and that it separates unbounded copying from a
window (a literal induction algorithm answers every bucket; the same algorithm limited to a
window answers only the buckets inside it)."""

import pytest
import torch

from msa_megatron.experiments.assoc_recall import bucket_counts
from msa_megatron.experiments.passkey import CHANCE, MIDDLE, PREFIX, VALUE_ALPHABET, PasskeySpec, make_example

SPEC = PasskeySpec(seq_len=1024, num_keys=4, name_len=4, value_len=6, distance_buckets=(90, 200, 400, 600, 940))


def _records(tokens: torch.Tensor, spec: PasskeySpec):
    """{name: [(start, value), ...]} found by scanning the bytes for the record pattern."""
    b = bytes(int(x) for x in tokens if x < 256)
    out = {}
    i = b.find(PREFIX)
    while i >= 0:
        name = b[i + len(PREFIX):i + len(PREFIX) + spec.name_len]
        j = i + len(PREFIX) + spec.name_len
        if b[j:j + len(MIDDLE)] == MIDDLE:
            v = b[j + len(MIDDLE):j + len(MIDDLE) + spec.value_len]
            out.setdefault(name, []).append((i, v))
        i = b.find(PREFIX, i + 1)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_layout_each_record_twice_queries_last_at_their_distance(seed):
    text = torch.randint(32, 127, (5000,), generator=torch.Generator().manual_seed(seed))
    tokens, mask, dist = make_example(SPEC, torch.Generator().manual_seed(100 + seed), text)
    r = SPEC.record_len
    assert tokens.shape == mask.shape == dist.shape == (1024,) and r == 5 + 4 + 4 + 6 + 2
    recs = _records(tokens, SPEC)
    assert len(recs) == 4 and all(len(v) == 2 and v[0][1] == v[1][1] for v in recs.values())
    assert all(set(v[0][1]) <= set(VALUE_ALPHABET) for v in recs.values())
    assert sorted(s for v in recs.values() for s, _ in v[1:]) == [1024 - 4 * r + i * r for i in range(4)]
    assert int(mask.sum()) == 4 * 6 and (dist[~mask] == 0).all()
    for t in mask.nonzero().flatten().tolist():  # the next token is a digit of the repeated value
        assert chr(int(tokens[t + 1])) in VALUE_ALPHABET.decode()
    for orig, rep in recs.values():
        d = rep[0] - orig[0]
        assert set(dist[rep[0]:rep[0] + r][mask[rep[0]:rep[0] + r]].tolist()) == {d}
    # every bucket queried (4 keys over 4 buckets)
    buckets = {next(k for k, (lo, hi) in enumerate(zip(SPEC.distance_buckets, SPEC.distance_buckets[1:]))
                    if lo <= rep[0] - orig[0] < hi) for orig, rep in recs.values()}
    assert buckets == {0, 1, 2, 3}
    same = make_example(SPEC, torch.Generator().manual_seed(100 + seed), text)
    assert all(torch.equal(a, b) for a, b in zip(same, (tokens, mask, dist)))


def _induction_logits(tokens: torch.Tensor, mask: torch.Tensor, k: int, window=None, vocab: int = 257):
    """Logits of a literal induction algorithm at the masked positions: find the latest earlier
    position whose k preceding tokens equal the current k (within ``window`` tokens back when
    given) and predict what followed it; a fixed wrong byte ('z') when nothing matches."""
    b, s = tokens.shape
    logits = torch.zeros(b, s, vocab)
    for i in range(b):
        for t in mask[i].nonzero().flatten().tolist():
            ctx = tokens[i, t - k + 1:t + 1]
            lo = k - 1 if window is None else max(k - 1, t - window)
            pred = ord("z")
            for j in range(t - 1, lo - 1, -1):
                if torch.equal(tokens[i, j - k + 1:j + 1], ctx):
                    pred = int(tokens[i, j + 1])
                    break
            logits[i, t, pred] = 1.0
    return logits


def test_induction_answers_every_bucket_and_a_window_only_the_near_ones():
    gen = torch.Generator().manual_seed(7)
    text = torch.randint(32, 127, (20000,), generator=torch.Generator().manual_seed(8))
    examples = [make_example(SPEC, gen, text) for _ in range(6)]
    tokens, mask, dist = (torch.stack(x) for x in zip(*examples))
    edges = SPEC.distance_buckets
    full = bucket_counts(_induction_logits(tokens, mask, k=8), tokens, mask, dist, edges)
    assert all(c == n and n > 0 for c, n in full.values())  # the digits are a copy, at every distance
    win = bucket_counts(_induction_logits(tokens, mask, k=8, window=400), tokens, mask, dist, edges)
    near, far = ("d90_200", "d200_400"), ("d400_600", "d600_940")
    assert all(win[b][0] == win[b][1] for b in near)
    assert all(win[b][0] == 0 for b in far)  # beyond the window nothing nearer holds the digits
    assert CHANCE == 1 / 16


def test_bad_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="passkey.distance_buckets"):
        PasskeySpec(seq_len=1024, num_keys=4, distance_buckets=(10, 200)).validate()  # below 4 records
    with pytest.raises(ValueError, match="passkey.distance_buckets"):
        PasskeySpec(seq_len=1024, num_keys=4, distance_buckets=(200, 100)).validate()
    with pytest.raises(ValueError, match="passkey.num_keys"):
        PasskeySpec(seq_len=1024, num_keys=30, distance_buckets=(900, 1000)).validate()
    with pytest.raises(ValueError, match="passkey.num_keys"):
        PasskeySpec(num_keys=0).validate()


def test_training_mix_replaces_a_fraction_and_weights_the_digits():
    """data.passkey.train_fraction > 0: the sample's own text becomes the filler, the repeated
    digits get answer_loss_weight (position t predicts token t+1), labels stay tokens shifted."""
    from msa_megatron.training.assoc_recall_task import AssocRecallMix

    s = 1024

    class Text(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            t = (torch.arange(s + 1) * 7 + i) % 90 + 32
            return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(s), "position_ids": torch.arange(s)}

    spec = PasskeySpec(seq_len=s + 1, num_keys=4, name_len=4, value_len=6, distance_buckets=(90, 200, 400, 600, 940))
    mix = AssocRecallMix(Text(), spec, 0.5, seed=3, answer_loss_weight=8.0, make=make_example)
    replaced = [i for i in range(64) if mix.is_recall(i)]
    assert 16 <= len(replaced) <= 48
    kept = next(i for i in range(64) if not mix.is_recall(i))
    assert torch.equal(mix[kept]["tokens"], Text()[kept]["tokens"])
    i = replaced[0]
    out = mix[i]
    assert torch.equal(out["tokens"][1:], out["labels"][:-1])
    heavy = (out["loss_mask"] == 8.0).nonzero().flatten()
    assert heavy.numel() == 4 * 6 and set(out["loss_mask"].unique().tolist()) == {1.0, 8.0}
    assert all(chr(int(out["labels"][t])) in VALUE_ALPHABET.decode() for t in heavy.tolist())
    assert len(_records(out["tokens"], spec)) == 4

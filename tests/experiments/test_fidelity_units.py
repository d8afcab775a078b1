"""Issue 10 building blocks on the CPU: the sliding-window core attention against the
reference masked attention, the FLOP-matched window against Eq. 12, the recall data
mix, and the new config fields' errors."""

import math

import pytest
import torch

from msa_megatron.config import MSAConfig, MSAConfigError
from msa_megatron.flops import (AttentionShape, flop_matched_window, flop_matched_window_for, msa_flops_per_token,
                                sliding_window_flops_per_token)
from msa_megatron.ops.naive import dense_attention, sliding_window_attention
from msa_megatron.experiments.assoc_recall import AssocRecallSpec


# --------------------------------------------------------------------------- sliding window
def _swa_module(window, heads=4, groups=2, d=16):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from msa_megatron.megatron.sliding_window import SlidingWindowAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=d, attention_dropout=0.0)
    return SlidingWindowAttention(cfg, 1, AttnMaskType.causal, "self", window=window)


@pytest.mark.parametrize("window", [1, 5, 16, 40, 64])
def test_sliding_window_core_equals_reference(window):
    torch.manual_seed(0)
    b, s, hq, g, d = 2, 40, 4, 2, 16
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, g, d), torch.randn(b, s, g, d)
    q.requires_grad_(True)
    ref, _ = sliding_window_attention(q, k, v, window)
    mod = _swa_module(window)
    out = mod(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None)  # Megatron's [s, b, h, d]
    assert out.shape == (s, b, hq * d)
    torch.testing.assert_close(out.view(s, b, hq, d).transpose(0, 1), ref, atol=1e-5, rtol=1e-5)
    # the window matters: with window >= s it is dense causal attention, otherwise not
    dense, _ = dense_attention(q, k, v)
    assert torch.allclose(ref, dense, atol=1e-5) == (window >= s)
    # gradients flow to q like the reference's
    gq_mod, = torch.autograd.grad(out.sum(), q)
    gq_ref, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq_mod, gq_ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_rejects_bad_window():
    with pytest.raises(ValueError, match="window=0 is invalid"):
        _swa_module(0)


# --------------------------------------------------------------------------- FLOP-matched window
@pytest.mark.parametrize("n", [256, 4096, 8192, 65536])
def test_flop_matched_window_is_the_largest_within_msa_flops(n):
    msa = MSAConfig(block_size=64, topk=8, index_dim=64)
    w = flop_matched_window_for(msa, num_heads=8, head_dim=64, num_kv_heads=2, seq_len=n)
    shape = AttentionShape(8, 64, 2, 64, 64, 8)
    target = 2 * 64 * n + 4 * 8 * 64 * 8 * 64  # Eq. 12 written out: n_I d_I N + 4 n_h d_h k B
    assert msa_flops_per_token(shape, n) == target
    # the mean over t of min(w, t) keys, 4 n_h d_h per key, written out independently
    swa = lambda w_: 4 * 8 * 64 * sum(min(w_, t) for t in range(1, n + 1)) / n  # noqa: E731
    if w < n:
        assert swa(w) <= target < swa(w + 1)
    else:
        assert swa(n) <= target
    assert math.isclose(sliding_window_flops_per_token(shape, w, n), swa(w))
    assert w == flop_matched_window(shape, n)


def test_flop_matched_window_paper_shape():
    # the paper's 109B heads at 64K: MSA costs 1/10.67 of dense; the window is ~1/10 of N
    w = flop_matched_window_for(MSAConfig(), num_heads=64, head_dim=128, num_kv_heads=4, seq_len=65536)
    assert 3072 <= w <= 3328  # k*B = 2048 main keys + the index cost (N/2 * n_I d_I / (2 n_h d_h))


# --------------------------------------------------------------------------- config fields
def test_index_stop_gradient_field():
    assert MSAConfig().index_stop_gradient is True
    with pytest.raises(MSAConfigError, match="index_stop_gradient"):
        MSAConfig(index_stop_gradient="no")


def _cfg(**over):
    from msa_megatron.training.config import load_config

    base = {"model": {"name": "t", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                      "num_query_groups": 2, "kv_channels": 16, "msa_block_size": 16, "msa_topk": 4,
                      "msa_index_dim": 16, "msa_dense_layers": 1},
            "attention": {"type": "msa", "msa": {"block_size": 16, "topk": 4, "index_dim": 16, "first_dense_layers": 1}},
            "train": {"steps": 10, "seq_length": 256, "global_batch_size": 8, "micro_batch_size": 4}}
    for path, value in over.items():
        node = base
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(base)


def test_swa_window_auto_and_layers():
    from msa_megatron.training.config import validate

    cfg = validate(_cfg(**{"attention.type": "swa"}), 1)
    assert cfg.swa_window() == flop_matched_window_for(MSAConfig(block_size=16, topk=4, index_dim=16), 4, 16, 2, 256)
    assert cfg.swa_layers() == [1] and cfg.msa is None
    assert validate(_cfg(**{"attention.type": "swa", "attention.window": 33}), 1).swa_window() == 33


@pytest.mark.parametrize("over, field", [
    ({"attention.type": "dense", "attention.window": 64}, "attention.window"),
    ({"attention.window": 64}, "attention.window"),
    ({"attention.type": "dense", "attention.freeze_indexer": True}, "attention.freeze_indexer"),
    ({"attention.type": "swa", "attention.recall_sweep": [[16, 2]]}, "attention.recall_sweep"),
    ({"attention.recall_sweep": [[10, 2]]}, "attention.recall_sweep[0]"),
    ({"data.assoc_recall.eval_batches": 1, "data.assoc_recall.num_pairs": 200}, "data.assoc_recall"),
    ({"data.assoc_recall.eval_batches": 1, "parallel.pp": 2}, "data.assoc_recall.eval_batches"),
    ({"data.passkey.eval_batches": 1, "data.passkey.num_keys": 40}, "data.passkey"),
    ({"data.passkey.train_fraction": 0.5, "data.assoc_recall.train_fraction": 0.5}, "data.passkey.train_fraction"),
    ({"data.passkey.train_fraction": 0.5, "data.passkey.num_keys": 2, "data.passkey.distance_buckets": [50, 100, 206],
      "data.packing": "eod"}, "data.packing"),
    ({"data.passkey.eval_batches": 1, "data.passkey.distance_buckets": [100, 200]}, "data.passkey"),
    ({"data.passkey.eval_batches": 1, "data.passkey.num_keys": 2, "data.passkey.distance_buckets": [50, 100, 206],
      "parallel.pp": 2}, "data.passkey.eval_batches"),
    ({"attention.type": "swa", "attention.window": 0}, "attention.window"),
])
def test_config_errors_name_the_field(over, field):
    from msa_megatron.training.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(_cfg(**over), 2)
    assert e.value.path == field and "allowed values are" in str(e.value)


# --------------------------------------------------------------------------- recall data
class _FakeGPTDataset(torch.utils.data.Dataset):
    def __init__(self, n, s):
        self.n, self.s = n, s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        text = (torch.arange(self.s + 1) + i) % 100  # ASCII-range "text"
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.s), "position_ids": torch.arange(self.s)}


def test_recall_mix_fraction_determinism_and_layout():
    from msa_megatron.training.assoc_recall_task import AssocRecallMix

    spec = AssocRecallSpec(seq_len=65, num_pairs=4, num_queries=4)
    mix = AssocRecallMix(_FakeGPTDataset(400, 64), spec, 0.25, seed=3)
    chosen = [i for i in range(400) if mix.is_recall(i)]
    assert 60 < len(chosen) < 140  # ~25%
    i = chosen[0]
    a, b = mix[i], mix[i]
    assert torch.equal(a["tokens"], b["tokens"])  # deterministic per index
    assert torch.equal(a["tokens"][1:], a["labels"][:-1])  # labels are the next tokens
    keys, values = a["tokens"][:8:2], a["tokens"][1:8:2]
    assert ((keys >= 160) & (keys < 208)).all() and ((values >= 208) & (values < 256)).all()
    assert (a["tokens"][8:56] < 100).all()  # the sample's own text as filler
    plain = next(j for j in range(400) if not mix.is_recall(j))
    assert torch.equal(mix[plain]["tokens"], _FakeGPTDataset(400, 64)[plain]["tokens"])
    assert not any(AssocRecallMix(_FakeGPTDataset(50, 64), spec, 0.0, 3).is_recall(j) for j in range(50))


def test_recall_mix_answer_loss_weight_marks_exactly_the_answers():
    from msa_megatron.training.assoc_recall_task import AssocRecallMix
    from msa_megatron.training.config import ConfigError, load_config
    from msa_megatron.training.step import masked_lm_loss

    spec = AssocRecallSpec(seq_len=65, num_pairs=4, num_queries=4, distance_buckets=(8, 20, 40, 56))
    plain = AssocRecallMix(_FakeGPTDataset(40, 64), spec, 1.0, seed=3)
    heavy = AssocRecallMix(_FakeGPTDataset(40, 64), spec, 1.0, seed=3, answer_loss_weight=10.0)
    a, w = plain[5], heavy[5]
    assert torch.equal(a["tokens"], w["tokens"]) and torch.equal(a["loss_mask"], torch.ones(64))
    answers = (w["loss_mask"] == 10.0).nonzero().flatten()
    assert len(answers) == 4 and torch.equal(w["loss_mask"] == 1.0, w["loss_mask"] != 10.0)
    # each weighted position is a query key (the key's second occurrence) whose label is its value
    for t in answers.tolist():
        key, value = int(w["tokens"][t]), int(w["labels"][t])
        assert 160 <= key < 208 and 208 <= value < 256
        first = int((w["tokens"][:t] == key).nonzero()[0])
        assert int(w["tokens"][first + 1]) == value
    # the loss: a weighted mean, the answers counting 10 times
    losses = torch.rand(1, 64)
    loss, count, _ = masked_lm_loss(w["loss_mask"][None], losses)
    assert int(count) == 64 + 9 * 4
    assert float(loss) == pytest.approx(float(losses.sum() + 9 * losses[0, answers].sum()), rel=1e-6)
    with pytest.raises(ConfigError, match="answer_loss_weight"):
        load_config({"data": {"assoc_recall": {"answer_loss_weight": 0.5}}})


def test_eval_batches_and_model_accuracy():
    from msa_megatron.training.assoc_recall_task import eval_batches, assoc_recall_accuracy_of_model

    spec = AssocRecallSpec(seq_len=64, num_pairs=4, num_queries=4)
    batches = eval_batches(spec, 2, micro_batch=3, seed=0, valid_ds=_FakeGPTDataset(5, 64))
    assert len(batches) == 2 and batches[0][0].shape == (3, 64) and int(batches[0][1].sum()) == 12
    assert torch.equal(batches[0][0], eval_batches(spec, 2, 3, 0, _FakeGPTDataset(5, 64))[0][0])

    class Oracle(torch.nn.Module):  # predicts the next token exactly: accuracy 1; shifted: 0
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, tokens, pos, mask):
            nxt = torch.roll(tokens, -1, 1)
            return torch.nn.functional.one_hot((nxt + self.shift) % 320, 320).float()

    assert assoc_recall_accuracy_of_model(Oracle(0), batches, "cpu", 257) == 1.0
    assert assoc_recall_accuracy_of_model(Oracle(1), batches, "cpu", 257) == 0.0


# --------------------------------------------------------------------------- the run matrix
@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_every_run_of_the_matrix_composes_and_validates(preset, tmp_path):
    """The exact overrides scripts/fidelity.py passes compose in hydra and pass the trainer's
    validation (the GPU preset is checked here, without a GPU)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from msa_megatron.experiments.fidelity.matrix import PRESETS, RUN_NAMES, plan
    from msa_megatron.train import CONFIG_DIR
    from msa_megatron.training.config import load_config, validate

    (tmp_path / "runs" / "dense" / "checkpoints").mkdir(parents=True)  # the conversion's init_from
    runs = plan(PRESETS[preset], str(tmp_path))
    assert [r.name for r in runs] == list(RUN_NAMES)
    cfgs = {}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for r in runs:
            raw = OmegaConf.to_container(compose("config", overrides=r.overrides), resolve=True)
            raw.pop("hydra", None)
            cfgs[r.name] = validate(load_config(raw), 1)
    d, m, s = cfgs["dense"], cfgs["msa"], cfgs["swa"]
    same = lambda c: (c.model, c.train.seed, c.train.seq_length, c.tokens_per_step(), c.total_steps(), c.data)  # noqa: E731
    assert all(same(cfgs[n]) == same(d) for n in RUN_NAMES if n != "dense_to_msa")  # identical model, data, tokens
    assert d.attention.type == "dense" and s.attention.type == "swa" and m.msa.topk * m.msa.block_size < m.train.seq_length
    assert s.swa_window() < s.train.seq_length - 2 * cfgs["msa"].data.assoc_recall.num_pairs  # pairs beyond the window
    assert cfgs["msa_no_stopgrad"].msa.index_stop_gradient is False and m.msa.index_stop_gradient is True
    assert cfgs["msa_no_warmup"].attention.warmup.steps == 0 and m.attention.warmup.steps > 0
    assert cfgs["msa_no_teacher"].attention.freeze_indexer and not m.attention.freeze_indexer
    c = cfgs["dense_to_msa"]
    assert c.checkpoint.init_from.endswith("runs/dense/checkpoints") and c.total_steps() < d.total_steps()
    if preset == "gpu":
        assert (m.train.seq_length, m.msa.block_size, m.msa.topk) == (4096, 64, 8) and m.train.precision == "bf16"

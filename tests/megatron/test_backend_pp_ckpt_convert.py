"""Pipeline parallelism (the KL of layers on both stages reaches the backward with the
schedule's scale, and the tracker), distributed checkpointing across TP sizes, and
dense -> MSA conversion.

One spawned 2-process gloo run: PP=2 vs PP=1 through Megatron's schedules; save at TP=2
and load at TP=1; convert a dense TP=2 checkpoint and check it at TP=2 and TP=1."""

from __future__ import annotations

import os

import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV

NUM_MICROBATCHES = 2


def _msa_config(pp: int = 1, tp: int = 1, num_layers: int = 4):
    from mcore_helpers import msa_settings, tiny_config

    return tiny_config(msa_settings(first_dense_layers=1), num_layers=num_layers, pipeline_model_parallel_size=pp,
                       tensor_model_parallel_size=tp, pipeline_dtype=torch.float32)


# ----------------------------------------------------------------------------- pipeline parallelism
def _schedule_step(config, full):
    """Megatron's forward_backward_func over NUM_MICROBATCHES micro-batches; grads by global name."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from msa_megatron.megatron import collect_msa_metrics
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from mcore_helpers import BATCH, SEQ, batch, ddp, gpt, load_full_state, shift_layers, stage_offset

    MSAKLAutoScaler.reset()
    collect_msa_metrics()
    model = gpt(config)
    offset = stage_offset(config)
    load_full_state(model, full, offset)
    wrapped = ddp(config, model)
    config.finalize_model_grads_func = finalize_model_grads
    data = iter([batch(seed=100 + i) for i in range(NUM_MICROBATCHES)])

    def step(data_iterator, m):
        tokens, pos, labels = next(data_iterator)
        out = m(tokens, pos, None, labels=labels)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    wrapped.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=step, data_iterator=data, model=[wrapped],
                                num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
                                forward_only=False)
    assert float(MSAKLAutoScaler.main_loss_backward_scale) == 1.0 / NUM_MICROBATCHES  # set by the schedule hook
    grads = {shift_layers(n, offset): p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return grads, collect_msa_metrics()


def _check_pipeline():
    from megatron.core import parallel_state

    from mcore_helpers import assert_close, full_params, gpt, start

    start(pp=1, seed=21)
    full = full_params(gpt(_msa_config(pp=1)))

    start(pp=2, seed=22)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    grads_pp, metrics_pp = _schedule_step(_msa_config(pp=2), full)
    own = {1, 2, 3} & ({0, 1} if stage == 0 else {2, 3})  # MSA layers of this stage
    for i in own:
        key = f"decoder.layers.{i}.self_attention.indexer.index_q.weight"
        assert grads_pp[key].abs().sum() > 0, f"stage {stage}: no KL gradient on layer {i}"

    start(pp=1, seed=23)
    grads_ref, metrics_ref = _schedule_step(_msa_config(pp=1), full)
    for name, g in grads_pp.items():
        assert_close(g, grads_ref[name], f"PP=2 vs PP=1 grad {name}", atol=2e-6)
    assert set(metrics_pp) == set(metrics_ref) and {"indexer_kl/layer_1", "indexer_kl/layer_3"} <= set(metrics_pp)
    for key, value in metrics_ref.items():
        assert abs(metrics_pp[key] - value) < 1e-5, (key, metrics_pp[key], value)
    return metrics_pp["indexer_kl"]


# ----------------------------------------------------------------------------- checkpoints and conversion
def _eval_losses(model):
    from mcore_helpers import batch

    model.eval()
    tokens, pos, labels = batch(seed=5)
    with torch.no_grad():
        out = model(tokens, pos, None, labels=labels)
    model.train()
    return out


def _index_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." in n}


def _check_checkpoints(tmp: str):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    from msa_megatron.megatron import (
        convert_dense_checkpoint,
        load_model_checkpoint,
        save_model_checkpoint,
        set_attention_mode,
    )
    from msa_megatron.megatron.model import dense_config_of
    from mcore_helpers import ROTARY_PERCENT, VOCAB, assert_close, gpt, start

    msa_dir, dense_dir, conv_dir = (os.path.join(tmp, d) for d in ("msa", "dense", "converted"))
    start(tp=2, seed=31)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    cfg = _msa_config(tp=2, num_layers=3)
    model = gpt(cfg)
    # Replicated index parameters are saved once (replica 0 on TP rank 0), with their full shape.
    sharded, _ = extract_sharded_tensors(model.sharded_state_dict())
    index_entries = [t for t in sharded.values() if isinstance(t, ShardedTensor) and ".indexer." in t.key]
    assert len(index_entries) == 8
    for t in index_entries:
        assert t.global_shape == t.local_shape, t
        assert (t.replica_id == 0 or t.replica_id == (0, 0, 0)) == (tp_rank == 0), (t.key, t.replica_id)
    losses_tp2 = _eval_losses(model)
    saved_index = _index_weights(model)
    save_model_checkpoint(model, msa_dir)

    dense_model = gpt(dense_config_of(cfg))
    save_model_checkpoint(dense_model, dense_dir)
    dense_losses = _eval_losses(dense_model)
    converted, report = convert_dense_checkpoint(dense_dir, cfg, VOCAB, 256, save_dir=conv_dir, init="mean",
                                                 rotary_percent=ROTARY_PERCENT, share_embeddings_and_output_weights=False)
    assert len(report.added) == 8 and report.msa_layers == [1, 2]
    assert all(a["init"].startswith("mean") for a in report.added if a["name"].endswith("index_q.weight"))
    assert report.reused_tensors == len(dense_model.state_dict())
    assert os.path.exists(os.path.join(conv_dir, "msa_conversion_report.json"))
    set_attention_mode(converted, "dense")
    assert torch.equal(_eval_losses(converted), dense_losses), "converted model in dense mode != dense model"
    set_attention_mode(converted, "msa")
    sparse_losses = _eval_losses(converted)
    assert torch.isfinite(sparse_losses).all() and not torch.equal(sparse_losses, dense_losses)

    # Load everything at TP=1 (the two ranks become data-parallel replicas).
    start(tp=1, seed=32)
    cfg1 = _msa_config(tp=1, num_layers=3)
    fresh = gpt(cfg1)
    load_model_checkpoint(fresh, msa_dir)
    assert_close(_eval_losses(fresh), losses_tp2, "TP=1 load of a TP=2 checkpoint", rtol=1e-5, atol=1e-6)
    for name, value in _index_weights(fresh).items():
        assert torch.equal(value, saved_index[name]), name

    conv = gpt(cfg1)
    load_model_checkpoint(conv, conv_dir)
    dense1 = gpt(dense_config_of(cfg1))
    load_model_checkpoint(dense1, dense_dir)
    G, hn = 2, 16  # query heads per group, head dim
    for layer in (1, 2):
        attn = conv.decoder.layers[layer].self_attention
        w = attn.linear_qkv.weight.detach().view(2, G + 2, hn, 64)  # full at TP=1: [groups, q.. k v, hn, hidden]
        assert_close(attn.indexer.index_q.weight, w[:, :G].mean(1).reshape(2 * hn, 64), f"layer {layer} index_q init")
        assert_close(attn.indexer.index_k.weight, w[:, G].mean(0), f"layer {layer} index_k init")
    set_attention_mode(conv, "dense")
    assert torch.equal(_eval_losses(conv), _eval_losses(dense1)), "converted (TP=1) dense mode != dense model"
    return "ok"


CLI_CONFIG = """
model: {num_layers: 3, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2, ffn_hidden_size: 128,
        kv_channels: 16, normalization: RMSNorm, add_bias_linear: false, hidden_dropout: 0.0,
        params_dtype: float32}
msa: {block_size: 16, topk: 2, index_dim: 16, first_dense_layers: 1}
vocab_size: 128
max_sequence_length: 256
gpt: {rotary_percent: 0.5, share_embeddings_and_output_weights: false}
"""


def _check_cli(tmp: str, rank: int):
    """msa-convert on the dense TP=2 checkpoint, at TP=2 (last: the CLI shuts the process group down)."""
    import json

    from msa_megatron.convert_cli import main

    path = os.path.join(tmp, "model.yaml")
    if rank == 0:
        with open(path, "w") as f:
            f.write(CLI_CONFIG)
    torch.distributed.barrier()
    out = os.path.join(tmp, "cli")
    from pathlib import Path

    from msa_megatron.training.checkpoint import verify_checkpoint

    assert main(["--load", os.path.join(tmp, "dense"), "--save", out, "--config", path, "--tp", "2"]) == 0
    assert verify_checkpoint(Path(out)) is None  # a manifest msa-train's init_from accepts (no process group left)
    if rank == 0:
        with open(os.path.join(out, "msa_conversion_report.json")) as f:
            report = json.load(f)
        assert report["msa_layers"] == [1, 2] and len(report["added"]) == 8
        assert os.path.exists(os.path.join(out, "metadata.json"))
    return "ok"


def _run_c(rank, tmp):
    from mcore_helpers import quiet

    quiet()
    return {"pp_kl": _check_pipeline(), "ckpt": _check_checkpoints(tmp), "cli": _check_cli(tmp, rank)}


def test_pipeline_checkpoint_and_conversion(tmp_path):
    results = run_distributed(_run_c, 2, str(tmp_path), env=ENV, timeout=600)
    assert results[0] == results[1]
    assert results[0]["ckpt"] == "ok" and results[0]["cli"] == "ok" and results[0]["pp_kl"] > 0

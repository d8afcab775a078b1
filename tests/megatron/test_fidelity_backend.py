"""Issue 10 ablation switches in a real Megatron GPT (one spawned gloo process):
``index_stop_gradient=false`` lets the KL reach the backbone (the paper's pathology), the
default keeps it on the index branch; the sliding-window model builds from the dense spec
with the window in the chosen layers only and trains (gradients everywhere)."""

from __future__ import annotations

import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV


def _kl_only_grads(stop_gradient: bool):
    from megatron.core.distributed import finalize_model_grads

    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from mcore_helpers import batch, ddp, gpt, msa_settings, tiny_config

    config = tiny_config(msa_settings(first_dense_layers=1, index_stop_gradient=stop_gradient), num_layers=2)
    model = gpt(config)
    set_attention_mode(model, "msa")
    wrapped = ddp(config, model)
    tokens, pos, labels = batch()
    MSAKLAutoScaler.set_loss_scale(torch.tensor(1.0))
    wrapped.zero_grad_buffer()
    (wrapped(tokens, pos, None, labels=labels).mean() * 0.0).backward()  # only the KL's gradient flows
    finalize_model_grads([wrapped])
    collect_msa_metrics()
    return {n: float(p.main_grad.abs().sum()) for n, p in model.named_parameters()}


def _swa_model():
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from msa_megatron.megatron.sliding_window import SlidingWindowAttention, build_swa_gpt_model
    from mcore_helpers import ROTARY_PERCENT, VOCAB, batch, tiny_config

    config = tiny_config(None, num_layers=3)
    model = build_swa_gpt_model(config, 24, [1, 2], VOCAB, 256, rotary_percent=ROTARY_PERCENT,
                                share_embeddings_and_output_weights=False)
    cores = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert all(isinstance(layer.self_attention, SelfAttention) for layer in model.decoder.layers)
    assert cores[0] is not SlidingWindowAttention and issubclass(cores[0], DotProductAttention), cores
    assert cores[1] is SlidingWindowAttention and cores[2] is SlidingWindowAttention, cores
    assert model.decoder.layers[1].self_attention.core_attention.window == 24
    tokens, pos, labels = batch()
    model(tokens, pos, None, labels=labels).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    return True


def _run(rank):
    from mcore_helpers import quiet, start

    quiet()
    start(tp=1, seed=5)
    detached = _kl_only_grads(True)
    attached = _kl_only_grads(False)
    return {"detached": detached, "attached": attached, "swa": _swa_model()}


def test_stop_gradient_switch_and_swa_model():
    out = run_distributed(_run, 1, env=ENV, timeout=600)[0]
    index = lambda n: ".indexer." in n  # noqa: E731
    det, att = out["detached"], out["attached"]
    assert all(v > 0 for n, v in det.items() if index(n)) and all(v > 0 for n, v in att.items() if index(n))
    assert all(v == 0 for n, v in det.items() if not index(n)), "KL leaked into the backbone with the stop-gradient"
    leaked = [n for n, v in att.items() if not index(n) and v > 0]
    # without it the KL reaches what feeds the index branch: the MSA layer's input norm and every earlier module
    assert any("layers.1.input_layernorm" in n or "layers.1.self_attention.linear_qkv.layer_norm" in n for n in leaked), leaked
    assert any("embedding" in n for n in leaked) and any("layers.0." in n for n in leaked), leaked
    assert not any("output_layer" in n for n in leaked), leaked  # nothing after the index branch
    assert out["swa"] is True

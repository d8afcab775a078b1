"""MSA layer vs Megatron's dense layer, the index branch and op vs the reference, run-time
modes, recomputation; TP=2 (with and without SP) vs TP=1 for a whole GPT with MoE.

One spawned 2-process gloo run holds every check (Megatron import dominates the cost).
"""

from __future__ import annotations

import math

import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV


# ----------------------------------------------------------------------------- layer-level checks (TP=1)
def _attention_pair(msa, **config_overrides):
    """An MSA self-attention (layer index 1) and Megatron's dense self-attention, same weights."""
    from megatron.core.transformer.spec_utils import build_module

    from msa_megatron.megatron.model import dense_config_of
    from msa_megatron.megatron.specs import (
        MSALocalSpecProvider,
        get_dense_attention_module_spec,
        get_msa_attention_module_spec,
    )
    from mcore_helpers import tiny_config

    backend = MSALocalSpecProvider()
    cfg = tiny_config(msa, **config_overrides)
    attn = build_module(get_msa_attention_module_spec(cfg, backend), config=cfg, layer_number=2)
    dcfg = dense_config_of(cfg)
    dense = build_module(get_dense_attention_module_spec(dcfg, backend), config=dcfg, layer_number=2)
    missing, unexpected = dense.load_state_dict(attn.state_dict(), strict=False)
    assert not missing and all(".indexer." in k or k.startswith("indexer.") for k in unexpected), (missing, unexpected)
    return cfg, attn, dense


def _run(attn, x, rope, grad_out):
    x = x.detach().clone().requires_grad_(True)
    for p in attn.parameters():
        p.grad = None
    out, bias = attn(x, None, rotary_pos_emb=rope)
    assert bias is None
    (out * grad_out).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in attn.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def check_layer_level():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from msa_megatron.ops import naive
    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from mcore_helpers import BATCH, HEAD_DIM, ROTARY_PERCENT, SEQ, assert_close, msa_settings

    MSAKLAutoScaler.reset()
    collect_msa_metrics()
    torch.manual_seed(11)
    rope = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=ROTARY_PERCENT)(SEQ)  # [s, 1, 1, 8]
    x = torch.randn(SEQ, BATCH, 64)
    grad_out = torch.randn(SEQ, BATCH, 64)

    # 1. Full budget (topk 8 >= 7 blocks): MSA == Megatron's dense attention, outputs and grads.
    cfg, attn, dense = _attention_pair(msa_settings(topk=8))
    out_m, gx_m, g_m = _run(attn, x, rope, grad_out)
    out_d, gx_d, g_d = _run(dense, x, rope, grad_out)
    assert_close(out_m, out_d, "full-budget MSA output vs dense")
    assert_close(gx_m, gx_d, "full-budget MSA input grad vs dense")
    for name in ("linear_qkv.weight", "linear_proj.weight"):  # the KL must not touch them
        assert_close(g_m[name], g_d[name], f"full-budget MSA {name} grad vs dense")
    for name, g in g_m.items():
        if name.startswith("indexer."):
            assert g is not None and g.abs().sum() > 0, f"no KL gradient reached {name}"
    metrics = collect_msa_metrics()
    assert set(metrics) == {"indexer_kl", "index_entropy", "main_entropy", "indexer_kl/layer_1",
                            "index_entropy/layer_1", "main_entropy/layer_1"}, sorted(metrics)

    # 2. Sparse (topk 2 of 7 blocks): differs from dense; core attention == the reference op on
    #    the same inputs; index branch == the reference index projections.
    cfg, attn, dense = _attention_pair(msa_settings(topk=2))
    captured = {}
    hooks = [
        attn.core_attention.register_forward_hook(lambda m, a, o: captured.update(args=a, out=o)),
        attn.indexer.register_forward_hook(lambda m, a, o: captured.update(index=o)),
    ]
    out_s, _, g_s = _run(attn, x, rope, grad_out)
    out_d, _, _ = _run(dense, x, rope, grad_out)
    for h in hooks:
        h.remove()
    assert (out_s - out_d).abs().max() > 1e-3, "top-2 of 7 blocks should differ from dense attention"
    q, k, v = (t.detach().transpose(0, 1) for t in captured["args"][:3])
    iq, ik = (t.detach().transpose(0, 1) for t in captured["index"])
    ref_out, ref_aux = naive.msa_attention(q, k, v, iq, ik, cfg.msa, softmax_scale=1.0 / math.sqrt(HEAD_DIM))
    assert_close(captured["out"].detach(), ref_out.transpose(0, 1).reshape(SEQ, BATCH, -1), "core attention vs reference op")
    ix = attn.indexer
    iq_ref, ik_ref = naive.index_projections(
        x.transpose(0, 1), ix.index_q.weight, ix.index_k.weight, ix.index_q_norm.weight, ix.index_k_norm.weight,
        cfg.msa.num_index_heads, rope_freqs=rope[:, 0, 0, :], eps=cfg.layernorm_epsilon)
    assert_close(iq, iq_ref.detach(), "index queries vs naive.index_projections")
    assert_close(ik, ik_ref.detach(), "index key vs naive.index_projections")
    sparse_metrics = collect_msa_metrics()
    assert abs(sparse_metrics["indexer_kl/layer_1"] - float(ref_aux.kl)) < 1e-5, (sparse_metrics, float(ref_aux.kl))
    # The index gradient is d(KL)/d(index params): compare with autograd through the reference.
    for p in attn.indexer.parameters():
        p.grad = None
    iq_r, ik_r = naive.index_projections(
        x.transpose(0, 1), ix.index_q.weight, ix.index_k.weight, ix.index_q_norm.weight, ix.index_k_norm.weight,
        cfg.msa.num_index_heads, rope_freqs=rope[:, 0, 0, :], eps=cfg.layernorm_epsilon)
    _, aux_r = naive.msa_attention(q, k, v, iq_r, ik_r, cfg.msa, softmax_scale=1.0 / math.sqrt(HEAD_DIM))
    aux_r.kl.backward()
    assert_close(g_s["indexer.index_q.weight"], ix.index_q.weight.grad, "index_q grad vs reference KL grad")
    assert_close(g_s["indexer.index_k.weight"], ix.index_k.weight.grad, "index_k grad vs reference KL grad")

    # 3. Modes at run time on the same module.
    assert set_attention_mode(attn, "dense") == 1
    calls = []
    h = attn.indexer.register_forward_hook(lambda *a: calls.append(1))
    out_dense_mode, _, g_dm = _run(attn, x, rope, grad_out)
    h.remove()
    assert torch.equal(out_dense_mode, out_d), "dense mode must run Megatron's own attention exactly"
    assert not calls and all(g is None for n, g in g_dm.items() if n.startswith("indexer.")), "index branch not idle"
    assert collect_msa_metrics() == {}
    set_attention_mode(attn, "msa_warmup")
    out_w, _, g_w = _run(attn, x, rope, grad_out)
    assert_close(out_w, out_d, "msa_warmup main branch vs dense")
    assert g_w["indexer.index_q.weight"].abs().sum() > 0
    assert "indexer_kl/layer_1" in collect_msa_metrics()
    try:
        set_attention_mode(attn, "sparse")
    except ValueError as exc:
        assert "mode" in str(exc) and "msa_warmup" in str(exc)
    else:
        raise AssertionError("unknown mode accepted")
    set_attention_mode(attn, "msa")

    # 4. Selective recomputation of the core attention: same grads (KL included), one metric sample.
    cfg_rc, attn_rc, _ = _attention_pair(msa_settings(topk=2), recompute_granularity="selective",
                                         recompute_modules=["core_attn"])
    attn_rc.load_state_dict(attn.state_dict())
    assert attn_rc.checkpoint_core_attention
    out_rc, _, g_rc = _run(attn_rc, x, rope, grad_out)
    assert_close(out_rc, out_s, "recomputed output")
    for name in ("indexer.index_q.weight", "indexer.index_k.weight", "linear_qkv.weight"):
        assert_close(g_rc[name], g_s[name], f"recomputed grad {name}")
    from msa_megatron.megatron.metrics import TRACKER

    assert TRACKER.local_table(torch.device("cpu"))[1, 1] == 1, "recompute must record one sample per forward"
    collect_msa_metrics()

    # 5. Recall sampling adds recall/layer_i; full budget gives recall 1.
    from msa_megatron.megatron import set_selection_recall_sampling

    _, full_attn, _ = _attention_pair(msa_settings(topk=8))
    assert set_selection_recall_sampling(full_attn, True) == 1
    _run(full_attn, x, rope, grad_out)
    m = collect_msa_metrics()
    assert abs(m["recall/layer_1"] - 1.0) < 1e-6 and abs(m["recall"] - 1.0) < 1e-6, m
    return "ok"


# ----------------------------------------------------------------------------- GPT: TP=2 (SP on/off) vs TP=1
def _gpt_config(tp: int, sp: bool, moe: bool):
    """Layer 0 dense attention + dense MLP, layer 1 MSA + (MoE with a shared expert | dense MLP).
    Megatron refuses MoE with TP > 1 without SP, so the SP-off case uses dense MLPs."""
    from mcore_helpers import moe_overrides, msa_settings, tiny_config

    extra = dict(moe_layer_freq=[0, 1], **moe_overrides(num_experts=4)) if moe else {}
    return tiny_config(msa_settings(first_dense_layers=1), num_layers=2, tensor_model_parallel_size=tp,
                       sequence_parallel=sp, **extra)


def _gpt_step(config, full=None):
    """One forward/backward/Adam step through DDP + finalize_model_grads + Megatron's optimizer."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from msa_megatron.megatron import collect_msa_metrics
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from mcore_helpers import batch, ddp, full_params, gpt, load_full_state, main_grads

    MSAKLAutoScaler.reset()
    collect_msa_metrics()
    model = gpt(config)
    if full is not None:
        load_full_state(model, full)
    params0 = full_params(model)
    wrapped = ddp(config, model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0,
                                                 use_distributed_optimizer=False), [wrapped])
    wrapped.zero_grad_buffer()
    opt.zero_grad()
    tokens, pos, labels = batch()
    losses = wrapped(tokens, pos, None, labels=labels)
    losses.mean().backward()
    finalize_model_grads([wrapped])
    grads = main_grads(model)
    metrics = collect_msa_metrics()
    ok, grad_norm, _ = opt.step()
    assert ok
    after = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." in n}
    return dict(model=model, params0=params0, losses=losses.detach(), grads=grads, metrics=metrics,
                grad_norm=float(grad_norm), after=after)


def _compare_to_tp1(res, ref, what):
    from megatron.core import parallel_state

    from mcore_helpers import assert_close, tp_shard

    assert_close(res["losses"], ref["losses"], f"{what}: per-token LM loss")
    params = dict(res["model"].named_parameters())
    bad = []
    for name, g in res["grads"].items():
        try:
            assert_close(g, tp_shard(params[name], ref["grads"][name]), f"grad {name}", atol=2e-5)
        except AssertionError as exc:
            bad.append(str(exc))
    assert not bad, f"{what}: " + "; ".join(bad)
    assert set(res["metrics"]) == set(ref["metrics"]), (sorted(res["metrics"]), sorted(ref["metrics"]))
    for key, value in ref["metrics"].items():
        assert abs(res["metrics"][key] - value) < 1e-5, (what, key, res["metrics"][key], value)
    assert abs(res["grad_norm"] - ref["grad_norm"]) < 1e-5 * max(1.0, ref["grad_norm"]), (what, res["grad_norm"], ref["grad_norm"])
    # Replicated index parameters: same gradient and same update on every TP rank, equal to TP=1.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, value in res["after"].items():
        assert_close(value, ref["after"][name], f"{what}: updated {name}")
        gathered = [torch.empty_like(value) for _ in range(tp_group.size())]
        torch.distributed.all_gather(gathered, value, group=tp_group)
        assert all(torch.equal(gathered[0], t) for t in gathered), f"{what}: {name} differs across TP ranks"
        p = params[name]
        assert not getattr(p, "tensor_model_parallel", False)
        assert p.sequence_parallel == res["model"].config.sequence_parallel, name


def _run_a(rank):
    from mcore_helpers import quiet, start

    quiet()
    start(tp=1, seed=5)
    out = {"layer": check_layer_level()}

    for sp, moe in ((True, True), (False, False)):
        start(tp=1, seed=5)
        ref = _gpt_step(_gpt_config(tp=1, sp=False, moe=moe))
        assert ref["metrics"]["indexer_kl/layer_1"] > 0 and "indexer_kl/layer_0" not in ref["metrics"]
        full = ref.pop("params0")
        ref.pop("model")
        start(tp=2, sp=sp, seed=99)  # different seed: the weights come from the TP=1 model
        res = _gpt_step(_gpt_config(tp=2, sp=sp, moe=moe), full)
        _compare_to_tp1(res, ref, f"TP=2 sp={sp} moe={moe}")
        out[f"tp1_moe{moe}"] = ref["metrics"]["indexer_kl"]
        out[f"tp2_sp{sp}"] = res["metrics"]["indexer_kl"]
    return out


def test_layer_level_and_tensor_parallel_equivalence():
    results = run_distributed(_run_a, 2, env=ENV, timeout=600)
    assert results[0] == results[1]
    assert results[0]["layer"] == "ok"
    assert abs(results[0]["tp2_spTrue"] - results[0]["tp1_moeTrue"]) < 1e-5
    assert abs(results[0]["tp2_spFalse"] - results[0]["tp1_moeFalse"]) < 1e-5

"""msa.index_grad_clip in a real Megatron GPT with the distributed optimizer (one gloo process).

The stop-gradient keeps the KL's gradient on the index projections, but Megatron clips every
parameter by one global norm, so a larger KL gradient shrinks the backbone's step. With
``separate`` the index parameters are clipped by their own norm: the backbone trains the same
whatever the KL coefficient, and the norm the optimizer returns (the logged one) is the
backbone's alone. ``global`` is the old coupling, and the contrast shows the test can fail.
"""

from __future__ import annotations

import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV

CLIP = 1e-3  # small enough that every step clips
STEPS = 3


def _train(index_grad_clip: str, kl_coeff: float):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from msa_megatron.patches.mcore_019_index_grad_norm_group import INDEX_GRAD_NORM_GROUP
    from mcore_helpers import batch, ddp, gpt, msa_settings, start, tiny_config

    start(tp=1, seed=5)  # the same initial weights in every call
    config = tiny_config(msa_settings(first_dense_layers=1, kl_coeff=kl_coeff, index_grad_clip=index_grad_clip),
                         num_layers=2)
    model = gpt(config)
    set_attention_mode(model, "msa")
    wrapped = ddp(config, model, distributed_optimizer=True)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=CLIP, bf16=False,
                                                 params_dtype=torch.float32, use_distributed_optimizer=True),
                                 [wrapped])
    is_index = {n: ".indexer." in n for n, _ in model.named_parameters()}
    norms = []
    for step in range(STEPS):
        tokens, pos, labels = batch(seed=7 + step)
        wrapped.zero_grad_buffer()
        opt.zero_grad()
        MSAKLAutoScaler.set_loss_scale(torch.tensor(1.0))
        wrapped(tokens, pos, None, labels=labels).mean().backward()
        finalize_model_grads([wrapped])
        by_hand = {part: sum(float(p.main_grad.double().pow(2).sum()) for n, p in model.named_parameters()
                             if is_index[n] == (part == "index")) ** 0.5 for part in ("backbone", "index")}
        ok, returned, _ = opt.step()
        assert ok
        group = (getattr(opt, "grad_norms_by_group", None) or {}).get(INDEX_GRAD_NORM_GROUP)
        norms.append({"by_hand": by_hand, "returned": float(returned),
                      "index_group": None if group is None else float(group)})
        collect_msa_metrics()
    tagged = sorted(n for n, p in model.named_parameters() if getattr(p, "grad_norm_group", None))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, tagged


def _max_diff(a, b, index: bool) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a if (".indexer." in n) == index)


def _run(rank):
    """Trains the four runs here and returns plain numbers (tensors do not outlive the process)."""
    from mcore_helpers import quiet

    quiet()
    runs = {(mode, c): _train(mode, c) for mode in ("separate", "global") for c in (1.0, 64.0)}
    params = {key: p for key, (p, _, _) in runs.items()}
    return {"norms": {f"{m}/{c:g}": n for (m, c), (_, n, _) in runs.items()},
            "tagged": {m: runs[(m, 1.0)][2] for m in ("separate", "global")},
            "index_names": sorted(n for n in params[("separate", 1.0)] if ".indexer." in n),
            "same": _max_diff(params[("separate", 1.0)], params[("separate", 64.0)], index=False),
            "index_same": _max_diff(params[("separate", 1.0)], params[("separate", 64.0)], index=True),
            "moved": _max_diff(params[("global", 1.0)], params[("global", 64.0)], index=False)}


def test_separate_clipping_keeps_the_kl_off_the_backbone_step():
    out = run_distributed(_run, 1, env=ENV, timeout=600)[0]

    # only the index parameters carry the group, all of them
    assert out["tagged"]["separate"] == out["index_names"] and out["index_names"], out["tagged"]
    norms = out["norms"]["separate/1"]
    for s in norms:  # the returned (logged) norm is the backbone's; the index branch has its own
        assert abs(s["returned"] - s["by_hand"]["backbone"]) <= 1e-4 * s["by_hand"]["backbone"], s
        assert abs(s["index_group"] - s["by_hand"]["index"]) <= 1e-4 * s["by_hand"]["index"], s
    # 64x the KL: its gradient is 64x larger, the backbone's step is the same (fp32 rounding)
    kl64 = out["norms"]["separate/64"]
    assert all(abs(a["index_group"] / b["index_group"] - 64.0) < 1e-3 for a, b in zip(kl64, norms)), (kl64, norms)
    assert out["same"] <= 1e-6 and out["index_same"] <= 1e-5, out

    # global: one norm over all parameters, and the KL coefficient moves the backbone
    assert out["tagged"]["global"] == []
    for s in out["norms"]["global/1"]:
        total = (s["by_hand"]["backbone"] ** 2 + s["by_hand"]["index"] ** 2) ** 0.5
        assert abs(s["returned"] - total) <= 1e-4 * total and s["index_group"] is None, s
    assert out["moved"] > 100 * max(out["same"], 1e-8), out

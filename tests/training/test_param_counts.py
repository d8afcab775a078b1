"""The parameter counts behind MFU: routed experts count top-k / experts of their size,
whether or not Megatron marks them as expert-parallel (it sets ``allreduce=False`` only
under EP > 1 or ETP != TP, so that flag cannot be what identifies them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msa_megatron.training import model as training_model


class _Toy(torch.nn.Module):
    def __init__(self, expert_allreduce: bool):
        super().__init__()
        names = {
            "embedding.word_embeddings.weight": 100,
            "decoder.layers.0.self_attention.linear_qkv.weight": 30,
            "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight": 40,
            "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight": 40,
            "decoder.layers.1.mlp.shared_experts.linear_fc1.weight": 12,
            "output_layer.weight": 100,
        }
        self.params = torch.nn.ParameterDict()
        for name, n in names.items():
            p = torch.nn.Parameter(torch.zeros(n))
            if ".experts." in name:
                p.allreduce = expert_allreduce
            self.params[name.replace(".", "__")] = p

    def named_parameters(self, *args, **kwargs):  # Megatron-style dotted names
        for key, p in self.params.items():
            yield key.replace("__", "."), p


@pytest.mark.parametrize("expert_allreduce", [True, False], ids=["ep1", "ep_marked"])
def test_routed_experts_count_topk_over_experts(monkeypatch, expert_allreduce):
    import megatron.core.parallel_state as ps

    for fn in ("get_tensor_model_parallel_world_size", "get_expert_tensor_parallel_world_size",
               "get_expert_data_parallel_world_size"):
        monkeypatch.setattr(ps, fn, lambda: 1)
    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda with_context_parallel=False: 1)
    cfg = SimpleNamespace(model=SimpleNamespace(moe_router_topk=1, num_moe_experts=2,
                                                untie_embeddings_and_output_weights=True))
    counts = training_model.count_parameters(cfg, [_Toy(expert_allreduce)])
    assert counts.total == 100 + 30 + 40 + 40 + 12 + 100
    # untied input embedding: a lookup (no FLOPs); routed experts: 80 x 1/2; the rest in full
    assert counts.active_matmul == 30 + 40 + 12 + 100

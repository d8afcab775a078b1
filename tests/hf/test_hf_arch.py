"""config.json parsing and the fused-tensor maps (no model, no process group: fast)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")

from msa_megatron.hf.arch import HFArch, UnsupportedModelError, fuse_qkv, split_qkv  # noqa: E402

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64,
             intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
             hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


MSA = dict(block_size=16, topk=2, index_dim=16, first_dense_layers=0)


def _arch(**changes):
    return HFArch.from_config({**LLAMA, **changes})


def test_llama_fields_and_model_yaml():
    arch = _arch(rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16")
    assert (arch.group_size, arch.rope_theta, arch.dtype, arch.tie_embeddings) == (2, 10000.0, torch.bfloat16, True)
    m = arch.model_config("x", dict(block_size=16, topk=2, index_dim=16, first_dense_layers=1))
    assert m["num_query_groups"] == 2 and m["kv_channels"] == 16 and m["untie_embeddings_and_output_weights"] is False
    assert m["extra"] == {"layernorm_epsilon": 1e-5} and m["make_vocab_size_divisible_by"] == 64  # 320 = 64 x 5
    assert _arch(vocab_size=151936).vocab_divisor() == 128 and _arch(vocab_size=32001).vocab_divisor() == 1
    legacy = HFArch.from_config({**{k: v for k, v in LLAMA.items() if k != "rope_parameters"}, "rope_theta": 5e5})
    assert legacy.rope_theta == 5e5  # transformers 4.x configs: top-level rope_theta


@pytest.mark.parametrize("changes, words", [
    (dict(model_type="gpt2"), "allowed model_type values are llama, mistral, qwen2, qwen3, glm, mixtral, qwen2_moe, qwen3_moe"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_type='llama3'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(attention_bias=True), "o_proj too"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    (dict(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8, norm_topk_prob=True, num_experts_per_tok=1),
     "num_experts_per_tok=1"),
    (dict(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8, norm_topk_prob=True, decoder_sparse_step=2,
          num_hidden_layers=4),
     "decoder_sparse_step=2"),
])
def test_unsupported_configs_name_what_is_missing(changes, words):
    with pytest.raises(UnsupportedModelError) as e:
        _arch(**changes)
    assert words in str(e.value)


def test_glm_partial_interleaved_rope():
    glm = _arch(model_type="glm", attention_bias=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    m = glm.model_config("g", MSA)
    assert m["rotary_percent"] == 0.5 and glm.qkv_bias
    assert m["extra"] == {"layernorm_epsilon": 1e-6, "add_qkv_bias": True, "rotary_interleaved": True}


def test_qwen_families():
    q2 = _arch(model_type="qwen2")
    assert q2.qkv_bias and not q2.qk_norm and q2.model_config("q", dict(block_size=16, topk=2, index_dim=16,
                                                                        first_dense_layers=0))["extra"]["add_qkv_bias"]
    q3 = _arch(model_type="qwen3", use_sliding_window=False, sliding_window=4096)  # window off: accepted
    assert q3.qk_norm and not q3.qkv_bias
    moe = _arch(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                norm_topk_prob=True, mlp_only_layers=[0])
    assert (moe.num_experts, moe.moe_first_dense_layers, moe.is_moe_layer(0), moe.is_moe_layer(1)) == (4, 1, False, True)
    assert not moe.moe_pre_softmax and "moe_router_pre_softmax" not in moe.model_config("m", MSA)["extra"]
    q2moe = _arch(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  shared_expert_intermediate_size=12, norm_topk_prob=False)
    m = q2moe.model_config("m", MSA)
    assert q2moe.qkv_bias and m["moe_shared_expert_intermediate_size"] == 12
    assert m["extra"] == {"layernorm_epsilon": 1e-6, "add_qkv_bias": True, "moe_router_pre_softmax": True,
                          "moe_shared_expert_gate": True}


@pytest.mark.parametrize("heads, kv", [(4, 2), (8, 1), (6, 6), (12, 4)])
def test_qkv_fuse_layout_and_inverse(heads, kv):
    """Megatron's linear_qkv: per KV group [q heads of the group, k, v] (rows of head_dim)."""
    d, hidden = 16, 24
    arch = _arch(num_attention_heads=heads, num_key_value_heads=kv, head_dim=d)
    g = torch.Generator().manual_seed(heads * 10 + kv)
    q, k, v = (torch.randn(n * d, hidden, generator=g) for n in (heads, kv, kv))
    fused = fuse_qkv(arch, q, k, v)
    G = heads // kv
    for grp in range(kv):
        block = fused[grp * (G + 2) * d:(grp + 1) * (G + 2) * d]
        assert torch.equal(block[:G * d], q[grp * G * d:(grp + 1) * G * d])
        assert torch.equal(block[G * d:(G + 1) * d], k[grp * d:(grp + 1) * d])
        assert torch.equal(block[(G + 1) * d:], v[grp * d:(grp + 1) * d])
    for a, b in zip(split_qkv(arch, fused), (q, k, v)):
        assert torch.equal(a, b)
    bias = fuse_qkv(arch, q[:, 0], k[:, 0], v[:, 0])  # 1-D biases take the same layout
    assert torch.equal(bias, fused[:, 0])

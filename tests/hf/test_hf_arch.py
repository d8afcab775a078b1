"""config.json parsing, the fused-tensor maps, import planning and its refusals (no process group, no model)."""

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
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type='llama3' without low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}),
     "rope_type='yarn' (RoPE scaling: allowed rope_type values are default, llama3)"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type='linear'"),  # transformers 4.x spelling
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4 + 0.5}), "rope_theta=10000.5"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads=4 not dividing"),
    (dict(model_type="mixtral", num_local_experts=4, router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (dict(sparse_attention_config={"sparse_num_index_heads": 4, "sparse_index_dim": 16,
                                   "sparse_attention_freq": [0, 1]}), "sparse_num_index_heads=4"),
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


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_goes_to_model_extra():
    arch = _arch(rope_parameters=LLAMA31_ROPE)
    extra = arch.model_config("l", MSA)["extra"]
    assert extra["rope_llama3_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192.0}
    assert arch.rope_theta == 500000.0
    legacy = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}  # transformers 4.x: rope_scaling + rope_theta
    old = HFArch.from_config({**legacy, "rope_theta": 5e5, "rope_scaling": {k: v for k, v in LLAMA31_ROPE.items()
                                                                          if k != "rope_theta"}})
    assert old.rope_llama3 == arch.rope_llama3
    assert "rope_llama3_scaling" not in _arch().model_config("l", MSA)["extra"]


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


def test_every_missing_piece_in_one_error():
    with pytest.raises(UnsupportedModelError) as e:
        _arch(hidden_act="gelu", mlp_bias=True, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4})
    msg = str(e.value)
    assert msg.startswith("llama config not supported, missing support for: ")
    assert all(w in msg for w in ("hidden_act='gelu'", "mlp_bias=true", "rope_type='dynamic'")), msg


def test_sparse_layers_must_follow_the_dense_ones():
    from msa_megatron.hf.convert import msa_settings

    sparse = {"sparse_num_index_heads": 2, "sparse_index_dim": 16, "sparse_attention_freq": [1, 0]}
    with pytest.raises(UnsupportedModelError, match=r"sparse_attention_freq with MSA layers \[0\]"):
        msa_settings(_arch(sparse_attention_config=sparse), None, None, None, None)
    ok = msa_settings(_arch(sparse_attention_config={**sparse, "sparse_attention_freq": [0, 1]}), None, None, None, None)
    assert ok["first_dense_layers"] == 1 and ok["index_dim"] == 16


# ----------------------------------------------------------------------------- plan_import
def _llama_dir(tmp_path, extra=None, drop=()):
    """A 2-layer Llama safetensors directory written by name (no transformers)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (320, 64), "model.norm.weight": (64,), "lm_head.weight": (320, 64)}
    for i in range(2):
        h = f"model.layers.{i}."
        t.update({h + "input_layernorm.weight": (64,), h + "post_attention_layernorm.weight": (64,),
                  h + "self_attn.q_proj.weight": (64, 64), h + "self_attn.k_proj.weight": (32, 64),
                  h + "self_attn.v_proj.weight": (32, 64), h + "self_attn.o_proj.weight": (64, 64),
                  h + "mlp.gate_proj.weight": (96, 64), h + "mlp.up_proj.weight": (96, 64),
                  h + "mlp.down_proj.weight": (64, 96)})
    t.update(extra or {})
    tensors = {k: torch.randn(s, generator=g) for k, s in t.items() if k not in drop}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tensors


def _params(arch, reader, msa_layers=(1,)):
    """The model's tensors as meta tensors: the HF map's shapes + index tensors on MSA layers."""
    from msa_megatron.hf.arch import hf_global_sources, hf_layer_sources

    sources = dict(hf_global_sources(arch))
    for i in range(arch.num_layers):
        sources.update(hf_layer_sources(arch, i, lambda name: False))
    params = {k: torch.empty(tuple(s(reader.meta).shape), device="meta") for k, s in sources.items()}
    for i in msa_layers:
        m = f"decoder.layers.{i}.self_attention.indexer."
        params.update({m + "index_q.weight": torch.empty(32, 64, device="meta"),
                       m + "index_k.weight": torch.empty(16, 64, device="meta"),
                       m + "index_q_norm.weight": torch.empty(16, device="meta"),
                       m + "index_k_norm.weight": torch.empty(16, device="meta")})
    return params


def _plan(tmp_path, params=None, **kw):
    from msa_megatron.hf.convert import plan_import
    from msa_megatron.hf.io import SafetensorsReader

    hf = _llama_dir(tmp_path, **kw)
    reader = SafetensorsReader(str(tmp_path))
    arch = _arch()
    params = params(arch, reader) if params else _params(arch, reader)
    return hf, reader, params, plan_import(arch, reader, params, [1], "mean", lambda t: t.normal_(0, 0.02))


def test_plan_import_maps_every_tensor_and_initialises_the_index(tmp_path):
    hf, reader, params, (sources, report) = _plan(tmp_path)
    assert reader.read == set()  # planning reads the headers only (shapes from meta tensors)
    assert sorted(sources) == sorted(params) and report["index_from_checkpoint"] == []
    assert [a["init"] for a in report["index_initialised"]] == ["mean of the group's query projections / of all key "
                                                                "projections"] * 2 + ["ones"] * 2
    qkv = sources["decoder.layers.1.self_attention.linear_qkv.weight"](reader.get)
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(qkv[:32], q[:32]) and torch.equal(qkv[32:48], k[:16])  # group 0: its 2 q heads, then k
    index_q = sources["decoder.layers.1.self_attention.indexer.index_q.weight"](reader.get)
    assert torch.allclose(index_q, q.view(2, 2, 16, 64).mean(1).reshape(32, 64))
    index_k = sources["decoder.layers.1.self_attention.indexer.index_k.weight"](reader.get)
    assert torch.allclose(index_k, k.view(2, 16, 64).mean(0))
    fc1 = sources["decoder.layers.0.mlp.linear_fc1.weight"](reader.get)
    assert torch.equal(fc1, torch.cat([hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]]))
    assert "model.layers.0.mlp.down_proj.weight" not in reader.read  # sources read only what they are asked for


@pytest.mark.parametrize("case, words", [
    ("shape", "decoder.layers.0.mlp.linear_fc2.weight: HF shape (64, 96) != model shape (64, 80)"),
    ("missing", "model parameters without an HF tensor: ['decoder.layers.0.mlp.extra.weight']"),
    ("misplaced", "have no place in the model (index tensors on a dense layer? MSA layers are [1])"),
    ("unknown", "1 HF tensors the llama conversion does not know (unsupported modules?): ['model.layers.0.attn_sink']"),
    ("absent", "tensor 'model.layers.1.mlp.up_proj.weight' is not in the checkpoint"),
])
def test_plan_import_refusals_name_the_tensors(tmp_path, case, words):
    def params(arch, reader):
        p = _params(arch, reader)
        if case == "shape":
            p["decoder.layers.0.mlp.linear_fc2.weight"] = torch.empty(64, 80, device="meta")
        if case == "missing":
            p["decoder.layers.0.mlp.extra.weight"] = torch.empty(3, device="meta")
        return p

    extra = {"model.layers.0.self_attn.index_k_proj.weight": (16, 64)} if case == "misplaced" else \
        {"model.layers.0.attn_sink": (4,)} if case == "unknown" else None
    drop = ("model.layers.1.mlp.up_proj.weight",) if case == "absent" else ()
    with pytest.raises((UnsupportedModelError, KeyError)) as e:
        _plan(tmp_path, params, extra=extra, drop=drop)
    assert words in str(e.value)


def test_rope_llama3_scaling_field_is_checked():
    from msa_megatron.megatron.model import make_transformer_config

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    spec = {k: v for k, v in LLAMA31_ROPE.items() if k not in ("rope_type", "rope_theta")}
    assert make_transformer_config(None, **base, rope_llama3_scaling=spec).rope_llama3_scaling == \
        {k: float(v) for k, v in spec.items()}
    with pytest.raises(ValueError, match="a mapping with exactly the keys factor, low_freq_factor"):
        make_transformer_config(None, **base, rope_llama3_scaling={"factor": 8.0})
    with pytest.raises(ValueError, match="0 < low_freq_factor < high_freq_factor"):
        make_transformer_config(None, **base, rope_llama3_scaling={**spec, "low_freq_factor": 4.0, "high_freq_factor": 1.0})


def test_plan_import_megatron_index_init(tmp_path):
    from msa_megatron.hf.convert import plan_import
    from msa_megatron.hf.io import SafetensorsReader

    _llama_dir(tmp_path)
    reader = SafetensorsReader(str(tmp_path))
    arch = _arch()
    params = _params(arch, reader)
    sources, report = plan_import(arch, reader, params, [1], "megatron", lambda t: t.normal_(0, 0.02))
    assert [a["init"] for a in report["index_initialised"]] == ["megatron init_method (requested)"] * 2 + ["ones"] * 2
    w = sources["decoder.layers.1.self_attention.indexer.index_q.weight"](reader.get)
    assert w.shape == (32, 64) and 0.01 < float(w.std()) < 0.03  # init_method's normal(0, 0.02), not a copy of q
    assert torch.equal(sources["decoder.layers.1.self_attention.indexer.index_k_norm.weight"](reader.get), torch.ones(16))


def test_directory_refusals(tmp_path):
    from msa_megatron.hf.convert import _check_out_dir, read_hf_config
    from msa_megatron.hf.io import SafetensorsReader

    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json \(found "
                                                r"\['pytorch_model.bin'\]: re-save with safe_serialization=True\)"):
        SafetensorsReader(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_config(str(tmp_path))
    with pytest.raises(FileExistsError, match="is not empty: allowed values are a new or empty directory"):
        _check_out_dir(str(tmp_path))


def test_reader_refuses_unknown_dtypes_and_bad_offsets(tmp_path):
    import json
    import struct

    from msa_megatron.hf.io import SafetensorsReader

    def write(header, data=b"\0" * 16):
        raw = json.dumps(header).encode()
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    write({"a": {"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 16]}})
    with pytest.raises(ValueError, match="dtype F8_E4M3 is not supported: allowed values are F64, F32"):
        SafetensorsReader(str(tmp_path)).get("a")
    write({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})
    with pytest.raises(ValueError, match=r"data offsets \[0, 32\] outside the file"):
        SafetensorsReader(str(tmp_path))
    write({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {"format": "pt"}})
    r = SafetensorsReader(str(tmp_path))
    assert r.keys() == ["a"] and torch.equal(r.get("a"), torch.zeros(2, 2)) and r.meta("a").shape == (2, 2)

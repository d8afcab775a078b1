"""``--from-hf`` on a CUDA machine (``python -m pytest -m gpu tests/hf/test_hf_gpu.py``).

On CPU, Megatron-Core runs through msa_megatron's compatibility layer (CUDA devices mapped to
the CPU). With CUDA, Megatron allocates on ``torch.cuda.current_device()``: this checks that
the meta-device build still leaves no storage, that the streamed checkpoint equals the
in-memory import bit for bit once loaded into a CUDA model, and that Llama-3 RoPE scaling
reaches the CUDA model's frequencies. Needs no transformers / safetensors (the HF directory
is written by name with a minimal safetensors writer).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tests.dist_harness import run_distributed  # noqa: E402

ENV = {"PYTHONPATH": str(HERE)}
LAYERS, HIDDEN, HEADS, KV, HEAD_DIM, FFN, VOCAB = 3, 64, 4, 2, 16, 96, 320
ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.5, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}
MSA = dict(block_size=16, topk=3, index_dim=16, dense_layers=1)


def _write_safetensors(path: str, tensors) -> None:
    """The safetensors layout: 8-byte little-endian header length, JSON header, raw bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _make_hf(d: str) -> None:
    os.makedirs(d)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        h = f"model.layers.{i}."
        shapes.update({h + "input_layernorm.weight": (HIDDEN,), h + "post_attention_layernorm.weight": (HIDDEN,),
                       h + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                       h + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
                       h + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
                       h + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                       h + "mlp.gate_proj.weight": (FFN, HIDDEN), h + "mlp.up_proj.weight": (FFN, HIDDEN),
                       h + "mlp.down_proj.weight": (HIDDEN, FFN)})
    tensors = {k: (1 + 0.2 * torch.randn(s, generator=g)) if "norm" in k else 0.05 * torch.randn(s, generator=g)
               for k, s in shapes.items()}
    _write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
               intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
               head_dim=HEAD_DIM, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=256,
               tie_word_embeddings=False, rope_parameters=ROPE, dtype="float32")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _llama3_inv_freq() -> torch.Tensor:
    """transformers' _compute_llama3_parameters, in float32 on the CPU."""
    inv = 1.0 / (ROPE["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
    old, low, high, factor = (ROPE["original_max_position_embeddings"], ROPE["low_freq_factor"],
                              ROPE["high_freq_factor"], ROPE["factor"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _job(rank: int, tmp: str):
    from hf_cases import our_logits, quiet

    from msa_megatron.hf import import_hf
    from msa_megatron.hf.convert import build_model, training_config
    from msa_megatron.megatron.checkpoint import load_model_checkpoint

    quiet()
    hf, out = os.path.join(tmp, "hf"), os.path.join(tmp, "ours")
    import_hf(hf, out, show_progress=False, **MSA)  # streamed from a meta model (CUDA devices forced to meta)
    ref, _ = import_hf(hf, os.path.join(tmp, "unused"), save=False, show_progress=False, **MSA)
    src = json.load(open(os.path.join(out, "hf_source.json")))
    model = build_model(training_config(src["model"], src["msa"], 128), VOCAB)
    load_model_checkpoint(model, out)
    a, b = ref.state_dict(), model.state_dict()
    keys = [k for k in a if isinstance(a[k], torch.Tensor) and not k.endswith("_extra_state")]
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    ref, model = ref.cuda(), model.cuda()
    return {
        "param_devices": sorted({str(p.device.type) for p in build_model(training_config(src["model"], src["msa"], 128),
                                                                           VOCAB).parameters()}),
        "mismatch": [k for k in keys if not torch.equal(a[k].cpu(), b[k].cpu())], "n_keys": len(keys),
        "inv_freq": model.rotary_pos_emb.inv_freq.float().cpu(),
        "logits_equal": bool(torch.equal(our_logits(ref, tokens, "dense"), our_logits(model, tokens, "dense"))),
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_streamed_import_on_cuda(tmp_path):
    _make_hf(str(tmp_path / "hf"))
    r = run_distributed(_job, 1, str(tmp_path), env=ENV, timeout=600)[0]
    assert "cuda" in r["param_devices"], r  # Megatron allocated on the GPU: the meta build had to override it
    assert r["mismatch"] == [] and r["n_keys"] == 3 + 6 * LAYERS + 4 * 2, r  # + index tensors of the 2 MSA layers
    assert r["logits_equal"], r
    torch.testing.assert_close(r["inv_freq"], _llama3_inv_freq(), rtol=1e-6, atol=0)

"""Tiny random HF models of each supported family, and the checks run on them (imported
inside a spawned one-process gloo job: Megatron's CPU layer patches torch globally).

Shapes: hidden 64, 4 query heads in 2 KV groups of head dim 16, vocab 320 (padded rows: none,
divisor 64), 3 layers; sequences of 40 tokens, MSA block 16: top-3 blocks cover the whole
sequence (the full-budget case), top-1 is genuinely sparse.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch

VOCAB, HIDDEN, HEADS, KV, HEAD_DIM, LAYERS, SEQ = 320, 64, 4, 2, 16, 3, 40
#: rope_type 'llama3' with non-default parameters (Megatron's GPTModel flag would fix them at
#: 1 / 4 / 8192). Head dim 16, theta 5e4: wavelengths 6, 24, 94 (kept), 363 (between
#: 1024/4 = 256 and 1024/1.5 = 683: smoothed), 1405 ... 81000 (divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.5,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
#: fp32 logits, ours vs transformers (eager attention): same math, different op order.
ATOL, RTOL = 2e-5, 1e-4


def make_hf_model(family: str, out_dir: str, seed: int = 0, dtype=torch.float32, tie: bool = False):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=50000.0)
    if family == "llama":
        cfg = T.LlamaConfig(**common)
        cls = T.LlamaForCausalLM
    elif family == "llama3":  # Llama 3.x RoPE scaling; every frequency regime is hit (see LLAMA3_ROPE)
        cfg = T.LlamaConfig(**{k: v for k, v in common.items() if k != "rope_theta"}, rope_parameters=LLAMA3_ROPE)
        cls = T.LlamaForCausalLM
    elif family == "mistral":
        cfg = T.MistralConfig(**common, sliding_window=None)
        cls = T.MistralForCausalLM
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common)
        cls = T.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = T.Qwen3Config(**common)
        cls = T.Qwen3ForCausalLM
    elif family == "glm":  # partial RoPE (factor 0.5) on interleaved pairs, q/k/v biases, fused gate_up_proj
        cfg = T.GlmConfig(**common, pad_token_id=0, eos_token_id=1)
        cls = T.GlmForCausalLM
    elif family == "mixtral":
        cfg = T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        cls = T.MixtralForCausalLM
    elif family == "qwen2_moe":  # shared expert with a sigmoid gate; top-k weights not renormalised
        cfg = T.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                               shared_expert_intermediate_size=80, norm_topk_prob=False, decoder_sparse_step=1,
                               mlp_only_layers=[0])
        cls = T.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])
        cls = T.Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # HF inits norms at 1 and biases at 0: randomise them so the maps are exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def our_logits(model, tokens: torch.Tensor, mode: str) -> torch.Tensor:
    from msa_megatron.megatron import set_attention_mode

    set_attention_mode(model, mode)
    model.eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None).float()


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("msa_megatron", "megatron", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

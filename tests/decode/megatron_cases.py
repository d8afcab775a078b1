"""Cases of test_decode_megatron.py, run in one spawned single-process gloo group (Megatron's
parallel state is process-global). Each returns plain numbers/lists for the test to check."""

from __future__ import annotations

import os
import sys
from typing import Dict

import torch

#: tests/megatron's helpers (tiny configs, parallel start-up), importable in the spawned child
_MCORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron")
if _MCORE not in sys.path:
    sys.path.insert(0, _MCORE)

#: Tiny GPT: hidden 64, 4 query heads / 2 KV groups (head dim 16), partial RoPE, layer 0
#: dense, block 16, top-2, index dim 16. A 37-token prompt + 30 new tokens spans 5 blocks:
#: selection is genuinely sparse (2 of up to 5 blocks).
VOCAB, BLOCK, TOPK = 96, 16, 2


def _model(mode: str = "msa", seed: int = 11, num_layers: int = 3):
    from mcore_helpers import msa_settings, tiny_config

    from msa_megatron.megatron.model import build_gpt_model

    torch.manual_seed(seed)
    config = tiny_config(msa_settings(block_size=BLOCK, topk=TOPK, first_dense_layers=1, mode=mode),
                         num_layers=num_layers, init_method_std=0.3)
    model = build_gpt_model(config, VOCAB, 256, rotary_percent=0.5, share_embeddings_and_output_weights=False)
    return model.eval()


def _prompt(b: int, p: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, p), generator=g)


def logits_prefill_decode(model, tokens: torch.Tensor, p: int):
    """Logits at every position: a prefill over tokens[:, :p], then one cached step per token."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, s = tokens.shape
    ctx = StaticInferenceContext(b, s)
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    with torch.no_grad():
        parts = [model(tokens[:, :p], pos[:, :p], None, inference_context=ctx)]
        ctx.sequence_len_offset += p
        ctx.enable_decode_mode()
        for t in range(p, s):
            parts.append(model(tokens[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx))
            ctx.sequence_len_offset += 1
    return torch.cat(parts, 1), ctx


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_all(rank: int, kernel_steps: int = 4) -> Dict[str, object]:
    from mcore_helpers import quiet, start

    from msa_megatron.generate import full_logits, generate
    from msa_megatron.megatron import attention as A
    from msa_megatron.megatron.modes import set_attention_mode

    quiet()
    start()
    torch.set_num_threads(1)
    res: Dict[str, object] = {}
    model = _model("msa")
    b, p, n = 2, 37, 30
    prompt = _prompt(b, p)

    # 1. greedy with the cache == argmax of the no-cache forward, token by token (reference)
    cached = generate(model, prompt, n, use_cache=True, return_logits=True)
    uncached = generate(model, prompt, n, use_cache=False, return_logits=True)
    res["greedy_equal"] = torch.equal(cached.tokens, uncached.tokens)
    res["greedy_len"] = cached.tokens.shape[1]
    res["greedy_step_logit_diff"] = max(_maxdiff(a, c) for a, c in zip(cached.step_logits, uncached.step_logits))
    # the cached run's tokens re-scored by one full forward: argmax at every generated position
    full = full_logits(model, cached.tokens)
    res["argmax_consistent"] = torch.equal(full[:, p - 1:-1].argmax(-1), cached.new_tokens)

    # generate()'s cached forward runs under Megatron's InferenceMode: last-position logits only
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    with torch.no_grad(), InferenceMode.active():
        last = model(prompt, torch.arange(p).unsqueeze(0).expand(b, -1), None,
                     inference_context=StaticInferenceContext(b, p), runtime_gather_output=True)
    res["inference_mode_logits_shape"] = list(last.shape)

    # 2. prefill + n decode steps == full forward at those positions (fp32)
    tokens = cached.tokens
    steps, ctx = logits_prefill_decode(model, tokens, p)
    res["logits_diff"] = _maxdiff(steps, full_logits(model, tokens))
    res["logits_scale"] = full.abs().max().item()
    keys = sorted(k for k in ctx.key_value_memory_dict if isinstance(k, tuple))
    res["index_cache_keys"] = [list(k) for k in keys]
    res["index_cache_shape"] = list(ctx.key_value_memory_dict[keys[0]][0].shape)
    # the index-key cache follows beam reordering (swap_key_value_dict)
    before = ctx.key_value_memory_dict[keys[0]][0].clone()
    ctx.swap_key_value_dict(torch.tensor([1, 0]))
    res["swap_ok"] = torch.equal(ctx.key_value_memory_dict[keys[0]][0], before[:, [1, 0]])
    # a sparse check: with full budget the same run would differ (selection actually drops blocks)
    res["sparse_differs_from_dense"] = _maxdiff(full_logits(model, tokens), _dense_logits(model, tokens)) > 1e-4

    # 3. modes dense and msa_warmup through the cache (Megatron's dense attention)
    for mode in ("dense", "msa_warmup"):
        set_attention_mode(model, mode)
        steps, _ = logits_prefill_decode(model, tokens[:, :50], 20)
        res[f"logits_diff_{mode}"] = _maxdiff(steps, full_logits(model, tokens[:, :50]))
    set_attention_mode(model, "msa")

    # 4. a context other than the static one: one clear error
    class FakeDynamic:
        sequence_len_offset = 0

        def is_static_batching(self):
            return False

        def is_dynamic_batching(self):
            return True

    try:
        with torch.no_grad():  # the MSA layer itself (the GPT model asks the context for more first)
            model.decoder.layers[1].self_attention(torch.zeros(p, b, 64), None, inference_context=FakeDynamic())
        res["dynamic_error"] = None
    except NotImplementedError as exc:
        res["dynamic_error"] = str(exc)

    # 5. the kernels (prefill op + decode kernel) under the interpreter on the same model
    if kernel_steps:
        os.environ["TRITON_INTERPRET"] = "1"
        from msa_megatron.ops import triton_decode as TD

        orig, orig_decode = A._inference_backend, TD.msa_decode_triton
        calls = []

        def counting_decode(*args, **kwargs):
            out = orig_decode(*args, **kwargs)
            calls.append(out[2].clone())
            return out

        A._inference_backend = lambda cfg, device: "triton"
        TD.msa_decode_triton = counting_decode
        try:
            kp, kn = 45, kernel_steps  # 3 blocks of 16, top-2: sparse from the prefill on; decode crosses a block edge
            kprompt = prompt[:, :kp] if kp <= p else torch.cat([prompt, _prompt(b, kp - p, seed=9)], 1)
            k_cached = generate(model, kprompt, kn, use_cache=True, return_logits=True)
        finally:
            A._inference_backend, TD.msa_decode_triton = orig, orig_decode
        res["kernel_decode_calls"] = len(calls)
        res["kernel_sparse_selection"] = all(bool((sel >= 0).sum(-1).lt(_nblocks(kp + i + 1)).all())
                                             for i, sel in enumerate(calls))
        k_ref = generate(model, kprompt, kn, use_cache=False, return_logits=True)
        res["kernel_greedy_equal"] = torch.equal(k_cached.tokens, k_ref.tokens)
        res["kernel_logit_diff"] = max(_maxdiff(a, c) for a, c in zip(k_cached.step_logits, k_ref.step_logits))
    return res


def _nblocks(length: int) -> int:
    return -(-length // BLOCK)


def _dense_logits(model, tokens):
    from msa_megatron.generate import full_logits
    from msa_megatron.megatron.modes import set_attention_mode

    set_attention_mode(model, "dense")
    try:
        return full_logits(model, tokens)
    finally:
        set_attention_mode(model, "msa")

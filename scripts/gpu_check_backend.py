"""GPU check of the Megatron-Core backend (one process: ``python scripts/gpu_check_backend.py``).

On a CUDA device: builds a small MSA GPTModel (Transformer Engine spec when TE is installed,
else the local spec; MoE layer included), runs forward/backward in every attention mode,
and compares the Triton kernels (msa.backend=auto) with the pure-PyTorch reference
(msa.backend=reference) on the same weights and batch: LM loss, KL metrics and gradients.
Exit code 0 when everything matches within bf16-level tolerances."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    from msa_megatron import MSAConfig
    from msa_megatron.megatron import build_gpt_model, collect_msa_metrics, make_transformer_config, set_attention_mode
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed
    from msa_megatron.megatron.specs import te_available

    init_distributed(ParallelLayout(), seed=1)
    use_te = te_available()
    seq, batch, vocab = 2048, 2, 1024

    def build(backend: str):
        torch.manual_seed(0)
        msa = MSAConfig(block_size=128, topk=4, index_dim=64, first_dense_layers=1, backend=backend)
        cfg = make_transformer_config(
            msa, num_layers=3, hidden_size=512, num_attention_heads=8, num_query_groups=2, kv_channels=64,
            ffn_hidden_size=1024, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
            bf16=True, params_dtype=torch.bfloat16, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=512,
            moe_layer_freq=[0, 0, 1], moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.01,
        )
        model = build_gpt_model(cfg, vocab, seq, use_te=use_te, rotary_percent=0.5)
        return model.cuda().to(torch.bfloat16)  # as Megatron-LM's Float16Module would

    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(batch, -1)
    results = {}
    weights = None
    for backend in ("reference", "auto"):
        model = build(backend)
        # Megatron draws init from its CUDA RNG tracker, which the first build advanced:
        # give the second model the first one's weights so only the backend differs.
        if weights is None:
            weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(weights)
        for mode in ("dense", "msa_warmup", "msa"):
            set_attention_mode(model, mode)
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t0 = time.time()
            loss = model(tokens, pos, None, labels=tokens).float().mean()
            loss.backward()
            torch.cuda.synchronize()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            results[(backend, mode)] = (float(loss), collect_msa_metrics(), grads, time.time() - t0)
            print(f"{backend:9s} {mode:10s} loss {float(loss):.5f} step {time.time() - t0:.3f}s "
                  f"kl {results[(backend, mode)][1].get('indexer_kl', float('nan')):.5f}")
    ok = True
    for mode in ("dense", "msa_warmup", "msa"):
        ref, tri = results[("reference", mode)], results[("auto", mode)]
        if abs(ref[0] - tri[0]) > 2e-2 * max(1.0, abs(ref[0])):
            ok = False
            print(f"MISMATCH {mode}: loss {ref[0]} vs {tri[0]}")
        for key, value in ref[1].items():
            if abs(tri[1].get(key, float("nan")) - value) > 5e-2 * max(1.0, abs(value)):
                ok = False
                print(f"MISMATCH {mode}: {key} {value} vs {tri[1].get(key)}")
        for name, g in ref[2].items():
            rel = (tri[2][name] - g).norm() / g.norm().clamp_min(1e-6)
            if rel > 5e-2:
                ok = False
                print(f"MISMATCH {mode}: grad {name} relative error {float(rel):.3e}")
    print("backend GPU check:", "OK" if ok else "FAILED", f"(TE spec: {use_te})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

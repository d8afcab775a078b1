#!/usr/bin/env python
"""GPU benchmark of the MSA decode step vs dense decoding (msa_megatron/bench/decode.py).

    python scripts/gpu_bench_decode.py [--out DIR] [--contexts 32K,128K,1M] [--batches 1,8]
                                       [--iters 20] [--time-budget-s 150] [--no-graphs]
    python scripts/gpu_bench_decode.py --aot      # no GPU: compile the kernels for sm_90a, print regs/spills
    python scripts/gpu_bench_decode.py --model    # + megatron-core: generation through Megatron on the GPU

Needs torch + triton and this checkout on PYTHONPATH (no megatron-core). Writes
decode_bench.json and decode_bench.md to --out (default $OUT, else ./decode_bench_out) and
prints the table: every implementation eager (Python launches per call) and as a replayed
CUDA graph, side by side, from one run; the fp8 index-key variant beside the bf16 one. Exit status 1 if a correctness check fails or a timing record errors.

``--model`` (needs megatron-core) runs a small MSA GPT (4 layers, 3 MSA, block 64, top-4)
through Megatron-Core's StaticInferenceContext on the GPU with the Triton kernels: greedy
generation with the cache (prefill op + decode kernel) vs the no-cache forward (the
training op at full length every step), fp32 (tokens must be identical, logits within
1e-3) and bf16 (agreement reported), plus decode tokens/s. Writes decode_model_check.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def aot(arch: int = 90) -> int:
    """Compile every decode kernel at the paper layout for sm_<arch>a with Triton's ptxas."""

    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from msa_megatron.bench.aot import compile_report

    from msa_megatron.ops import triton_decode as TD

    P, F, I = "*bf16", "*fp32", "*i32"
    topk = dict(K=16, KP=16, CH=8192, BLOCK=128, LOCAL=1, INIT=0, PER_ROW=True)
    attend = dict(NKV=4, GQ=16, HP=16, D=128, DP=128, BLOCK=128, BN=TD.ATTEND_BN, KP=16, LOCAL=1, INIT=0,
                  PER_ROW=True, DOT_PREC="tf32", UPCAST=False)
    attend_types = dict(q_ptr=P, k_ptr=P, v_ptr=P, bs_ptr=F, bidx_ptr=I, lens_ptr=I, acc_ptr=F, ml_ptr=F, cnt_ptr=I,
                        out_ptr=P, lse_ptr=F, scale_log2="fp32")
    index = dict(G=4, DI=128, DIP=128, GP=16, BLOCK=128, BN=64, PER_ROW=True, DOT_PREC="tf32", UPCAST=False)
    ch = TD.FUSED_TOPK_CHUNK
    kernels = [
        ("index_block_max", TD._index_block_max, dict(iq_ptr=P, ik_ptr=P, lens_ptr=I, bs_ptr=F), index, 4,
         TD.INDEX_STAGES),
        ("index (fp8 keys)", TD._index_block_max, dict(iq_ptr=P, ik_ptr="*fp8e4nv", lens_ptr=I, bs_ptr=F), index, 4,
         TD.INDEX_STAGES),
        ("topk (one tile)", TD._topk, dict(bs_ptr=F, lens_ptr=I, out_ptr=I), dict(topk, ONE_CHUNK=True), 8, 3),
        ("topk (streamed)", TD._topk, dict(bs_ptr=F, lens_ptr=I, out_ptr=I), dict(topk, ONE_CHUNK=False), 8, 3),
        ("select_attend", TD._select_attend, attend_types, dict(attend, SELECT=True, CH=ch, ONE_CHUNK=True), 8, 3),
        ("select_attend <4K", TD._select_attend, attend_types, dict(attend, SELECT=True, CH=2048, ONE_CHUNK=True), 4, 3),
        ("select_attend strm", TD._select_attend, attend_types, dict(attend, SELECT=True, CH=ch, ONE_CHUNK=False), 4, 3),
        ("attend (given sel)", TD._select_attend, attend_types, dict(attend, SELECT=False, CH=16, ONE_CHUNK=True), 4, 3),
    ]
    print(f"AOT compile for sm_{arch}a, triton {triton.__version__}")
    bad = 0
    for name, fn, types, consts, nw, ns in kernels:
        bad += not compile_report(name, fn, types, consts, nw, ns, arch=arch, width=18)
    return 1 if bad else 0


def model_check(out: str, small: bool = False) -> int:
    """Generation through Megatron-Core on the GPU: cached (kernels) vs uncached, fp32 and bf16.
    ``small`` (no GPU needed): a tiny CPU smoke run of this function on the reference backend."""
    import json
    import time

    import torch

    from msa_megatron import MSAConfig
    from msa_megatron.generate import generate, single_process_port
    from msa_megatron.megatron.model import build_gpt_model, make_transformer_config
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    single_process_port()
    init_distributed(ParallelLayout(), seed=7)
    vocab, p, n = (64, 40, 4) if small else (512, 700, 40)  # 700 + 40 tokens = 12 blocks of 64, top-4: sparse
    dev = "cpu" if small else "cuda"
    results = {}
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(7)
        msa = MSAConfig(block_size=16 if small else 64, topk=2 if small else 4, index_dim=16 if small else 64,
                        first_dense_layers=1, backend="reference" if small else "triton")
        config = make_transformer_config(
            msa, num_layers=4, hidden_size=64 if small else 512, num_attention_heads=8, num_query_groups=2,
            kv_channels=16 if small else 64, ffn_hidden_size=128 if small else 1024, normalization="RMSNorm",
            add_bias_linear=False, hidden_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            init_method_std=0.05)
        model = build_gpt_model(config, vocab, 2048, rotary_percent=0.5,
                                share_embeddings_and_output_weights=False).to(dev).eval()
        prompt = torch.randint(0, vocab, (2, p), device=dev, generator=torch.Generator(dev).manual_seed(3))
        t0 = time.perf_counter()
        cached = generate(model, prompt, n, use_cache=True, return_logits=True)
        t_cached = time.perf_counter() - t0
        uncached = generate(model, prompt, n, use_cache=False, return_logits=True)
        agree = (cached.new_tokens == uncached.new_tokens).float().mean().item()
        first_diff = max((a - b).abs().max().item() for a, b in
                         zip(cached.step_logits[:1], uncached.step_logits[:1]))
        same_prefix = 0
        for a, b in zip(cached.new_tokens.T, uncached.new_tokens.T):
            if not torch.equal(a, b):
                break
            same_prefix += 1
        diffs = [(a - b).abs().max().item() for a, b in zip(cached.step_logits[:same_prefix + 1],
                                                             uncached.step_logits[:same_prefix + 1])]
        name = str(dtype).split(".")[-1]
        rec = dict(token_agreement=agree, identical_prefix=same_prefix, max_logit_diff_on_identical_prefix=max(diffs),
                   first_step_logit_diff=first_diff, prefill_s=cached.prefill_s,
                   decode_tokens_per_s=2 * (n - 1) / cached.decode_s, wall_cached_s=t_cached)
        if dtype == torch.float32:
            rec["ok"] = agree == 1.0 and max(diffs) < 1e-3
            ok &= rec["ok"]
        results[name] = rec
        print(f"model check {name}: {json.dumps(rec)}", flush=True)
        del model
        torch.cuda.empty_cache()
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "decode_model_check.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "decode_bench_out"))
    ap.add_argument("--contexts", default="32K,128K,1M")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-graphs", action="store_true", help="eager timings only (no CUDA-graph rows)")
    ap.add_argument("--time-budget-s", type=float, default=150.0,
                    help="timing records started after this many seconds are skipped")
    ap.add_argument("--aot", action="store_true", help="compile for sm_90a without a GPU and exit")
    ap.add_argument("--model", action="store_true", help="only the Megatron-Core generation check (needs megatron-core)")
    args = ap.parse_args()
    if args.aot:
        return aot()
    if args.model:
        return model_check(args.out, small=not __import__("torch").cuda.is_available())
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench_decode.py needs a CUDA device (use --aot to only compile)", file=sys.stderr)
        return 2
    from msa_megatron.bench.decode import markdown, run

    report = run(args.out, contexts=[parse_len(x) for x in args.contexts.split(",")],
                 batches=[int(x) for x in args.batches.split(",")], iters=args.iters,
                 time_budget_s=args.time_budget_s, graphs=not args.no_graphs)
    print(markdown(report))
    failed = [c for c in report["correctness"] if not c.get("ok")]
    errors = [r for r in report["records"] if str(r.get("status", "ok")).startswith("error")]
    print(f"correctness: {len(report['correctness']) - len(failed)}/{len(report['correctness'])} ok; "
          f"timing records: {len(report['records'])} ({len(errors)} errors); wall {report['meta'].get('wall_s')} s")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())

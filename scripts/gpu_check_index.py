#!/usr/bin/env python
"""GPU check of the Triton index-branch kernels: a thin CLI over tests/gpu/test_gpu_index.py
(the comparisons live there, as pytest tests under ``-m gpu``), plus two tools.

    python scripts/gpu_check_index.py [--quick] [--lengths 8K,32K,64K,128K] [--rows 256]
    python scripts/gpu_check_index.py --cpu-smoke      # the tests' CPU subset (interpreter)
    python scripts/gpu_check_index.py --aot            # compile every variant for sm_90a, no GPU
    python scripts/gpu_check_index.py --time-kl 128K   # KL backward with / without return_stats

Exit status: pytest's (0 = all comparisons passed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.gpu.test_gpu_index import PAPER, parse_length  # noqa: E402
from tests.helpers import timed_ms  # noqa: E402


def run_tests(lengths: str, rows: int, cpu: bool) -> int:
    """The comparisons, through pytest (one process: the tests' conftest picks CUDA or the interpreter)."""
    env = dict(os.environ, MSA_GPU_INDEX_LENGTHS=lengths, MSA_GPU_INDEX_ROWS=str(rows))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/gpu/test_gpu_index.py",
           "-m", "not gpu" if cpu else "gpu"]
    print(" ".join(cmd), f"(lengths {lengths}, rows {rows})", flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def aot_compile(arch: int = 90) -> int:
    """Compile every kernel variant ahead of time for sm_<arch> (no GPU needed: triton's
    bundled ptxas) and print registers / spills. Uses triton internals (ASTSource,
    GPUTarget); pointer and stride arguments get the divisibility-16 hint the JIT gives
    aligned tensors with contiguous layouts."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from msa_megatron.ops import triton_index as TI

    ptr_types = {"qpos_ptr": "*i64", "ds_ptr": "*i64", "out_ptr": "*i32", "order_ptr": "*i64", "ikey_ptr": "*i64",
                 "istart_ptr": "*i64", "iend_ptr": "*i64"}
    floats = {"iscale_log2", "scale_log2", "iscale", "coef"}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    base = dict(DI=128, DIP=128, BLOCK=128, BLOCK_N=128, NSUB=1, DOT_PREC="tf32", UPCAST=False, HAS_DOC=False)
    sel = dict(base, K=16, KP=16, INIT_BLOCKS=0, LOCAL_BLOCKS=1, BLOCK_M=128, LAZY=True, SCORE_ONLY=False)
    kl = dict(base, K=16, G=16, D=128, DP=128, BLOCK_Q=64, CHUNK=256, DENSE=False, STATS=False)
    variants = [
        ("select", TI._select_kernel, sel, 8, 3, "bf16"),
        ("select-eager", TI._select_kernel, dict(sel, LAZY=False), 8, 3, "bf16"),
        ("select-scoreonly", TI._select_kernel, dict(sel, SCORE_ONLY=True), 8, 3, "bf16"),
        ("select-B96-K6", TI._select_kernel, dict(sel, K=6, KP=8, INIT_BLOCKS=1, LOCAL_BLOCKS=2, DI=96, BLOCK=96,
                                                   BLOCK_N=32, NSUB=3), 8, 3, "bf16"),
        ("select-fp32", TI._select_kernel, dict(sel, DOT_PREC="ieee"), 8, 2, "fp32"),
        ("selected-lse", TI._selected_lse_kernel, dict(base, K=16, BLOCK_Q=64), 8, 1, "bf16"),
        ("dense-lse", TI._dense_lse_kernel, dict(base, BLOCK_M=128), 8, 3, "bf16"),
        ("kl-sparse", TI._kl_kernel, kl, 8, 2, "bf16"),
        ("kl-sparse-stats", TI._kl_kernel, dict(kl, STATS=True), 8, 2, "bf16"),
        ("kl-sparse-bn64", TI._kl_kernel, dict(kl, BLOCK_N=64, NSUB=2), 8, 2, "bf16"),
        ("kl-dense", TI._kl_kernel, dict(kl, DENSE=True, K=1, CHUNK=1024), 8, 2, "bf16"),
        ("kl-dense-stats", TI._kl_kernel, dict(kl, DENSE=True, K=1, CHUNK=1024, STATS=True), 8, 2, "bf16"),
        ("kl-sparse-fp32", TI._kl_kernel, dict(kl, DOT_PREC="ieee"), 8, 2, "fp32"),
        # packed documents (per-query doc_start lower bound)
        ("select-doc", TI._select_kernel, dict(sel, HAS_DOC=True), 8, 2, "bf16"),
        ("selected-lse-doc", TI._selected_lse_kernel, dict(base, K=16, BLOCK_Q=64, HAS_DOC=True), 8, 1, "bf16"),
        ("dense-lse-doc", TI._dense_lse_kernel, dict(base, BLOCK_M=128, HAS_DOC=True), 8, 3, "bf16"),
        ("kl-sparse-doc", TI._kl_kernel, dict(kl, HAS_DOC=True), 8, 2, "bf16"),
        ("kl-dense-doc", TI._kl_kernel, dict(kl, DENSE=True, K=1, CHUNK=1024, HAS_DOC=True), 8, 2, "bf16"),
    ]
    failed = False
    for name, fn, consts, warps, stages, dt in variants:
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a] = "constexpr"
                continue
            if a.endswith("_ptr"):
                sig[a] = ptr_types.get(a, "*fp32" if a in ("best_ptr", "part_ptr", "lse_ptr", "mlse_ptr", "ilse_ptr",
                                                          "diq_ptr", "dik_ptr", "kl_ptr", "ent_ptr") else f"*{dt}")
            else:
                sig[a] = "fp32" if a in floats else "i32"
            if a.endswith("_ptr") or a.startswith("s_") or a in ("sq", "sk"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 64),
                               options=dict(num_warps=warps, num_stages=stages))
            info = "ptxas -v unavailable"
            if ptxas.exists():
                tmp = Path(f"/tmp/msa_aot_{name}.ptx")
                tmp.write_text(k.asm["ptx"])
                out = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{arch}a", str(tmp), "-o", str(tmp) + ".cubin"],
                                     capture_output=True, text=True)
                info = " | ".join(x.split(":", 1)[-1].strip() for x in out.stderr.splitlines()
                                  if "registers" in x or "spill" in x)
            print(f"{name:18s} OK   {time.time() - t0:5.1f} s  smem {k.metadata.shared:6d} B  {info}", flush=True)
        except Exception as exc:
            failed = True
            print(f"{name:18s} FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


def time_kl(L: int, dense_L: int, seed: int, reps: int = 5, dev: str = "cuda", layout=PAPER) -> None:
    """Median CUDA-event times of the KL backward kernels without / with return_stats
    (``dev='cpu'``: wall-clock under the interpreter, only to test this function)."""
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI

    TI.POISON_OUTPUTS = False
    hq, g, d, di, B, K = (layout[x] for x in ("hq", "g", "d", "di", "B", "K"))
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, num_index_heads=g)

    def timed(fn) -> float:
        return timed_ms(fn, reps, dev)

    print("\n| kernel | L | ms (no stats) | ms (return_stats) | overhead |\n|---|---|---|---|---|")
    for kind, n in (("sparse", L), ("dense", min(L, dense_L))):
        gen = torch.Generator(device=dev).manual_seed(seed + n)
        mk = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(torch.bfloat16)  # noqa: E731
        q, k, iq, ik = mk(1, n, hq, d), mk(1, n, g, d), mk(1, n, g, di), mk(1, n, di)
        main_lse = TI.dense_main_lse(q, k) if kind == "dense" else None
        if kind == "sparse":
            sel, ilse, plan = TI.index_select(iq, ik, cfg, return_plan=True)
            # A main LSE of the right shape and size (its exact values do not change the work).
            main_lse = TI.selected_lse(iq, ik, sel, cfg).repeat_interleave(hq // g, 1)
            run = lambda st: TI.sparse_kl_backward(q, k, iq, ik, sel, main_lse, ilse, cfg, plan=plan,  # noqa: E731
                                                   return_stats=st)
        else:
            ilse = TI.dense_index_lse(iq, ik, cfg)
            run = lambda st: TI.dense_kl_backward(q, k, iq, ik, main_lse, cfg, index_lse=ilse,  # noqa: E731
                                                  return_stats=st)
        t0, t1 = timed(lambda: run(False)), timed(lambda: run(True))
        print(f"| {kind} KL backward | {n} | {t0:.2f} | {t1:.2f} | {100 * (t1 / t0 - 1):+.1f}% |", flush=True)
        del q, k, iq, ik, main_lse
        if dev == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="lengths 8K,32K and 128 rows")
    p.add_argument("--lengths", default=None, help="default 8K,32K,64K,128K")
    p.add_argument("--rows", type=int, default=None, help="query rows compared per length (default 256)")
    p.add_argument("--dense-max-L", type=parse_length, default=parse_length("32K"),
                   help="--time-kl: the dense KL's length (default 32K)")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "little"))
    p.add_argument("--aot", action="store_true",
                   help="only compile every kernel for sm_90a ahead of time (no GPU needed) and print regs / spills")
    p.add_argument("--time-kl", type=parse_length, default=None,
                   help="only time the KL backward kernels with / without return_stats at this length (GPU)")
    p.add_argument("--cpu-smoke", action="store_true", help="the tests' CPU subset under TRITON_INTERPRET=1")
    args = p.parse_args()
    if args.aot:
        return aot_compile()
    if args.cpu_smoke:
        return run_tests("4096", 128, cpu=True)
    if not torch.cuda.is_available():
        print("gpu_check_index.py needs a CUDA device", file=sys.stderr)
        return 2
    if args.time_kl:
        time_kl(args.time_kl, args.dense_max_L, args.seed)
        return 0
    os.environ["MSA_GPU_SEED"] = str(args.seed)
    lengths = args.lengths or ("8K,32K" if args.quick else "8K,32K,64K,128K")
    return run_tests(lengths, args.rows or (128 if args.quick else 256), cpu=False)


if __name__ == "__main__":
    sys.exit(main())

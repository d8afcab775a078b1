#!/usr/bin/env python
"""GPU check of MSA's main-branch kernels and of the whole op: a thin CLI over
tests/gpu/test_gpu_main.py (the comparisons live there, as pytest tests under ``-m gpu``), plus
two tools.

    python scripts/gpu_check_main.py [--quick] [--lengths 8K,32K,128K] [--slice 256]
    python scripts/gpu_check_main.py --cpu-smoke      # the tests' CPU subset (interpreter)
    python scripts/gpu_check_main.py --aot            # compile the kernels for sm_90a, no GPU
    python scripts/gpu_check_main.py --tune [--tune-L 128K] [--tune-configs "fwd_rows=64;bwd_block_n=64"]

``--tune`` times the main branch (forward incl. reverse index, and backward) at one length for a
list of kernel configs (``KernelConfig`` fields as in ``MSA_MAIN_KERNEL``, plus ``det=0`` for
atomic dQ), one compile each. Exit status of the checks: pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from msa_megatron.config import MSAConfig  # noqa: E402
from tests.gpu.test_gpu_main import parse_length  # noqa: E402
from tests.helpers import random_block_selection, timed_ms  # noqa: E402

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16
DEV = "cuda"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def cpu_smoke_layout() -> None:
    """--cpu-smoke: tiny layout on CPU through the Triton interpreter (tests this script)."""
    global HQ, HKV, D, DI, B, K, DEV
    HQ, HKV, D, DI, B, K, DEV = 4, 2, 32, 16, 16, 4, "cpu"
    os.environ["TRITON_INTERPRET"] = "1"


def randn(shape, seed, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV, generator=gen(seed)) * scale).to(dtype)


def random_selection(L: int, seed: int) -> torch.Tensor:
    """[1, g, L, K] int32: own block + K-1 distinct random earlier blocks per (query, group)."""
    return random_block_selection(L, seed, HKV, B, K, DEV)


DEFAULT_TUNE = ";".join([
    "",  # the defaults
    "fwd_rows=64",
    "fwd_stages=3",
    "fwd_rows=64,fwd_warps=4",
    "bwd_block_n=64",
    "bwd_rows=32",
    "bwd_rows=128,bwd_block_n=64",
    "dq_partial_lowp=1",
    "bwd_split=1",
    "chunk_queries=2048",
    "chunk_queries=8192",
    "det=0",
    "fwd_impl=q",
    "kl_fused=1",
    "kl_fused=1,kl_bwd_stages=2",
    "kl_fused=1,bwd_rows=32,kl_bwd_stages=2",
])


def tune(L: int, specs: str, reps: int = 5) -> None:
    from msa_megatron.ops import triton_sparse_attn as T

    T.POISON_OUTPUTS = False
    from msa_megatron.ops import triton_index as TI

    q, k, v, do = randn((1, L, HQ, D), 31), randn((1, L, HKV, D), 32), randn((1, L, HKV, D), 33), randn((1, L, HQ, D), 34)
    bidx = random_selection(L, 35)
    flops = 4.0 * HQ * D * float((torch.clamp(torch.arange(L) // B, max=K - 1) * B + torch.arange(L) % B + 1).sum())
    # Indexer KL inputs: "kl_fused=1" configs time the backward with the KL inside; the row
    # after the table times the separate KL kernel on the same selection, for comparison.
    kl_cfg = MSAConfig(block_size=B, topk=K, index_dim=DI, num_index_heads=HKV)
    iq, ik = randn((1, L, HKV, DI), 36), randn((1, L, DI), 37)
    ilse = TI.selected_lse(iq, ik, bidx, kl_cfg)
    fused_kl = T.FusedKL(iq, ik, ilse, kl_cfg.index_softmax_scale)

    def timed(fn) -> float:
        return timed_ms(fn, reps)

    print(f"\n| config (L={L}) | fwd ms | fwd TF/s | bwd ms | bwd TF/s | fwd+bwd ms |\n|---|---|---|---|---|---|")
    for spec in specs.split(";"):
        fields = dict(x.split("=") for x in spec.split(",") if x.strip())
        det = fields.pop("det", "1") != "0"
        try:
            cfg = T.KernelConfig.from_spec(",".join(f"{n}={v}" for n, v in fields.items()), T.KernelConfig.from_env())
            plan_need = T.partial_bytes_per_pos(q, HKV, K, B, fwd=cfg.fwd_impl == "kv", bwd=True, deterministic=det, config=cfg,
                                                dq_partial_dtype=q.dtype if cfg.dq_partial_lowp else torch.float32)
            box = {}

            def fwd():
                plan = T.build_plan(bidx, L, B, plan_need, cfg)
                if cfg.fwd_impl == "q":  # the query-outer baseline: msa_megatron/bench/qouter.py
                    from msa_megatron.bench.qouter import qouter_attention_fwd

                    box["out"], box["lse"] = qouter_attention_fwd(q, k, v, bidx, B, config=cfg)
                else:
                    box["out"], box["lse"] = T.sparse_attention_fwd(q, k, v, bidx, B, config=cfg, plan=plan)
                box["plan"] = plan

            def bwd():
                T.sparse_attention_bwd(do, q, k, v, box["out"], box["lse"], bidx, B, deterministic=det, config=cfg,
                                       plan=box["plan"], kl=fused_kl if cfg.kl_fused else None)

            tf = timed(fwd)
            tb = timed(bwd)
            print(f"| {spec or 'default'}{'' if det else ' (atomic dQ)'} | {tf:.2f} | {flops / tf / 1e9:.0f} | {tb:.2f} | "
                  f"{2.5 * flops / tb / 1e9:.0f} | {tf + tb:.2f} |", flush=True)
        except Exception as exc:  # one bad config must not stop the sweep
            print(f"| {spec} | ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | |", flush=True)
        torch.cuda.empty_cache()
    try:
        _, main_lse = T.sparse_attention_fwd(q, k, v, bidx, B)
        tk = timed(lambda: TI.sparse_kl_backward(q, k, iq, ik, bidx, main_lse, ilse, kl_cfg, return_stats=True))
        print(f"\nseparate KL kernel (sparse_kl_backward, return_stats=True): {tk:.2f} ms -- compare "
              "default bwd + this with the kl_fused=1 rows' bwd", flush=True)
    except Exception as exc:
        print(f"separate KL kernel: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)


def aot_report(arch: int = 90) -> int:
    """Compile the kernels for sm_<arch> without a device (ptxas only); exit 1 on a compile error."""

    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from msa_megatron.bench.aot import compile_report

    from msa_megatron.bench import qouter as QO
    from msa_megatron.ops import triton_sparse_attn as T

    cfg = T.KernelConfig.from_env()
    div16 = {"D", "G", "sq", "sk", "hq", "cq", "t0"}  # what the JIT's value specialisation sees at this layout
    F, I = "*fp32", "*i32"
    GP = 16
    bnq = T._block_n(B, cfg.q_block_n)
    kernels = []
    for dt, d in ((torch.bfloat16, 128), (torch.float32, 128), (torch.bfloat16, 256)):
        P = "*bf16" if dt == torch.bfloat16 else "*fp32"
        DP = d
        prec = "ieee" if dt == torch.float32 else None
        common = dict(KSEL=K, BLOCK=B, GP=GP, DP=DP, DOT_PREC=prec, UPCAST=False)
        qpf, bnf = T.kv_tiles("fwd", dt, d, GP, B, cfg)
        qpb, bnb = T.kv_tiles("bwd", dt, d, GP, B, cfg)
        tag = f"{str(dt)[6:]} d={d}"
        io = dict(Q=P, K=P, V=P, DO=P)
        kernels.append((f"fwd_kv {tag} rows={qpf * GP} bn={bnf}", T._fwd_kv_kernel, dict(io, OPART=P, LPART=F, qk_scale="fp32"),
                        dict(common, NSUB=B // bnf, BN=bnf, QP=qpf), cfg.fwd_warps, cfg.fwd_stages))
        bwd_types = dict(io, LSE=F, DELTA=F, DQ=F, DKACC=F, DVACC=F, DKPART=F, DVPART=F, sm_scale="fp32", qk_scale="fp32",
                         IQ=P, IK=P, ILSE=F, DIQ=F, DIK=F, KLPART=F, iscale="fp32", kl_coef="fp32")
        no_kl = dict(KL=False, KLJ=1, DI=16, DIP=16)
        for part in ((1, 2) if cfg.bwd_split else (0,)):
            for atomic in ((False, True) if (dt, d) == (torch.bfloat16, 128) else (False,)):
                kernels.append((f"bwd_kv {tag} rows={qpb * GP} bn={bnb} part={part} atomic={int(atomic)}", T._bwd_kv_kernel,
                                bwd_types, dict(common, NSUB=B // bnb, BN=bnb, QP=qpb, DQ_ATOMIC=atomic, PART=part, **no_kl),
                                cfg.bwd_warps, cfg.bwd_stages))
        if dt == torch.bfloat16:  # the fused indexer KL (kernel_config kl_fused=1), in PART 0 or 1
            qpk, bnk = T.kv_tiles("bwd", dt, d, GP, B, cfg, kl_di=DI)
            kl_c = dict(KL=True, KLJ=T._kl_group(qpk), DI=DI, DIP=DI)
            for part in ((1,) if cfg.bwd_split else (0,)):
                for st in sorted({cfg.kl_bwd_stages, 2} if d == 128 else {cfg.kl_bwd_stages}):
                    kernels.append((f"bwd_kv+KL {tag} rows={qpk * GP} bn={bnk} part={part}", T._bwd_kv_kernel, bwd_types,
                                    dict(common, NSUB=B // bnk, BN=bnk, QP=qpk, DQ_ATOMIC=False, PART=part, **kl_c),
                                    cfg.bwd_warps, st))
        if (dt, d) != (torch.bfloat16, 128):
            continue
        kernels += [
            ("fwd_combine", T._fwd_combine_kernel, dict(OPART=P, LPART=F, OUT=P, LSE=F),
             dict(KSEL=K, NSUB=B // bnf, GP=GP, TQ=T._combine_tq(GP, DP), DP=DP), 8, 2),
            ("fwd_q", QO._fwd_q_kernel, dict(io, OUT=P, LSE=F, qk_scale="fp32"),
             dict(KSEL=K, NSUB=B // bnq, BLOCK=B, BN=bnq, RP=GP, DP=DP, DOT_PREC=None, UPCAST=False), cfg.q_warps, cfg.q_stages),
            ("delta", T._delta_kernel, dict(OUT=P, DO=P, DELTA=F), dict(HP=HQ, TD=max(1, 8192 // (HQ * DP)), DP=DP), 4, 2),
            ("bwd_reduce", T._bwd_reduce_kernel, dict(DKPART=F, DVPART=F, DKACC=F, DVACC=F),
             dict(BLOCK=B, BN=min(32, B), DP=DP), 8, 2),
            ("dq_combine", T._dq_combine_kernel, dict(DQPART=F, DQ=P),
             dict(KSEL=K, NSUB=B // bnb, GP=GP, TQ=T._combine_tq(GP, DP), DP=DP), 8, 2),
        ]
    # packed documents (docs/packed.md): the plain variants compile with HAS_DOC=False (must
    # match the numbers before the switch existed); the HAS_DOC=True variants of the bf16 d=128
    # kernels are listed after them as "+doc"
    plain = [(n, fn, t, dict(c, HAS_DOC=False) if "HAS_DOC" in fn.arg_names else c, nw, ns)
             for n, fn, t, c, nw, ns in kernels]
    docs = [(n + " +doc", fn, t, dict(c, HAS_DOC=True), nw, ns) for n, fn, t, c, nw, ns in kernels
            if "HAS_DOC" in fn.arg_names and ("bfloat16 d=128" in n or n == "fwd_q") and "atomic=1" not in n]
    kernels = plain + docs
    print(f"AOT compile for sm_{arch}a, triton {triton.__version__}, config {cfg}")
    bad = 0
    for name, fn, types, consts, nw, ns in kernels:
        bad += not compile_report(name, fn, dict(types, DS="*i64"), consts, nw, ns, arch=arch, ptr_default=I,
                                  div16=div16, width=44)
    return 1 if bad else 0


def run_tests(lengths: str, slice_rows: int, cpu: bool, index_backend: str) -> int:
    env = dict(os.environ, MSA_GPU_MAIN_LENGTHS=lengths, MSA_GPU_SLICE=str(slice_rows), MSA_INDEX_BACKEND=index_backend)
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/gpu/test_gpu_main.py",
           "-m", "not gpu" if cpu else "gpu"]
    print(" ".join(cmd), f"(lengths {lengths}, slice {slice_rows}, index backend {index_backend})", flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8K and 32K main branch, 8K op")
    p.add_argument("--lengths", default=None, help="main-branch lengths (default 8K,32K,128K; quick 8K,32K)")
    p.add_argument("--slice", type=int, default=256, help="query rows compared with the reference")
    p.add_argument("--index-backend", default="triton", choices=["triton", "reference"])
    p.add_argument("--cpu-smoke", action="store_true", help="the tests' CPU subset under TRITON_INTERPRET=1")
    p.add_argument("--tune", action="store_true", help="time kernel configs instead of checking")
    p.add_argument("--aot", action="store_true", help="compile for sm_90a without a GPU; print regs/spills")
    p.add_argument("--tune-L", type=parse_length, default=parse_length("128K"))
    p.add_argument("--tune-configs", default=DEFAULT_TUNE, help="';'-separated KernelConfig specs")
    args = p.parse_args()
    if args.aot:
        return aot_report()
    if args.cpu_smoke:
        return run_tests("4096", args.slice, cpu=True, index_backend=args.index_backend)
    if not torch.cuda.is_available():
        print("gpu_check_main needs a CUDA device", file=sys.stderr)
        return 2
    if args.tune:
        tune(args.tune_L, args.tune_configs)
        return 0
    lengths = args.lengths or ("8K,32K" if args.quick else "8K,32K,128K")
    return run_tests(lengths, args.slice, cpu=False, index_backend=args.index_backend)


if __name__ == "__main__":
    sys.exit(main())

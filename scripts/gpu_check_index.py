#!/usr/bin/env python
"""GPU check of the Triton index-branch kernels against the fp32 reference.

    python scripts/gpu_check_index.py [--quick] [--lengths 8K,32K,64K,128K] [--rows 256]

Paper layout (64 q / 4 KV heads, d 128, index dim 128, block 128, top-16), bf16 inputs,
batch 1. Per length, the kernels run on the whole sequence and on a subset of query rows
(q_pos = those rows, all keys: the context-parallel path); the reference runs in fp32 on
the subset only (it is slow at 128K). Outputs are poisoned before each launch. Checks:

  sel exact %    rows whose selection equals reference.select bit for bit
  near-tie       rows that differ; they pass only if every swapped block's reference
                 score is within TIE_TOL (relative) of the block it replaced
  sub=full %     subset-run rows equal to the same rows of the full run
  recall k/ref   attention-mass recall (reference.selection_recall) of the kernel's
                 selection over the reference selection's (must be >= 0.999)
  lse err        max |index_lse - reference.selected_index_lse| / max(1, |ref|)
  kl/diq/dik     relative errors of the sparse KL value / d_iq / d_ik vs reference autograd
  H_idx/H_main   relative errors of the entropy statistics (return_stats=True) vs the
                 reference's KLTerms (sparse; "dense H" for the warmup KL)
  dense ...      the same for the warmup (dense-teacher) KL, up to --dense-max-L, plus the
                 flash-attention main LSE vs the reference dense LSE
Exits 1 if any check fails (or raises), 2 without CUDA.

``--aot`` compiles every kernel variant for sm_90a without a GPU (triton's bundled
ptxas) and prints registers / spills; ``--cpu-smoke`` runs this script's logic on CPU
under the interpreter with a tiny layout. ``--time-kl 128K`` skips the checks and times the
sparse KL backward with and without ``return_stats`` (the entropy statistics' cost), and the
dense one at ``--dense-max-L``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TIE_TOL = 2e-3  # relative block-score gap counted as a near-tie (bf16 products, fp32 sums)
LSE_TOL = 1e-4
KL_TOL = 1e-3
ENT_TOL = 1e-4  # same bf16-valued inputs on both sides, fp32 arithmetic: summation order only
GRAD_TOL = 3e-2  # dS is rounded to bf16 before the gradient dots
RECALL_MIN = 0.999


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


PAPER = dict(hq=64, g=4, d=128, di=128, B=128, K=16)
TINY = dict(hq=4, g=2, d=16, di=16, B=16, K=4)  # --cpu-smoke: interpreter, exercises this script only


def check_length(L: int, n_rows: int, dense_max_L: int, seed: int, dev: str = "cuda", layout=PAPER) -> dict:
    from msa_megatron import reference as R
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI

    TI.POISON_OUTPUTS = True
    b = 1
    hq, g, d, di, B, K = (layout[x] for x in ("hq", "g", "d", "di", "B", "K"))
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, num_index_heads=g)
    gen = torch.Generator(device=dev).manual_seed(seed + L)
    bf = torch.bfloat16
    iq = torch.randn(b, L, g, di, device=dev, generator=gen).to(bf)
    ik = torch.randn(b, L, di, device=dev, generator=gen).to(bf)
    q = torch.randn(b, L, hq, d, device=dev, generator=gen).to(bf)
    k = torch.randn(b, L, g, d, device=dev, generator=gen).to(bf)
    v = torch.randn(b, L, g, d, device=dev, generator=gen).to(bf)
    res = dict(L=L, ok=True, fails=[])

    def need(cond: bool, what: str) -> None:
        if not cond:
            res["ok"] = False
            res["fails"].append(what)

    # Rows: first, last, a few in the first blocks, the rest random.
    extra = torch.randperm(L, device=dev, generator=gen)[: max(0, n_rows - 6)]
    rows = torch.unique(torch.cat([torch.tensor([0, 1, B - 1, B, L // 2, L - 1], device=dev), extra]))
    rows = rows[torch.randperm(rows.numel(), device=dev, generator=gen)]  # unsorted positions are allowed
    sq = rows.numel()

    sel_full, lse_full = TI.index_select(iq, ik, cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    need(bool(torch.isfinite(lse_full).all()), "full-run index_lse has NaN/inf")
    need(bool(((sel_full >= -1) & (sel_full < math.ceil(L / B))).all()), "full-run selection out of range (unwritten?)")

    iq_s, q_s = iq[:, rows], q[:, rows]
    sel, lse, plan = TI.index_select(iq_s, ik, cfg, q_pos=rows, return_plan=True)
    res["sub=full %"] = 100.0 * (sel == sel_full[:, :, rows]).all(-1).float().mean().item()

    iq32, ik32 = iq_s.float(), ik.float()
    ref = R.select(iq32, ik32, cfg, rows)
    same = (sel == ref).all(-1)
    res["sel exact %"] = 100.0 * same.float().mean().item()
    res["near-tie"] = int((~same).sum())
    max_gap = 0.0
    if res["near-tie"]:
        nb = math.ceil(L / B)
        scores = R.index_block_scores(iq32, ik32, B, rows)
        def hot(s):
            h = torch.zeros(*s.shape[:-1], nb + 1, dtype=torch.bool, device=dev)
            return h.scatter_(-1, torch.where(s >= 0, s, nb).long(), True)[..., :nb]
        kh, rh = hot(sel), hot(ref)
        hi = scores.masked_fill(~(rh & ~kh), float("-inf")).amax(-1)
        lo = scores.masked_fill(~(kh & ~rh), float("inf")).amin(-1)
        gap = ((hi - lo) / scores.abs().amax(-1).clamp_min(1.0))[~same]
        max_gap = gap.max().item()
    res["max gap"] = max_gap
    need(max_gap <= TIE_TOL, f"selection differs beyond near-ties (rel gap {max_gap:.2e})")

    rec_k = R.selection_recall(q_s, k, sel, B, rows).item()
    rec_r = R.selection_recall(q_s, k, ref, B, rows).item()
    res["recall k/ref"] = rec_k / max(rec_r, 1e-30)
    need(res["recall k/ref"] >= RECALL_MIN, f"recall ratio {res['recall k/ref']:.4f} < {RECALL_MIN}")

    ref_lse = R.selected_index_lse(iq32, ik32, sel, cfg, rows)
    res["lse err"] = ((lse - ref_lse).abs().max() / ref_lse.abs().max().clamp_min(1.0)).item()
    need(bool(torch.isfinite(lse).all()) and res["lse err"] <= LSE_TOL, f"index LSE error {res['lse err']:.2e}")

    _, main_lse = R.sparse_attention(q_s.float(), k.float(), v.float(), sel, B, rows)
    kl, d_iq, d_ik, stats = TI.sparse_kl_backward(q_s, k, iq_s, ik, sel, main_lse, lse, cfg, rows, plan=plan,
                                                  return_stats=True)
    iq_r, ik_r = iq32.clone().requires_grad_(), ik32.clone().requires_grad_()
    terms = R.sparse_kl_terms(q_s.float(), k.float(), iq_r, ik_r, sel, cfg, rows)
    ref_kl = terms.kl / terms.rows
    ref_kl.backward()
    check_stats(stats, terms, hq // g, res, need, "")
    res["kl err"] = abs(kl.item() - ref_kl.item()) / max(abs(ref_kl.item()), 1e-6)
    res["diq err"], res["dik err"] = rel(d_iq, iq_r.grad), rel(d_ik, ik_r.grad)
    need(all(torch.isfinite(x).all() for x in (kl, d_iq, d_ik)), "sparse KL outputs have NaN/inf")
    need(res["kl err"] <= KL_TOL, f"sparse KL value error {res['kl err']:.2e}")
    need(res["diq err"] <= GRAD_TOL and res["dik err"] <= GRAD_TOL,
         f"sparse KL grad errors d_iq {res['diq err']:.2e} d_ik {res['dik err']:.2e}")

    if L <= dense_max_L:
        flash_lse = TI.dense_main_lse(q, k)  # full sequence, flash op
        _, dlse = R.dense_attention(q_s.float(), k.float(), v.float(), rows)
        res["flash lse err"] = ((flash_lse[:, :, rows] - dlse).abs().max() / dlse.abs().max().clamp_min(1.0)).item()
        need(res["flash lse err"] <= 1e-2, f"flash-attention LSE vs reference {res['flash lse err']:.2e}")
        dkl, dd_iq, dd_ik, dstats = TI.dense_kl_backward(q_s, k, iq_s, ik, dlse, cfg, rows, return_stats=True)
        iq_r, ik_r = iq32.clone().requires_grad_(), ik32.clone().requires_grad_()
        dterms = R.dense_kl_terms(q_s.float(), k.float(), iq_r, ik_r, cfg, rows)
        rdkl = dterms.kl / dterms.rows
        rdkl.backward()
        check_stats(dstats, dterms, hq // g, res, need, "dense ")
        res["dense kl err"] = abs(dkl.item() - rdkl.item()) / max(abs(rdkl.item()), 1e-6)
        res["dense diq"], res["dense dik"] = rel(dd_iq, iq_r.grad), rel(dd_ik, ik_r.grad)
        need(all(torch.isfinite(x).all() for x in (dkl, dd_iq, dd_ik)), "dense KL outputs have NaN/inf")
        need(res["dense kl err"] <= KL_TOL, f"dense KL value error {res['dense kl err']:.2e}")
        need(res["dense diq"] <= GRAD_TOL and res["dense dik"] <= GRAD_TOL,
             f"dense KL grad errors d_iq {res['dense diq']:.2e} d_ik {res['dense dik']:.2e}")
    res["rows"] = sq
    return res


def check_stats(stats: dict, terms, G: int, res: dict, need, prefix: str) -> None:
    """Kernel entropy means vs the reference's KLTerms (index: / rows, main: / rows * G)."""
    ref = {"H_idx": terms.index_entropy.item() / terms.rows, "H_main": terms.main_entropy.item() / (terms.rows * G)}
    for col, key in (("H_idx", "index_entropy"), ("H_main", "main_entropy")):
        err = abs(stats[key].item() - ref[col]) / max(abs(ref[col]), 1e-6)
        res[prefix + col] = err
        need(err <= ENT_TOL, f"{prefix}{key} error {err:.2e}")


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

    ptr_types = {"qpos_ptr": "*i64", "out_ptr": "*i32", "order_ptr": "*i64", "ikey_ptr": "*i64",
                 "istart_ptr": "*i64", "iend_ptr": "*i64"}
    floats = {"iscale_log2", "scale_log2", "iscale", "coef"}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    base = dict(DI=128, DIP=128, BLOCK=128, BLOCK_N=128, NSUB=1, DOT_PREC="tf32", UPCAST=False)
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


COLS = ["L", "rows", "sel exact %", "near-tie", "max gap", "sub=full %", "recall k/ref", "lse err", "kl err",
        "diq err", "dik err", "H_idx", "H_main", "flash lse err", "dense kl err", "dense diq", "dense dik",
        "dense H_idx", "dense H_main", "time s", "result"]


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
    return str(v)


def time_kl(L: int, dense_L: int, seed: int, reps: int = 5, dev: str = "cuda", layout=PAPER) -> None:
    """Median CUDA-event times of the KL backward kernels without / with return_stats
    (``dev='cpu'``: wall-clock under the interpreter, only to test this function)."""
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI

    TI.POISON_OUTPUTS = False
    hq, g, d, di, B, K = (layout[x] for x in ("hq", "g", "d", "di", "B", "K"))
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, num_index_heads=g)

    def timed(fn) -> float:
        if dev != "cuda":
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

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
                   help="check the dense-teacher KL up to this length (default 32K)")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "little"))
    p.add_argument("--aot", action="store_true",
                   help="only compile every kernel for sm_90a ahead of time (no GPU needed) and print regs / spills")
    p.add_argument("--time-kl", type=parse_length, default=None,
                   help="only time the KL backward kernels with / without return_stats at this length (GPU)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run this script's logic on CPU under TRITON_INTERPRET=1 with a tiny layout (no GPU check)")
    args = p.parse_args()
    dev, layout = "cuda", PAPER
    if args.aot:
        return aot_compile()
    if args.time_kl:
        if not torch.cuda.is_available():
            print("--time-kl needs a CUDA device", file=sys.stderr)
            return 2
        time_kl(args.time_kl, args.dense_max_L, args.seed)
        return 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        dev, layout = "cpu", TINY
        lengths = [parse_length(x) for x in (args.lengths or "200").split(",")]
        n_rows = args.rows or 24
    elif not torch.cuda.is_available():
        print("gpu_check_index.py needs a CUDA device", file=sys.stderr)
        return 2
    else:
        lengths = [parse_length(x) for x in (args.lengths or ("8K,32K" if args.quick else "8K,32K,64K,128K")).split(",")]
        n_rows = args.rows or (128 if args.quick else 256)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter smoke run)"
    print(f"device {name} | torch {torch.__version__} | seed {args.seed} | rows {n_rows}",
          flush=True)
    results, failed = [], False
    t_all = time.time()
    for L in lengths:
        t0 = time.time()
        try:
            r = check_length(L, n_rows, args.dense_max_L, args.seed, dev, layout)
        except Exception as exc:  # one length's crash must not hide the others
            traceback.print_exc(limit=6)
            r = dict(L=L, ok=False, fails=[f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"])
        r["time s"] = time.time() - t0
        r["result"] = "PASS" if r["ok"] else "FAIL"
        failed |= not r["ok"]
        results.append(r)
        print(f"L={L}: {r['result']} in {r['time s']:.1f} s" + ("" if r["ok"] else f" -- {'; '.join(r['fails'])}"),
              flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    print()
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in results:
        print("| " + " | ".join(fmt(r.get(c)) for c in COLS) + " |")
    print(f"\ntotal {time.time() - t_all:.1f} s; tolerances: near-tie gap {TIE_TOL}, lse {LSE_TOL}, kl {KL_TOL}, "
          f"grads {GRAD_TOL}, entropies {ENT_TOL}, recall ratio >= {RECALL_MIN}")
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Context parallelism of the MSA op on one GPU, Triton path, against CP=1.

CP is simulated: the sequence is cut into Megatron's load-balanced pieces (rank r holds
chunks r and 2cp-1-r), the full K/V/ik are reassembled from the pieces with the same
reordering the all-gather uses (``merge_from_cp``), and each rank's queries run one after the
other through ``msa_megatron.ops.msa_attention`` (msa.backend=triton) at their global
positions (``q_pos``). Every rank back-propagates ``sum(out_r * w_r) + kl_r / cp``; gradients
of the shared K/V/ik sum over ranks exactly as the reduce-scatter does. Compared with one
CP=1 call on the whole sequence: outputs, LSE, selection, gradients of q, k, v, iq, ik, the
KL (mean over ranks) and the statistics, within bf16 tolerances.

    python scripts/gpu_check_cp.py            # 5 cases, S=8192, paper head layout (< 1 min on H100)
    python scripts/gpu_check_cp.py --quick    # 2 cases, S=4096
    python scripts/gpu_check_cp.py --cpu-smoke  # the script's own logic on CPU (reference op, tiny sizes)

Exit status 1 if any check fails (the table marks it), 2 if the Triton path cannot run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from msa_megatron.config import MSAConfig
from msa_megatron.megatron.context_parallel import merge_from_cp, split_for_cp, zigzag_positions
from msa_megatron.ops import msa_attention, triton_kernels_available

# max |cp - cp1| / max(1e-6, max |cp1|) per tensor (bf16 inputs, fp32 LSE / KL / stats)
TOL = {"out": 2e-2, "lse": 1e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2, "diq": 3e-2, "dik": 3e-2,
       "kl": 2e-3, "index_entropy": 2e-3, "main_entropy": 2e-3}


@dataclass(frozen=True)
class Case:
    seq: int
    cp: int
    mode: str = "msa"
    note: str = ""


FULL = [Case(8192, 2), Case(8192, 4), Case(8192, 8), Case(8000, 2, note="chunks of 2000: blocks straddle"),
        Case(8192, 4, "msa_warmup")]
QUICK = [Case(4096, 2), Case(4096, 4, note="")]


SMOKE = [Case(256, 2), Case(256, 4), Case(200, 2, note="chunks of 50: blocks straddle"), Case(256, 2, "msa_warmup")]


def inputs(seq: int, args, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device=args.device).manual_seed(seed)
    b, hq, g, d, di = args.batch, args.heads, args.kv_heads, args.head_dim, args.index_dim
    mk = lambda *shape: torch.randn(*shape, generator=gen, device=args.device).to(torch.bfloat16)
    return {"q": mk(b, seq, hq, d), "k": mk(b, seq, g, d), "v": mk(b, seq, g, d),
            "iq": mk(b, seq, g, di), "ik": mk(b, seq, di), "w": mk(b, seq, hq, d)}


def leaves(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_(k != "w") for k, v in t.items()}


def run_cp1(t, cfg, mode):
    x = leaves(t)
    out, aux = msa_attention(x["q"], x["k"], x["v"], x["iq"], x["ik"], cfg, mode=mode)
    ((out.float() * x["w"].float()).sum() + aux.kl).backward()
    return out.detach(), aux, {k: x[k].grad for k in ("q", "k", "v", "iq", "ik")}


def run_cp_simulated(t, cfg, mode, cp, device):
    """Every rank's piece in turn: local q/iq at global positions vs the reassembled K/V/ik."""
    x = leaves(t)
    piece = {k: [split_for_cp(x[k], cp, r) for r in range(cp)] for k in x}
    k_full, v_full, ik_full = (merge_from_cp(piece[n]) for n in ("k", "v", "ik"))
    outs, lses, blks, kls, stats, total = [], [], [], [], [], 0.0
    for r in range(cp):
        q_pos = zigzag_positions(piece["q"][r].shape[1], cp, r, device=device)
        out, aux = msa_attention(piece["q"][r], k_full, v_full, piece["iq"][r], ik_full, cfg, q_pos=q_pos, mode=mode)
        total = total + (out.float() * piece["w"][r].float()).sum() + aux.kl / cp
        outs.append(out.detach())
        lses.append(aux.lse)
        blks.append(aux.block_idx)
        kls.append(aux.kl.detach())
        stats.append(aux.stats)
    total.backward()
    out = merge_from_cp(outs)
    lse = merge_from_cp([l.transpose(1, 2) for l in lses]).transpose(1, 2)
    blk = merge_from_cp([bi.transpose(1, 2) for bi in blks]).transpose(1, 2)
    kl = torch.stack(kls).mean()
    stat = {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}
    return out, lse, blk, kl, stat, {k: x[k].grad for k in ("q", "k", "v", "iq", "ik")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1e-6, float(b.abs().max())))


def check(case: Case, args, cache) -> Dict[str, object]:
    cfg = MSAConfig(block_size=args.block_size, topk=args.topk, index_dim=args.index_dim,
                    num_index_heads=args.kv_heads, backend=args.backend)
    t = inputs(case.seq, args, seed=case.seq)
    key = (case.seq, case.mode)
    if key not in cache:
        cache[key] = run_cp1(t, cfg, case.mode)
    out1, aux1, g1 = cache[key]
    out, lse, blk, kl, stat, g = run_cp_simulated(t, cfg, case.mode, case.cp, args.device)
    errs = {"out": rel(out, out1), "lse": rel(lse, aux1.lse), "kl": rel(kl, aux1.kl)}
    for n in ("q", "k", "v", "iq", "ik"):
        errs["d" + n] = rel(g[n], g1[n])
    for n, v in aux1.stats.items():
        errs[n] = rel(stat[n], v)
    sel_diff = int((blk != aux1.block_idx).any(-1).sum())
    fails = [n for n, e in errs.items() if not e <= TOL[n]] + (["block_idx"] if sel_diff else [])
    return {"errs": errs, "sel_diff": sel_diff, "fails": fails}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 small cases")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script's logic on CPU: reference op, tiny sizes (not a kernel check)")
    a = p.parse_args()
    if a.cpu_smoke:
        a.device, a.backend, cases = "cpu", "reference", SMOKE
        a.heads, a.kv_heads, a.head_dim, a.index_dim, a.block_size, a.topk, a.batch = 4, 2, 16, 16, 16, 4, 2
        where = "CPU (smoke: reference op)"
    else:
        ok, reason = triton_kernels_available()
        if not ok:
            print(f"gpu_check_cp: the Triton MSA path cannot run here ({reason})", file=sys.stderr)
            return 2
        a.device, a.backend, cases = "cuda", "triton", (QUICK if a.quick else FULL)
        where = torch.cuda.get_device_name()
    print(f"MSA context parallelism, simulated on {where}: hq={a.heads} g={a.kv_heads} "
          f"d={a.head_dim} di={a.index_dim} B={a.block_size} k={a.topk} b={a.batch} bf16, msa.backend={a.backend}")
    cols = ["out", "lse", "dq", "dk", "dv", "diq", "dik", "kl", "index_entropy", "main_entropy"]
    short = {"index_entropy": "H_idx", "main_entropy": "H_main"}
    print(f"{'S':>6} {'cp':>3} {'mode':<10} " + " ".join(f"{short.get(c, c):>8}" for c in cols) +
          f" {'sel!=':>5} {'time':>6}  result")
    cache: Dict = {}
    failed = 0
    t_all = time.time()
    for case in cases:
        t0 = time.time()
        try:
            r = check(case, a, cache)
            if a.device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # report and go on: one broken case must not hide the others
            failed += 1
            print(f"{case.seq:>6} {case.cp:>3} {case.mode:<10} ERROR {type(exc).__name__}: {str(exc)[:200]}")
            continue
        dt = time.time() - t0
        status = "ok" if not r["fails"] else "FAIL " + ",".join(r["fails"])
        failed += bool(r["fails"])
        print(f"{case.seq:>6} {case.cp:>3} {case.mode:<10} " +
              " ".join(f"{r['errs'].get(c, float('nan')):>8.1e}" for c in cols) +
              f" {r['sel_diff']:>5} {dt:>5.1f}s  {status}" + (f"  ({case.note})" if case.note else ""))
    print(f"errors: max|cp - cp1| / max|cp1| per tensor; tolerances {TOL}; sel!= rows whose selection differs")
    print(f"{len(cases) - failed}/{len(cases)} cases passed in {time.time() - t_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``msa-bench``: time the registered MSA impls over sequence lengths on one GPU.

    python -m msa_megatron.bench.harness --out OUT_DIR [--impls a,b] [--lengths 8K,128K]
                                         [--selections random,trained,flex] [--quick]
                                         [--bwd-max-L 128K] [--time-budget-s 540]

Per (impl, L): fwd and fwd+bwd medians (``triton.testing.do_bench``, which flushes the L2
cache between reps; calls over 100 ms are timed as the median of 3 single runs after a
warm-up call), TF/s from the impl's FLOP count, the fraction of the bf16 tensor-core peak
measured in the same run (a large bf16 matmul), and peak allocated memory. Prints a
markdown table headed by device, date and git commit, and writes ``bench.md`` and
``bench.json`` (a list of records {impl, L, selection, U8, fwd_ms, fwdbwd_ms, tflops,
peak_mem_gb, device, date, commit, ...}) to ``--out``, rewritten after every record so partial runs
keep their results. Impls register in :mod:`msa_megatron.bench.registry`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import registry
from .registry import Case, Skip

IMPL_MODULES = ("msa_megatron.bench.impls_index", "msa_megatron.bench.impls_main", "msa_megatron.bench.impls_peers")
DEFAULT_LENGTHS = "8K,32K,64K,128K,256K,1M"
QUICK_LENGTHS = "8K,32K"


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def fmt_length(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def git_commit() -> str:
    if os.environ.get("MSA_COMMIT"):
        return os.environ["MSA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def load_impl_modules() -> List[str]:
    notes = []
    for mod in IMPL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                notes.append(f"{mod}: not present in this checkout")
            else:
                notes.append(f"{mod}: import failed ({exc})")
        except Exception as exc:  # an impl module's bug must not hide the others
            notes.append(f"{mod}: import failed ({type(exc).__name__}: {exc})")
    for n in notes:
        print(f"note: {n}", flush=True)
    return notes


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_once(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(fn, grad_to_none, warmup_ms: int, rep_ms: int) -> float:
    """Median milliseconds of ``fn``. The first call warms up (compilation, autotuning).
    Gradients of ``grad_to_none`` are dropped before every call of a long one, so its peak
    memory is that of one fwd+bwd (not one plus the previous call's gradients: +18 GiB at 1M)."""
    import triton.testing

    def clear():
        for t in grad_to_none:
            t.grad = None

    fn()
    _sync()
    clear()
    first = _timed_once(fn)
    if first > 100.0:  # long calls: do_bench's calibration would take minutes
        times = [first]
        for _ in range(2):
            clear()
            times.append(_timed_once(fn))
        return statistics.median(times)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none or None,
                                         return_mode="median"))


def measure_bf16_peak(n: int = 8192) -> float:
    """TF/s of an n x n x n bf16 matmul: the reference for the fraction-of-peak column."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    del a, b
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {msg[:300]}"


def empty_record(name: str, case: Case, meta: Dict, **changes) -> Dict:
    rec = dict(impl=name, L=case.L, selection=case.selection if registry.uses_selection(name) else "-", U8=None,
               fwd_ms=None, fwdbwd_ms=None, tflops=None, fwdbwd_tflops=None, frac_peak_fwd=None,
               frac_peak_fwdbwd=None, peak_mem_gb=None, status="ok", reason="", note="", **meta)
    rec.update(changes)
    return rec


def run_one(name: str, case: Case, args, peak_tflops: float, meta: Dict) -> Dict:
    rec = empty_record(name, case, meta)
    bench = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        bench = registry.get(name)(case)
        rec["note"] = bench.note
        rec["selection"] = bench.selection or "-"
        rec["U8"] = bench.u8
        if bench.fwd is not None:
            rec["fwd_ms"] = time_ms(bench.fwd, bench.grad_to_none, args.warmup, args.rep)
            if bench.fwd_flops:
                rec["tflops"] = bench.fwd_flops / (rec["fwd_ms"] * 1e-3) / 1e12
        if case.fwd_only:
            rec["reason"] = f"fwd only above L={fmt_length(args.bwd_max_L)}"
        elif bench.fwdbwd is not None:
            rec["fwdbwd_ms"] = time_ms(bench.fwdbwd, bench.grad_to_none, args.warmup, args.rep)
            if bench.fwdbwd_flops:
                rec["fwdbwd_tflops"] = bench.fwdbwd_flops / (rec["fwdbwd_ms"] * 1e-3) / 1e12
    except Skip as exc:
        rec.update(status="skipped", reason=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        rec.update(status="skipped", reason=f"out of memory ({str(exc).splitlines()[0][:120]})")
    except Exception as exc:  # recorded, printed; the next impl still runs
        rec.update(status="error", reason=_short(exc))
        traceback.print_exc(limit=4)
    finally:
        _sync()
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        del bench
        gc.collect()
        torch.cuda.empty_cache()
    if peak_tflops:
        if rec["tflops"] is not None:
            rec["frac_peak_fwd"] = rec["tflops"] / peak_tflops
        if rec["fwdbwd_tflops"] is not None:
            rec["frac_peak_fwdbwd"] = rec["fwdbwd_tflops"] / peak_tflops
    return rec


def print_record(rec: Dict) -> None:
    print(f"{rec['impl']:24s} L={fmt_length(rec['L']):>5s} {str(rec.get('selection', '-'))[:24]:24s} "
          f"U8 {_f(rec.get('U8'), '6.1f')}  fwd {_f(rec['fwd_ms'], '9.3f')} ms "
          f"({_f(rec['tflops'], '6.1f')} TF/s)  fwd+bwd {_f(rec['fwdbwd_ms'], '9.3f')} ms "
          f"({_f(rec['fwdbwd_tflops'], '6.1f')} TF/s)  mem {_f(rec['peak_mem_gb'], '6.2f')} GB  "
          f"{rec['status']} {rec['reason']}", flush=True)


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(records: List[Dict], header: Dict) -> str:
    lines = [
        f"# msa-bench: {header['device']}",
        "",
        f"- date: {header['date']}",
        f"- commit: {header['commit']}",
        f"- measured bf16 matmul peak: {header['peak_tflops']:.1f} TF/s",
        f"- layout: {header['layout']}",
        "",
        "| impl | L | selection | U8 | fwd ms | fwd TF/s | fwd % peak | fwd+bwd ms | fwd+bwd TF/s | fwd+bwd % peak | "
        "peak mem GB | status / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        status = r["status"] if r["status"] != "ok" else ""
        note = "; ".join(x for x in (status, r["reason"], r["note"]) if x)
        lines.append(
            f"| {r['impl']} | {fmt_length(r['L'])} | {r.get('selection', '-')} | {_f(r.get('U8'), '.1f')} | "
            f"{_f(r['fwd_ms'], '.3f')} | {_f(r['tflops'], '.1f')} | "
            f"{_f(None if r['frac_peak_fwd'] is None else 100 * r['frac_peak_fwd'], '.1f')} | "
            f"{_f(r['fwdbwd_ms'], '.3f')} | {_f(r['fwdbwd_tflops'], '.1f')} | "
            f"{_f(None if r['frac_peak_fwdbwd'] is None else 100 * r['frac_peak_fwdbwd'], '.1f')} | "
            f"{_f(r['peak_mem_gb'], '.2f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="", help="comma-separated impl names (default: all registered)")
    p.add_argument("--lengths", default=None, help=f"comma-separated lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: lengths {QUICK_LENGTHS}, short reps")
    p.add_argument("--out", default=None, help="directory for bench.md / bench.json")
    p.add_argument("--bwd-max-L", type=parse_length, default=parse_length("128K"),
                   help="time fwd+bwd up to this length, fwd only beyond (default 128K)")
    p.add_argument("--selections", default="random",
                   help="comma-separated selection kinds for the sparse impls: random, flex, trained, pool:C, churn:R,C "
                        "(bench/selections.py; default random)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=50, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting new measurements after this many seconds (0 = no limit); the rest is "
                        "recorded as skipped")
    p.add_argument("--no-peak", action="store_true", help="skip the bf16 peak measurement")
    p.add_argument("--list", action="store_true", help="list registered impls and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    notes = load_impl_modules()
    if args.list:
        for name, desc in registry.describe().items():
            print(f"{name:24s} {desc}")
        return 0
    if not torch.cuda.is_available():
        print("msa-bench needs a CUDA device (none found)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.impls.split(",") if n.strip()] or registry.names()
    unknown = [n for n in names if n not in registry.names()]
    if unknown:
        print(f"unknown impls: {', '.join(unknown)}; registered: {', '.join(registry.names())}", file=sys.stderr)
        return 2
    from .selections import parse_kind

    kinds = [x.strip() for x in args.selections.split(",") if x.strip()] or ["random"]
    try:
        for kind in kinds:
            parse_kind(kind)
    except ValueError as exc:
        print(f"--selections: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        args.rep, args.warmup = min(args.rep, 50), min(args.warmup, 20)
    lengths = [parse_length(x) for x in (args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)).split(",")]
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    peak = 0.0 if args.no_peak else measure_bf16_peak(4096 if args.quick else 8192)
    proto = Case(L=1, batch=args.batch)
    header = dict(
        device=torch.cuda.get_device_name(), date=_dt.datetime.now().isoformat(timespec="seconds"),
        commit=git_commit(), peak_tflops=peak,
        layout=(f"batch {proto.batch}, {proto.hq} q / {proto.hkv} KV heads, d {proto.d}, index dim {proto.di}, "
                f"block {proto.block}, top-{proto.topk}, {str(proto.dtype).replace('torch.', '')}, causal"),
    )
    print(f"device {header['device']} | date {header['date']} | commit {header['commit']} | "
          f"bf16 peak {peak:.1f} TF/s | impls {', '.join(names)}", flush=True)
    meta = dict(device=header["device"], date=header["date"], commit=header["commit"], peak_tflops=peak)
    records: List[Dict] = []
    for L in lengths:
        for kind in kinds:
            case = Case(L=L, batch=args.batch, fwd_only=L > args.bwd_max_L, selection=kind)
            for name in names:
                if kind != kinds[0] and not registry.uses_selection(name):
                    continue  # selection-independent impls: once per length
                if args.time_budget_s and time.time() - t0 > args.time_budget_s:
                    rec = empty_record(name, case, meta, status="skipped",
                                       reason=f"time budget of {args.time_budget_s:.0f} s exhausted")
                else:
                    rec = run_one(name, case, args, peak, meta)
                records.append(rec)
                print_record(rec)
                if out_dir:
                    (out_dir / "bench.json").write_text(json.dumps(records, indent=1))
                    (out_dir / "bench.md").write_text(markdown(records, header) + "".join(f"\nnote: {n}" for n in notes))
    print()
    print(markdown(records, header))
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-table run of issue 17's "Done when", in one process on one GPU.

    python -m msa_megatron.bench.done_when --out OUT [--time-budget-s 450] [--selections random,trained,flex]

Rows: cuDNN (dense), FlexAttention (its own per-tile pattern), fla-nsa, the old and the new
main path (``KernelConfig(main_impl='kv' / 'auto')``; before that field exists, the default
``msa-main`` stands for the old path and the new rows say n/a), and the whole op (old / new
path; plus its FP8 prefill), on each selection kind. Columns: U8 and fwd / fwd+bwd ms at
32K and 128K; 1M prefill, 1M fwd+bwd and its peak memory (op rows). Every number comes from
this run (device, date, commit in the header). Order of measurement: 128K, 1M, 32K (or
``--order 128k,32k,1m``), so a time budget cuts the last cells; cut cells say so.

Writes ``done_when.md`` and ``done_when.json`` (header + every raw record) to --out,
rewritten after each measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import harness, registry
from .registry import Case

L32, L128, L1M = 1 << 15, 1 << 17, 1 << 20


def main_impl_available() -> bool:
    from ..ops.triton_sparse_attn import KernelConfig

    return "main_impl" in {f.name for f in fields(KernelConfig)}


ORDERS = ("128k,1m,32k", "128k,32k,1m")
LENGTHS = {"32k": L32, "128k": L128, "1m": L1M}


def keep_lengths(steps: List[Tuple[str, int, str, bool]], lengths: str) -> List[Tuple[str, int, str, bool]]:
    """Only the steps at ``lengths`` (comma list of 32k, 128k, 1m): one length per lending when
    machines are taken back mid-call, each call with its own baselines at that length."""
    names = [x.strip().lower() for x in lengths.split(",") if x.strip()]
    bad = [x for x in names if x not in LENGTHS]
    if bad or not names:
        raise ValueError(f"--lengths: {lengths!r}; allowed: a comma list of {', '.join(LENGTHS)}")
    wanted = {LENGTHS[x] for x in names}
    return [s for s in steps if s[1] in wanted]


def merge_previous(path: str, device: str) -> Tuple[List[Dict], List[str]]:
    """Records of an earlier call's done_when.json (same device name, else refused), minus
    its cut cells (status skipped), which this call may measure; plus a header line naming it."""
    prev = json.loads(Path(path).read_text())
    h = prev["header"]
    if h["device"] != device:
        raise ValueError(f"--previous: {path} was measured on {h['device']!r}, this call runs on {device!r}")
    recs = [r for r in prev["records"] if r["status"] != "skipped"]
    return recs, [f"{len(recs)} records from an earlier call ({h['date']}, commit {h['commit']}, "
                  f"peak {h['peak_tflops']:.0f} TF/s)"]


def plan(kinds: List[str], new_path: bool, flex_union: bool = False,
         order: str = ORDERS[0]) -> List[Tuple[str, int, str, bool]]:
    """(impl, L, selection kind, fwd_only) in measurement order. ``flex_union``: also Flex on
    the non-Flex selections at 128K (per-tile union + token mask; one more Flex compile).
    ``order``: which length comes after 128K (a time budget cuts the last ones): 1M first
    (the default) or 32K first (a short lending that needs the 32K columns most)."""
    if order not in ORDERS:
        raise ValueError(f"--order: {order!r}; allowed: {', '.join(ORDERS)}")
    main_old = "msa-main-kv" if new_path else "msa-main"
    op_old = "msa-op-kv" if new_path else "msa-op"
    sparse = ["fla-nsa", main_old, "msa-main-union", "msa-main-auto", op_old, "msa-op-auto"]
    def at(L: int) -> List[Tuple[str, int, str, bool]]:
        out = [("cudnn-dense", L, "-", False)]
        for kind in kinds:
            if kind == "flex":
                out.append(("flex-blocksparse", L, kind, False))
            out += [(impl, L, kind, False) for impl in sparse]
        return out

    steps = at(L128)
    if flex_union:
        steps += [("flex-union", L128, kind, False) for kind in kinds if kind != "flex"]
    at_1m = []
    for kind in kinds:  # 1M: the op only (prefill = fwd; fwd+bwd with its peak memory)
        at_1m += [(op_old, L1M, kind, False), ("msa-op-auto", L1M, kind, False), ("msa-op-fp8", L1M, kind, True)]
    at_1m += [("index-fused-select", L1M, "-", True), ("index-fused-select-fp8", L1M, "-", True)]
    return steps + (at_1m + at(L32) if order == ORDERS[0] else at(L32) + at_1m)


def _cell(r: Optional[Dict], key: str, spec: str = ".1f") -> str:
    if r is None:
        return ""
    if r.get(key) is not None:
        return format(r[key], spec)
    if r["status"] != "ok" and key in ("fwd_ms", "fwdbwd_ms"):
        reason = r["reason"] or r["status"]
        return "n/a" if reason.startswith("n/a") else r["status"]
    return "-"


def table(records: List[Dict], header: Dict) -> str:
    """Markdown: one row per (impl, selection), the issue's columns."""
    rows: Dict[Tuple[str, str], Dict[int, Dict]] = {}
    for r in records:
        rows.setdefault((r["impl"], r["sel_kind"]), {})[r["L"]] = r
    lines = [f"# Issue 17 benchmark: {header['device']}", "",
             f"- date: {header['date']}", f"- commit: {header['commit']}",
             f"- measured bf16 matmul peak: {header['peak_tflops']:.1f} TF/s", f"- layout: {header['layout']}",
             f"- main_impl available: {header['main_impl_available']}",
             *[f"- merged: {m}" for m in header.get("merged", [])], "",
             "| impl | selection | U8 32K | 32K fwd ms | 32K fwd+bwd ms | U8 128K | 128K fwd ms | 128K fwd+bwd ms | "
             "x cuDNN 128K fwd+bwd | 1M prefill ms | 1M fwd+bwd ms | 1M peak GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = rows.get(("cudnn-dense", "-"), {}).get(L128)
    base = dense.get("fwdbwd_ms") if dense else None
    notes = []
    for (impl, kind), by_l in rows.items():
        a, b, c = by_l.get(L32), by_l.get(L128), by_l.get(L1M)
        sel = next((r.get("selection") for r in (b, a, c) if r and r.get("selection") not in (None, "-")), kind)
        x = f"{base / b['fwdbwd_ms']:.1f}" if base and b and b.get("fwdbwd_ms") else ""
        lines.append(f"| {impl} | {sel} | {_cell(a, 'U8')} | {_cell(a, 'fwd_ms')} | {_cell(a, 'fwdbwd_ms')} | "
                     f"{_cell(b, 'U8')} | {_cell(b, 'fwd_ms')} | {_cell(b, 'fwdbwd_ms')} | {x} | "
                     f"{_cell(c, 'fwd_ms')} | {_cell(c, 'fwdbwd_ms')} | "
                     f"{_cell(c, 'peak_mem_gb', '.2f') if c and c.get('fwdbwd_ms') else ''} |")
        for r in (a, b, c):
            if r and r["status"] != "ok":
                notes.append(f"- {impl} / {kind} / {harness.fmt_length(r['L'])}: {r['status']}: {r['reason']}")
    if notes:
        lines += ["", "Cells not measured:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msa_megatron.bench.done_when", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--selections", default="random,trained,flex")
    p.add_argument("--time-budget-s", type=float, default=450.0)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--flex-union", action="store_true",
                   help="also FlexAttention on the non-Flex selections at 128K (flex-union)")
    p.add_argument("--order", default=ORDERS[0], choices=ORDERS,
                   help="lengths in measurement order (a time budget cuts the last)")
    p.add_argument("--lengths", default="32k,128k,1m",
                   help="measure only these lengths (comma list of 32k, 128k, 1m)")
    p.add_argument("--previous", default=None,
                   help="done_when.json of an earlier call on the same device: its records join this table")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    args.bwd_max_L = L1M
    from .selections import parse_kind

    kinds = [k.strip() for k in args.selections.split(",") if k.strip()]
    for k in kinds:
        parse_kind(k)
    notes = harness.load_impl_modules()
    new_path = main_impl_available()
    steps = keep_lengths(plan(kinds, new_path, args.flex_union, args.order), args.lengths)
    if args.dry_run:
        for s in steps:
            print(s)
        return 0
    if not torch.cuda.is_available():
        print("done_when needs a CUDA device (none found)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    peak = harness.measure_bf16_peak(8192)
    proto = Case(L=1)
    header = dict(device=torch.cuda.get_device_name(), date=harness._dt.datetime.now().isoformat(timespec="seconds"),
                  commit=harness.git_commit(), peak_tflops=peak, main_impl_available=new_path,
                  layout=(f"batch 1, {proto.hq} q / {proto.hkv} KV heads, d {proto.d}, index dim {proto.di}, "
                          f"block {proto.block}, top-{proto.topk}, bf16, causal"), notes=notes)
    meta = dict(device=header["device"], date=header["date"], commit=header["commit"], peak_tflops=peak)
    print(f"device {header['device']} | commit {header['commit']} | peak {peak:.0f} TF/s | "
          f"main_impl {'available' if new_path else 'not available'} | {len(steps)} measurements", flush=True)
    records: List[Dict] = []
    if args.previous:
        records, header["merged"] = merge_previous(args.previous, header["device"])
        done = {(r["impl"], r["L"], r["sel_kind"]) for r in records}
        steps = [s for s in steps if (s[0], s[1], s[2]) not in done]
    for impl, L, kind, fwd_only in steps:
        case = Case(L=L, fwd_only=fwd_only, selection=kind if kind != "-" else "random")
        if impl not in registry.names():
            rec = harness.empty_record(impl, case, meta, status="skipped", reason="impl not registered")
        elif time.time() - t0 > args.time_budget_s:
            rec = harness.empty_record(impl, case, meta, status="skipped",
                                       reason=f"time budget of {args.time_budget_s:.0f} s exhausted")
        else:
            rec = harness.run_one(impl, case, args, peak, meta)
        rec["sel_kind"] = kind
        records.append(rec)
        harness.print_record(rec)
        (out / "done_when.json").write_text(json.dumps({"header": header, "records": records}, indent=1))
        (out / "done_when.md").write_text(table(records, header))
    print()
    print(table(records, header))
    print(f"total {time.time() - t0:.0f} s")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

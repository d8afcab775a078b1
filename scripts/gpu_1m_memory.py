#!/usr/bin/env python
"""Peak memory and time of one MSA layer's fwd+bwd at 1M tokens on one GPU (issue 17).

    OUT=/tmp/out python scripts/gpu_1m_memory.py --cap-gib 78     # ~3 min on one H100 / H200
    python scripts/gpu_1m_memory.py --selections flex --no-128k    # one selection only
    python scripts/gpu_1m_memory.py --cpu-smoke                     # tiny sizes, Triton interpreter

The measured call is exactly msa-bench's ``msa-op-auto`` fwd+bwd (``bench/impls_main._op_bench``
with ``main_impl=auto``: paper layout 64 q / 4 KV heads, d = di = 128, block 128, top-16, bf16,
batch 1; q, k, v, iq, ik and dout allocated by the bench; the selection given for ``trained``
and ``flex``, the op's own for ``random``; index selection + main + indexer KL forward, then
the backward of out and the KL). Per selection: one warm-up call (compiles), then two measured
calls, each after dropping the gradients and emptying the allocator's cache; reported: the
larger ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` of the two (GiB), the
median time, the path the auto dispatch took (the op's log lines), the partial-buffer chunks
the call cut (KV-outer plan chunks, union dS chunks), and two analytic numbers:

* floor: the tensors no implementation can avoid: q, out, dout, dq (4 x N x 64 x 128 bf16 =
  64 GiB at 1M), k, v, dk, dv (4 GiB), iq, ik and their gradients (2.5 GiB), lse and delta
  (fp32 [64, N]) and the selection (int32 [4, N, 16]): 71.25 GiB at 1M;
* model: what the sizing code assumes the call holds besides its chunked buffers
  (``triton_sparse_attn.main_resident_bytes`` + ``triton_op.index_resident_bytes`` for the
  KV-outer path, ``triton_union.union_resident_bytes`` for the union path), and the per-chunk
  budget it derives (``partial_budget``: 74 GiB envelope less the model, 512 MiB .. 8 GiB).

``--cap-gib 78`` calls ``torch.cuda.set_per_process_memory_fraction`` so that the caching
allocator may reserve at most 78 GiB: an H200 then behaves like an 80 GB H100 (79.1 GiB
usable); an allocation past the cap raises the usual out-of-memory error, recorded as such.
``--no-128k`` skips the 128K part (op fwd+bwd at 128K on random and flex, median of 5 calls,
with the chunk counts: the budget rule gives the 8 GiB chunks an idle card got before, so the
128K time must match earlier runs of the same card).

Output: a table on stdout and ``$OUT/mem_1m.json`` (``--out`` overrides ``$OUT``). Success:
every 1M row has status ok (with ``--cap-gib 78``: it fitted an 80 GB H100's allocator),
``peak_alloc_gib`` about 74-74.5 and ``within_model`` true (the peak kept to the sizing model's
bound: resident + one chunk + 0.5 GiB). Exit status 1 if a 1M row failed or broke the bound.
``MSA_MAIN_KERNEL="mem_envelope_gib=1"`` puts a shorter run in the 1M regime (512 MiB chunks):
the GPU test in tests/ops/test_memory_sizing.py does that at 256K.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=1 << 20, help="tokens (default 1M = 1048576)")
    p.add_argument("--selections", default="random,trained,flex", help="comma list: random, trained, flex, pool:C, ...")
    p.add_argument("--cap-gib", type=float, default=0.0, help="cap the caching allocator at this many GiB (H100 emulation)")
    p.add_argument("--no-128k", action="store_true", help="skip the 128K timing part")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_1m_memory_out"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 (tests the script)")
    return p.parse_args(argv)


class _Log(logging.Handler):
    """Collects the op's 'which path runs' lines (ops/common.announce) of one call."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def watch_chunks(stats: dict):
    """Counts the chunks the call cuts: KV-outer plans with partial buffers, union dS chunks."""
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U

    build, cut = T.build_plan, U._dsbuf_chunks

    def build_plan(*a, **k):
        plan = build(*a, **k)
        per_pos = a[3] if len(a) > 3 else k.get("bytes_per_pos", 0)
        if per_pos > 0:
            stats["kv_chunks"] = max(stats.get("kv_chunks", 0), len(plan.chunks))
            stats["kv_chunk_gib"] = round(plan.chunks[0].cq * per_pos / GIB, 3) if plan.chunks else 0.0
        return plan

    def dsbuf_chunks(*a, **k):
        res = cut(*a, **k)
        stats["union_kl_chunks"] = stats.get("union_kl_chunks", 0) + len(res)
        return res

    T.build_plan, U._dsbuf_chunks = build_plan, dsbuf_chunks
    try:
        yield
    finally:
        T.build_plan, U._dsbuf_chunks = build, cut


def analytic(case) -> dict:
    """Floor and the sizing code's model (GiB) for this case (see the module docstring)."""
    from msa_megatron.ops import triton_op as O
    from msa_megatron.ops import triton_sparse_attn as T
    from msa_megatron.ops import triton_union as U
    from types import SimpleNamespace

    mk = lambda *s: torch.empty(*s, dtype=case.dtype, device="meta")  # noqa: E731
    b, N = case.batch, case.L
    q, k, iq, ik = mk(b, N, case.hq, case.d), mk(b, N, case.hkv, case.d), mk(b, N, case.hkv, case.di), mk(b, N, case.di)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    floor = 4 * nbytes(q) + 4 * nbytes(k) + 2 * (nbytes(iq) + nbytes(ik)) + 2 * b * case.hq * N * 4 \
        + b * case.hkv * N * case.topk * 4
    cfg = T.default_config()
    kv_res = T.main_resident_bytes(q.shape, k.shape, case.topk, q.dtype, bwd=True) + O.index_resident_bytes(iq, ik)
    P = U.union_positions(case.hq // case.hkv, q.dtype, cfg, case.d)
    lists = SimpleNamespace(cnt=torch.empty(b * case.hkv * math.ceil(N / P), device="meta"), umax=P * case.topk)
    un_res = U.union_resident_bytes(q, k, case.topk, lists, kl=True, di=case.di)
    per_pos = T.partial_bytes_per_pos(q, case.hkv, case.topk, case.block, fwd=True, bwd=True, config=cfg,
                                      dq_partial_dtype=q.dtype)
    kv_budget = T.partial_budget(cfg, kv_res)
    return dict(floor_gib=floor / GIB, model_kv_gib=kv_res / GIB, model_union_gib=un_res / GIB,
                budget_kv_gib=kv_budget / GIB, budget_union_gib=T.partial_budget(cfg, un_res) / GIB,
                kv_chunks_model=math.ceil(N / max(1, min(N, kv_budget // per_pos))))


def bound(rec: dict) -> None:
    """The sizing model's upper bound for this row's path: resident + one chunk + 0.5 GiB
    (allocator rounding, small arrays); ``within_model`` says whether the peak kept to it."""
    union = any("union-tile" in ln for ln in rec.get("path", []))
    rec["path_kind"] = "union" if union else ("kv" if rec.get("path") else "")
    key = "union" if union else "kv"
    rec["model_bound_gib"] = rec[f"model_{key}_gib"] + rec[f"budget_{key}_gib"] + 0.5
    if rec.get("peak_alloc_gib") is not None:
        rec["within_model"] = rec["peak_alloc_gib"] <= rec["model_bound_gib"]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(name: str, case, reps: int, handler: _Log) -> dict:
    """Builds msa-bench's msa-op-auto bench for ``case`` and measures its fwd+bwd."""
    from msa_megatron.bench import impls_main
    from msa_megatron.bench.registry import Skip
    from msa_megatron.ops import common

    rec = dict(selection=case.selection, L=case.L, status="ok", reason="")
    cuda = torch.cuda.is_available() and str(case.device).startswith("cuda")
    bench = None
    try:
        bench = impls_main._op_bench(case, "auto")
        rec.update(U8=bench.u8, selection_desc=bench.selection)
        bench.fwdbwd()  # warm-up: compiles the kernels
        sync()
        times, alloc, reserved, stats = [], [], [], {}
        for _ in range(reps):
            for t in bench.grad_to_none:
                t.grad = None
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            common.ANNOUNCED.clear()  # the dispatch lines again, for this call
            handler.lines.clear()
            t0 = time.perf_counter()
            with watch_chunks(stats):
                bench.fwdbwd()
                sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if cuda:
                alloc.append(torch.cuda.max_memory_allocated() / GIB)
                reserved.append(torch.cuda.max_memory_reserved() / GIB)
        rec.update(fwdbwd_ms=statistics.median(times), **stats,
                   path=[ln for ln in handler.lines if "main branch" in ln or "indexer KL" in ln])
        if cuda:
            rec.update(peak_alloc_gib=max(alloc), peak_reserved_gib=max(reserved))
    except Skip as exc:
        rec.update(status="skipped", reason=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        rec.update(status="out of memory", reason=str(exc).splitlines()[0][:300])
    except Exception as exc:  # recorded; the next selection still runs
        rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        traceback.print_exc(limit=6)
    finally:
        if bench is not None:
            for t in bench.grad_to_none:
                t.grad = None
        del bench
        if cuda:
            torch.cuda.empty_cache()
    return rec


def fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from msa_megatron.bench import harness
    from msa_megatron.bench.registry import Case

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = _Log()
    logging.getLogger("msa_megatron.ops").addHandler(handler)
    logging.getLogger("msa_megatron.ops").setLevel(logging.INFO)
    if args.cpu_smoke:
        from msa_megatron.bench import impls_main

        impls_main._need_cuda = lambda case: None
        base = Case(L=300, hq=8, hkv=2, d=16, di=16, block=16, topk=3, dtype=torch.float32, device="cpu")
        lengths_128k = [] if args.no_128k else [200]
        reps = 1
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA device (or --cpu-smoke)")
            return 2
        base = Case(L=args.L)
        lengths_128k = [] if args.no_128k else [1 << 17]
        reps = 2
    header = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  total_gib=torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 0,
                  torch=torch.__version__, commit=harness.git_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  cap_gib=args.cap_gib or None, layout=f"{base.hq} q / {base.hkv} KV heads, d {base.d}, di {base.di}, "
                  f"block {base.block}, top-{base.topk}, {str(base.dtype)[6:]}, batch {base.batch}")
    try:
        import triton

        header["triton"] = triton.__version__
    except ImportError:
        pass
    if args.cap_gib and torch.cuda.is_available():
        frac = min(1.0, args.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(frac)
        header["cap_note"] = (f"allocator capped at {args.cap_gib:g} GiB of {header['total_gib']:.1f} GiB "
                              f"(set_per_process_memory_fraction({frac:.4f})): emulates an 80 GB H100")
    print(" | ".join(f"{k} {v}" for k, v in header.items() if v is not None), flush=True)
    if header.get("cap_note"):
        print(header["cap_note"], flush=True)

    rows = []
    t_start = time.time()
    for sel in [s.strip() for s in args.selections.split(",") if s.strip()]:
        case = replace(base, selection=sel)
        rec = measure("msa-op-auto", case, reps, handler)
        rec.update(analytic(case))
        rec["part"] = "1m"
        bound(rec)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    for L in lengths_128k:
        for sel in ("random", "flex"):
            case = replace(base, L=L, selection=sel)
            rec = measure("msa-op-auto", case, 1 if args.cpu_smoke else 5, handler)
            rec.update(analytic(case))
            rec["part"] = "128k"
            bound(rec)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    header["wall_s"] = round(time.time() - t_start, 1)

    lines = ["| part | selection | U8 | status | path | fwd+bwd ms | peak alloc GiB | peak reserved GiB | model bound GiB | "
             "floor GiB | model GiB (kv / union) | budget GiB (kv / union) | chunks kv (model) / union-KL |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        within = {True: "", False: " (above!)"}.get(r.get("within_model"), "")
        lines.append(
            f"| {r['part']} | {r['selection']} | {fmt(r.get('U8'), '.1f')} | {r['status']} {r['reason'][:60]} | "
            f"{r['path_kind']} | {fmt(r.get('fwdbwd_ms'), '.1f')} | {fmt(r.get('peak_alloc_gib'))} | "
            f"{fmt(r.get('peak_reserved_gib'))} | {fmt(r['model_bound_gib'])}{within} | "
            f"{fmt(r['floor_gib'])} | {fmt(r['model_kv_gib'])} / {fmt(r['model_union_gib'])} | "
            f"{fmt(r['budget_kv_gib'])} / {fmt(r['budget_union_gib'])} | "
            f"{r.get('kv_chunks', '-')} ({r['kv_chunks_model']}) / {r.get('union_kl_chunks', '-')} |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        if r.get("path"):
            print(f"{r['part']} {r['selection']}: " + " ; ".join(r["path"]))
    (out_dir / "mem_1m.json").write_text(json.dumps(dict(header=header, rows=rows, table=table), indent=1))
    print(f"wrote {out_dir / 'mem_1m.json'} ({header['wall_s']} s)")
    bad = [r for r in rows if r["part"] == "1m" and (r["status"] != "ok" or r.get("within_model") is False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

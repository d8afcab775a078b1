#!/usr/bin/env python
"""Packed documents vs one long document: the MSA op, FlexAttention with a document mask and
torch's varlen flash, forward and forward+backward (issue 21, docs/packed.md section 6).

    python scripts/gpu_bench_packed.py [--length 128K] [--out DIR] [--time-budget-s 170]
                                       [--median 1024] [--sigma 1.5] [--max-doc 64K] [--seed 0]

Needs torch + triton and this checkout on PYTHONPATH (no megatron-core). One MSA layer at the
paper layout (64 query / 4 KV heads, head dim 128, index dim 128, block 128, top-16), bf16,
batch 1, ``--length`` tokens either packed from a log-normal document-length mix (median
``--median`` tokens, log-sigma ``--sigma``, lengths clipped to [32, ``--max-doc``], drawn
until the row is full; the last document is cut) or one document of the whole length.

Rows (each: packed and one document):
  msa-select       Triton index kernel (selection + index LSE), no grad
  msa-op           msa_attention_triton(mode='msa', doc_start=) fwd, and fwd+bwd incl. the KL backward
  flex-doc         FlexAttention, causal mask within documents (dense per document), fwd / fwd+bwd
  varlen-flash     torch.nn.attention.varlen.varlen_attn (causal per document) if this torch has it
Plus a cross-check: flex-doc vs varlen-flash outputs on the packed row (both exact dense).

Writes packed_bench.json and packed_bench.md to --out (default $OUT, else ./packed_bench_out)
with device, date, commit (env MSA_COMMIT, else git), torch/triton versions, the mix's
statistics (documents, fraction of tokens in documents longer than k*B = 2048) and the FLOPs
model per document (sum over documents of the causal pair counts of Eq. 12's terms). Rows
that would pass the time budget are recorded as skipped. Exit 1 if a row errors or the
cross-check fails.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PAPER = dict(hq=64, g=4, d=128, di=128, B=128, K=16)


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def document_lengths(total: int, median: float, sigma: float, max_doc: int, seed: int) -> List[int]:
    """Log-normal lengths (median ``median``, log-sigma ``sigma``) clipped to [32, max_doc],
    drawn until they fill ``total`` tokens; the last one is cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    out, used = [], 0
    while used < total:
        z = float(torch.randn((), generator=gen))
        n = int(min(max(round(median * math.exp(sigma * z)), 32), max_doc))
        n = min(n, total - used)
        out.append(n)
        used += n
    return out


def flops_model(lengths: List[int], L: dict) -> Dict[str, float]:
    """Attention FLOPs (2 per MAC, QK and PV) per document, summed: dense causal within documents;
    MSA = index scores on every causal same-document pair (2 d_I n_I) + the main branch on
    min(k*B, visible) keys per query (4 n_h d_h) -- Eq. 12's terms counted exactly per document."""
    hq, d, g, di, B, K = (L[x] for x in ("hq", "d", "g", "di", "B", "K"))
    budget = K * B
    dense = index = main = 0.0
    for n in lengths:
        pairs = n * (n + 1) / 2  # sum over t of (t + 1)
        m = min(n, budget)
        capped = m * (m + 1) / 2 + (n - m) * budget  # sum over t of min(kB, t + 1)
        dense += 4 * hq * d * pairs
        index += 2 * g * di * pairs
        main += 4 * hq * d * capped
    return {"dense": dense, "msa_index": index, "msa_main": main, "msa": index + main,
            "dense_over_msa": dense / max(index + main, 1.0)}


def _sync() -> None:
    torch.cuda.synchronize()


def time_ms(fn: Callable[[], None], reps: int = 5) -> float:
    """Median ms of ``fn`` after one warm-up call (compilation); 3 reps for calls over 100 ms."""
    fn()
    _sync()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if i == 2 and sorted(times)[1] > 100.0:
            break
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- the benchmarked calls
class Inputs:
    def __init__(self, n: int, L: dict, seed: int):
        dev, bf = "cuda", torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(seed)
        mk = lambda *s: torch.randn(*s, device=dev, generator=gen).to(bf)  # noqa: E731
        self.q, self.k, self.v = mk(1, n, L["hq"], L["d"]), mk(1, n, L["g"], L["d"]), mk(1, n, L["g"], L["d"])
        self.iq, self.ik = mk(1, n, L["g"], L["di"]), mk(1, n, L["di"])
        self.do = mk(1, n, L["hq"], L["d"])
        for t in (self.q, self.k, self.v, self.iq, self.ik):
            t.requires_grad_(True)

    def zero(self) -> None:
        for t in (self.q, self.k, self.v, self.iq, self.ik):
            t.grad = None


def msa_calls(x: Inputs, cfg, doc_start: Optional[torch.Tensor]):
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops.triton_op import msa_attention_triton

    def select():
        with torch.no_grad():
            TI.index_select(x.iq, x.ik, cfg, doc_start=doc_start)

    def fwd():
        with torch.no_grad():
            msa_attention_triton(x.q, x.k, x.v, x.iq, x.ik, cfg, mode="msa", doc_start=doc_start)

    def fwd_bwd():
        x.zero()
        out, aux = msa_attention_triton(x.q, x.k, x.v, x.iq, x.ik, cfg, mode="msa", doc_start=doc_start)
        torch.autograd.backward([out, aux.kl], [x.do, torch.ones_like(aux.kl)])

    return select, fwd, fwd_bwd


_flex = None


def flex_calls(x: Inputs, doc_ids: torch.Tensor, block: int):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    n = doc_ids.numel()

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])

    # compiled: the eager path evaluates mask_mod on the whole [n, n] grid (16 G entries at 128K)
    bm = create_block_mask(mask_mod, None, None, n, n, device=x.q.device, BLOCK_SIZE=block, _compile=True)
    q, k, v, do = (t.transpose(1, 2) for t in (x.q, x.k, x.v, x.do))  # [1, heads, n, d] views

    def run():
        return _flex(q, k, v, block_mask=bm, enable_gqa=True)

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        x.zero()
        run().backward(do)

    return fwd, fwd_bwd, run


def varlen_calls(x: Inputs, cu: torch.Tensor):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    hq, g = x.q.shape[2], x.k.shape[2]
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params
    if gqa and hq != g:
        kw["enable_gqa"] = True
    cu32 = cu.to(device="cuda", dtype=torch.int32)
    m = int((cu[1:] - cu[:-1]).max())

    def run():
        k, v = x.k[0], x.v[0]
        if not gqa and hq != g:
            k, v = k.repeat_interleave(hq // g, dim=1), v.repeat_interleave(hq // g, dim=1)
        return varlen_attn(x.q[0], k, v, cu32, cu32, m, m, **kw)

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        x.zero()
        run().backward(x.do[0])

    return fwd, fwd_bwd, run


# ----------------------------------------------------------------------------- driver
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--length", default="128K")
    ap.add_argument("--out", default=os.environ.get("OUT") or "packed_bench_out")
    ap.add_argument("--time-budget-s", type=float, default=170.0)
    ap.add_argument("--median", type=float, default=1024.0)
    ap.add_argument("--sigma", type=float, default=1.5)
    ap.add_argument("--max-doc", default="64K")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench_packed.py needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    import triton

    from msa_megatron.ops import naive as R
    from msa_megatron.config import MSAConfig

    L = dict(PAPER)
    n = parse_len(args.length)
    lengths = document_lengths(n, args.median, args.sigma, parse_len(args.max_doc), args.seed)
    budget_tokens = L["K"] * L["B"]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                      torch.tensor(lengths, device="cuda"))
    doc_start = R.doc_start_from_cu_seqlens(cu, n)  # [n], shared by the batch of 1
    cfg = MSAConfig(block_size=L["B"], topk=L["K"], index_dim=L["di"], num_index_heads=L["g"])
    long_tokens = sum(x for x in lengths if x > budget_tokens)
    mix = {"documents": len(lengths), "median_len": sorted(lengths)[len(lengths) // 2], "max_len": max(lengths),
           "frac_tokens_in_docs_over_kB": long_tokens / n, "median_param": args.median, "sigma": args.sigma,
           "clip": [32, parse_len(args.max_doc)], "seed": args.seed}
    flops = {"packed": flops_model(lengths, L), "one_document": flops_model([n], L)}
    header = {"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": __import__("msa_megatron.bench.harness", fromlist=["git_commit"]).git_commit(), "torch": torch.__version__, "triton": triton.__version__, "length": n,
              "layout": L, "dtype": "bf16", "mix": mix, "flops_model": flops}
    print(json.dumps(header, indent=1), flush=True)
    x = Inputs(n, L, args.seed)
    single_ids = torch.zeros(n, dtype=torch.long, device="cuda")
    single_cu = torch.tensor([0, n], device="cuda")
    records: List[Dict] = []
    failed = False

    def record(impl: str, layout: str, build: Callable[[], Dict[str, Callable]]):
        nonlocal failed
        rec = {"impl": impl, "layout": layout}
        left = args.time_budget_s - (time.time() - t0)
        if left < 15:
            rec["skipped"] = f"time budget ({args.time_budget_s:.0f} s) spent"
            print(f"{impl:14s} {layout:12s} skipped (budget)", flush=True)
            records.append(rec)
            return
        try:
            calls = build()
            torch.cuda.reset_peak_memory_stats()
            for name, fn in calls.items():
                if time.time() - t0 > args.time_budget_s:
                    rec[name + "_ms"] = None
                    rec.setdefault("notes", []).append(f"{name}: skipped (budget)")
                    continue
                rec[name + "_ms"] = time_ms(fn)
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            fb = rec.get("fwd_bwd_ms")
            if fb:
                rec["tokens_per_s_fwd_bwd"] = n / (fb / 1e3)
        except Exception as exc:  # noqa: BLE001 - one row's failure is recorded, the others still run
            failed = True
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
        x.zero()
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{impl:14s} {layout:12s} " + " ".join(f"{k}={v:.2f}" for k, v in rec.items()
                                                       if isinstance(v, float)) + (f" {rec.get('error', '')}"), flush=True)
        records.append(rec)

    for layout, ds in (("packed", doc_start), ("one-document", None)):
        record("msa-select", layout, lambda: {"fwd": msa_calls(x, cfg, ds)[0]})
        record("msa-op", layout, lambda: dict(zip(("fwd", "fwd_bwd"), msa_calls(x, cfg, ds)[1:])))
    try:
        varlen = importlib.import_module("torch.nn.attention.varlen")  # torch >= 2.10
        has_varlen = True
        import inspect

        if "enable_gqa" not in inspect.signature(varlen.varlen_attn).parameters:
            header["varlen"] = (f"torch {torch.__version__}: varlen_attn has no enable_gqa; K/V are expanded to the "
                                f"{L['hq']} query heads inside the timed call")
    except ImportError:
        has_varlen = False
        header["varlen"] = f"torch {torch.__version__} has no torch.nn.attention.varlen: rows skipped"
    check = {}
    # cross-check on the packed row first (cheap), then the timings
    try:
        _, _, flex_run = flex_calls(x, doc_ids, L["B"])
        with torch.no_grad():
            ref = flex_run().transpose(1, 2).float()
            if has_varlen:
                other = varlen_calls(x, cu)[2]().float()[None]
                check["flex_vs_varlen_rel"] = float((ref - other).norm() / ref.norm())
        check["ok"] = check.get("flex_vs_varlen_rel", 0.0) <= 1e-2
    except Exception as exc:  # noqa: BLE001
        check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        traceback.print_exc()
    failed |= not check.get("ok", False)
    header["cross_check"] = check
    print("cross-check", check, flush=True)
    for layout, ids, c in (("packed", doc_ids, cu), ("one-document", single_ids, single_cu)):
        if has_varlen:
            record("varlen-flash", layout, lambda: dict(zip(("fwd", "fwd_bwd"), varlen_calls(x, c)[:2])))
        record("flex-doc", layout, lambda: dict(zip(("fwd", "fwd_bwd"), flex_calls(x, ids, L["B"])[:2])))
    header["wall_s"] = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_bench.json").write_text(json.dumps({"header": header, "records": records}, indent=1))
    md = markdown(header, records)
    (out / "packed_bench.md").write_text(md)
    print(md, flush=True)
    return 1 if failed else 0


def markdown(h: Dict, records: List[Dict]) -> str:
    m, f = h["mix"], h["flops_model"]
    lines = [f"# Packed documents vs one document ({h['length'] // 1024}K tokens)", "",
             f"{h['device']}, {h['date']}, commit {h['commit']}, torch {h['torch']}, triton {h['triton']}; "
             f"paper layout {h['layout']}, bf16, batch 1.", "",
             f"Mix: {m['documents']} documents, log-normal (median {m['median_param']:g}, sigma {m['sigma']:g}, "
             f"clip {m['clip']}), realised median {m['median_len']}, max {m['max_len']}; "
             f"{100 * m['frac_tokens_in_docs_over_kB']:.1f}% of tokens in documents longer than k*B = 2048.", "",
             f"Forward FLOPs model (per document, summed): packed dense {f['packed']['dense'] / 1e12:.1f} TF, MSA "
             f"{f['packed']['msa'] / 1e12:.1f} TF (index {f['packed']['msa_index'] / 1e12:.1f}), dense/MSA "
             f"{f['packed']['dense_over_msa']:.2f}x; one document dense {f['one_document']['dense'] / 1e12:.1f} TF, "
             f"MSA {f['one_document']['msa'] / 1e12:.1f} TF, {f['one_document']['dense_over_msa']:.2f}x.", "",
             f"Cross-check (flex-doc vs varlen-flash, packed): {h.get('cross_check')}"
             + (f"; {h['varlen']}" if h.get("varlen") else ""), "",
             "| impl | layout | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | peak GB | note |",
             "|---|---|---|---|---|---|---|"]

    def fm(v, spec=".1f"):
        return "" if v is None else format(v, spec)

    for r in records:
        note = r.get("error") or r.get("skipped") or "; ".join(r.get("notes", []))
        lines.append(f"| {r['impl']} | {r['layout']} | {fm(r.get('fwd_ms'))} | {fm(r.get('fwd_bwd_ms'))} | "
                     f"{fm(r.get('tokens_per_s_fwd_bwd'), ',.0f')} | {fm(r.get('peak_gb'), '.1f')} | {note} |")
    lines += ["", f"wall {h.get('wall_s', 0):.0f} s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Decode-step benchmark: MSA vs dense attention for one new token per sequence over a KV
cache of 32K-1M tokens (``scripts/gpu_bench_decode.py`` runs it on one GPU).

One attention layer in the paper's head layout (64 query / 4 KV heads, head dim 128, index
dim 128, block 128, top-16), bf16, batch 1 and 8. Implementations:

* ``msa``: :func:`msa_megatron.ops.triton_decode.msa_decode_triton` (two launches: index
  scores over the cached index keys + block max; top-k + sparse attention over the 16
  selected blocks + merge), its launches alone (``msa_index``, ``msa_select_attend``), the
  unfused form (``msa_3launch``: index, standalone top-k, attention) and ``msa_fp8ik`` (the
  opt-in fp8 index-key cache);
* ``dense_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with GQA on the
  flash backend (flash-decoding), cuDNN if flash refuses;
* ``dense_triton``: the decode kernel's attention over every block (split-K flash
  decoding, GQA-packed): the dense twin of ``msa`` in the same code.

Caches are stored batch-first [b, L, g, d] so SDPA reads them without a copy; the MSA
kernels see the sequence-first view [L, b, g, d] of the same storage (Megatron's layout,
strides only) and an index-key cache [L, b, di]. Timing: median GPU time of a call with
a cold L2 (a 256 MB buffer is rewritten before each call, which also hides part of the launch
latency), and the mean of a back-to-back loop of calls (launches included); each impl eager
and as a replayed CUDA graph (``graphable``: MSA with the lengths as a device tensor).
Tokens/s = batch / step time of the one layer. A correctness pass first compares the kernels with the pure-PyTorch reference
(ops/decode_naive.py) on the same inputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..config import MSAConfig
from .harness import git_commit

HQ, G, D, DI, BLOCK, TOPK = 64, 4, 128, 128, 128, 16
CONTEXTS = (32 * 1024, 128 * 1024, 1024 * 1024)
BATCHES = (1, 8)


def fmt_len(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else (f"{n >> 10}K" if n % (1 << 10) == 0 else str(n))


class Caches:
    """One layer's decode inputs at context L, batch b (bf16, random)."""

    def __init__(self, L: int, b: int, dtype=torch.bfloat16, device="cuda", seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.L, self.b = L, b
        self.k = torch.randn(b, L, G, D, device=device, dtype=dtype, generator=gen)
        self.v = torch.randn(b, L, G, D, device=device, dtype=dtype, generator=gen)
        self.ik = torch.randn(L, b, DI, device=device, dtype=dtype, generator=gen)
        self.q = torch.randn(b, HQ, D, device=device, dtype=dtype, generator=gen)
        self.iq = torch.randn(b, G, DI, device=device, dtype=dtype, generator=gen)
        fp8 = getattr(torch, "float8_e4m3fn", None)
        #: the opt-in fp8 (e4m3) index-key cache of the same keys (bf16/fp16 runs only)
        self.ik8 = self.ik.to(fp8) if fp8 is not None and dtype != torch.float32 else None

    @property
    def k_seq(self):  # Megatron's [L, b, g, d] view of the same storage
        return self.k.transpose(0, 1)

    @property
    def v_seq(self):
        return self.v.transpose(0, 1)


def cfg() -> MSAConfig:
    return MSAConfig(block_size=BLOCK, topk=TOPK, index_dim=DI)


def sdpa_dense(c: Caches):
    """SDPA over the whole cache (flash backend, else cuDNN): returns (fn, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = c.q.unsqueeze(2)  # [b, hq, 1, d]
    k4, v4 = c.k.transpose(1, 2), c.v.transpose(1, 2)  # [b, g, L, d] views
    errors = []
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn")):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)
        try:
            fn()
            torch.cuda.synchronize()
            return fn, name
        except RuntimeError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0][:200]}")
    raise RuntimeError("; ".join(errors))


def timed(fn: Callable, iters: int, flush: torch.Tensor) -> Dict[str, float]:
    """Cold-L2 median GPU ms per call, and the mean ms of a back-to-back eager loop."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    loop = (time.perf_counter() - t0) * 1e3 / iters
    return {"ms": statistics.median(times), "loop_ms": loop}


def _near_ties_only(sel_k, sel_n, c: Caches, conf: MSAConfig, rel_tol: float = 1e-4) -> bool:
    """Whether every (row, group) where the kernel's selection differs from the reference's
    only swaps blocks whose reference block scores agree within rel_tol (accumulation-order
    near-ties)."""
    from ..ops import naive

    for i, gg in (sel_k != sel_n).any(-1).nonzero().tolist():
        scores = naive.index_block_scores(c.iq[i:i + 1, None], c.ik[:c.L, i:i + 1].transpose(0, 1),
                                              conf.block_size)[0, gg, -1]
        a = set(sel_k[i, gg].tolist()) - {-1}
        b = set(sel_n[i, gg].tolist()) - {-1}
        if len(a) != len(b):
            return False
        for x, y in zip(sorted(a - b), sorted(b - a)):
            if abs(scores[x] - scores[y]) > rel_tol * max(1.0, abs(float(scores[y]))):
                return False
    return True


def _mass_ratio(sel_a, sel_b, c: Caches, conf: MSAConfig) -> float:
    """Index-softmax mass (softmax of the bf16 block scores / sqrt(di)) that selection a keeps,
    over the mass selection b keeps, averaged over rows and groups: 1.0 = a loses nothing."""
    from ..ops import naive as reference

    ratios = []
    for i in range(c.b):
        scores = reference.index_block_scores(c.iq[i:i + 1, None], c.ik[:c.L, i:i + 1].transpose(0, 1),
                                              conf.block_size)[0, :, -1].float()
        p = torch.softmax(scores / math.sqrt(DI), dim=-1)
        for gg in range(sel_a.shape[1]):
            pick = lambda s: p[gg, s[i, gg][s[i, gg] >= 0].long()].sum()  # noqa: E731
            ratios.append((pick(sel_a) / pick(sel_b)).item())
    return sum(ratios) / len(ratios)


def correctness(c: Caches, graphs: bool = False) -> Dict[str, object]:
    """Kernels vs the pure-PyTorch reference (fp32 math on the same bf16 values); with
    ``graphs``, the step replayed as a CUDA graph at per-row lengths, changed between
    replays; the fp8 index-key cache's selection vs the bf16 one."""
    from ..ops import triton_decode as TD
    from ..ops.decode_naive import dense_decode_naive, msa_decode_naive

    conf = cfg()
    out_k, lse_k, sel_k = TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik, c.L, conf)
    out_n, lse_n, sel_n = msa_decode_naive(c.q, c.k_seq, c.v_seq, c.iq, c.ik, c.L, conf)
    same_sel = (sel_k == sel_n).all(-1).float().mean().item()
    near_tie_only = _near_ties_only(sel_k, sel_n, c, conf)
    # attention on the reference's selection: near-tie swaps do not blur the output check
    out_a, lse_a = TD.decode_attention_triton(c.q, c.k_seq, c.v_seq, sel_n, c.L, BLOCK)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    res = {"L": c.L, "b": c.b, "selection_rows_identical": same_sel, "selection_diffs_are_near_ties": near_tie_only,
           "standalone_topk_equals_fused": bool(torch.equal(TD.decode_select_triton(c.iq, c.ik, c.L, conf), sel_k)),
           "msa_out_rel_err": rel(out_a, out_n),
           "msa_lse_max_err": (lse_a - lse_n.float()).abs().max().item(),
           "msa_end_to_end_out_rel_err": rel(out_k, out_n)}
    out_d, lse_d = TD.dense_decode_triton(c.q, c.k_seq, c.v_seq, c.L, BLOCK)
    if c.L <= 256 * 1024:
        out_r, lse_r = dense_decode_naive(c.q, c.k_seq, c.v_seq, c.L)
        res["dense_triton_out_rel_err"] = rel(out_d, out_r)
        res["dense_triton_lse_max_err"] = (lse_d - lse_r.float()).abs().max().item()
    try:
        fn, name = sdpa_dense(c)
        res[f"dense_sdpa_{name}_vs_triton_rel_err"] = rel(fn().squeeze(2), out_d)
    except RuntimeError as exc:
        res["dense_sdpa_error"] = str(exc)
    ok = near_tie_only and res["standalone_topk_equals_fused"]
    if graphs:  # per-row lengths in a device tensor, changed in place between replays
        lens = torch.full((c.b,), c.L, dtype=torch.int32, device=c.q.device)
        graph = TD.GraphedStep(lambda: TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik, lens, conf,
                                                            max_len=c.L))
        errs, sels = [], []
        for shrink in (0, 1000):
            new = torch.tensor([max(1, c.L - shrink * (i + 1) - 13 * i) for i in range(c.b)], dtype=torch.int32)
            lens.copy_(new)
            out_g, lse_g, sel_g = graph.replay()
            out_r, lse_r, sel_r = msa_decode_naive(c.q, c.k_seq, c.v_seq, c.iq, c.ik, new.to(c.q.device), conf)
            sels.append(bool(torch.equal(sel_g, sel_r)) or _near_ties_only(sel_g, sel_r, c, conf))
            out_s, _ = TD.decode_attention_triton(c.q, c.k_seq, c.v_seq, sel_r, new.to(c.q.device), BLOCK)
            errs.append(max(rel(out_s, out_r), rel(out_g, out_r) if torch.equal(sel_g, sel_r) else 0.0))
        res["graph_selection_ok"] = all(sels)
        res["graph_out_rel_err"] = max(errs)
        ok = ok and all(sels) and max(errs) < 1e-2
        del graph
    if c.ik8 is not None:
        sel_8 = TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik8, c.L, conf)[2]
        same = [(len(set(a.tolist()) & set(b_.tolist()) - {-1}) / max(1, len(set(b_.tolist()) - {-1})))
                for a, b_ in zip(sel_8.flatten(0, 1), sel_k.flatten(0, 1))]
        res["fp8ik_block_overlap"] = sum(same) / len(same)
        res["fp8ik_index_mass_ratio"] = _mass_ratio(sel_8, sel_k, c, conf)
    res["ok"] = bool(ok and res["msa_out_rel_err"] < 1e-2 and res["msa_lse_max_err"] < 1e-3
                     and res.get("dense_triton_out_rel_err", 0.0) < 1e-2)
    return res


def graphable(c: Caches, conf: MSAConfig, name: str) -> Optional[Callable]:
    """The decode loop's form of impl ``name`` for CUDA-graph capture: lengths as a device
    tensor with the cache size as bound (no host sync; a growing sequence replays the same
    graph). None: the eager callable is captured as it is."""
    from ..ops import triton_decode as TD

    lens = torch.full((c.b,), c.L, dtype=torch.int32, device=c.q.device)
    if name == "msa":
        return lambda: TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik, lens, conf, max_len=c.L)
    if name == "msa_fp8ik":
        return lambda: TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik8, lens, conf, max_len=c.L)
    if name == "msa_index":
        return lambda: TD.index_block_max_triton(c.iq, c.ik, lens, conf, max_len=c.L)
    return None


def run(out_dir: Optional[str], contexts=CONTEXTS, batches=BATCHES, iters: int = 20,
        time_budget_s: float = 170.0, log=print, device: str = "cuda",
        correctness_cases=((4099, 2), None), graphs: Optional[bool] = None) -> Dict[str, object]:
    """Correctness pass, then the timing grid, each impl eager and as a replayed CUDA graph
    (``graphs``; default: on CUDA); writes decode_bench.{json,md} to out_dir after every
    record (a partial run keeps its results). ``correctness_cases``: (L, b) pairs, None
    meaning (longest context, 1). ``device`` other than cuda: the CPU test of this flow."""
    from ..ops import triton_decode as TD

    graphs = (device == "cuda") if graphs is None else graphs
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "layout": f"{HQ} q / {G} KV heads, d {D}, index dim {DI}, block {BLOCK}, top-{TOPK}, bf16",
            "graphs": graphs}
    report: Dict[str, object] = {"meta": meta, "correctness": [], "records": []}
    flush = torch.empty(256 * 1024 * 1024 // 4 if device == "cuda" else 1024, dtype=torch.float32, device=device)
    conf = cfg()

    def save():
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "decode_bench.json").write_text(json.dumps(report, indent=1))
            (Path(out_dir) / "decode_bench.md").write_text(markdown(report))

    for case in correctness_cases:  # an odd length, and the longest context
        L, b = case if case is not None else (max(contexts), 1)
        try:
            c = Caches(L, b, seed=1, device=device)
            res = correctness(c, graphs=graphs)
            del c
        except Exception as exc:  # noqa: BLE001 - report, keep going
            res = {"L": L, "b": b, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()[-2000:]}
        report["correctness"].append(res)
        log(f"correctness L={fmt_len(L)} b={b}: {json.dumps(res)}")
        torch.cuda.empty_cache()
        save()

    for L in contexts:
        for b in batches:
            if time.time() - t_start > time_budget_s:
                report["records"].append({"L": L, "b": b, "status": "skipped: time budget"})
                save()
                continue
            rec: Dict[str, object] = {"L": L, "b": b, "status": "ok"}
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                c = Caches(L, b, device=device)
                bs = TD.index_block_max_triton(c.iq, c.ik, L, conf)
                impls = {
                    "msa": lambda: TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik, L, conf),
                    "msa_index": lambda: TD.index_block_max_triton(c.iq, c.ik, L, conf),
                    "msa_select_attend": lambda: TD.select_attend_triton(c.q, c.k_seq, c.v_seq, bs, L, conf),
                    "dense_triton": lambda: TD.dense_decode_triton(c.q, c.k_seq, c.v_seq, L, BLOCK),
                    # the unfused form (index, standalone top-k, attention): what the fusion saves
                    "msa_3launch": lambda: TD.decode_attention_triton(
                        c.q, c.k_seq, c.v_seq, TD.decode_select_triton(c.iq, c.ik, L, conf), L, BLOCK),
                }
                if c.ik8 is not None:
                    impls["msa_fp8ik"] = lambda: TD.msa_decode_triton(c.q, c.k_seq, c.v_seq, c.iq, c.ik8, L, conf)
                try:
                    fn, name = sdpa_dense(c)
                    impls["dense_sdpa"] = fn
                    rec["sdpa_backend"] = name
                except RuntimeError as exc:
                    rec["sdpa_error"] = str(exc)
                for name, fn in impls.items():
                    try:
                        t = timed(fn, iters, flush)
                        rec[f"{name}_ms"], rec[f"{name}_loop_ms"] = t["ms"], t["loop_ms"]
                    except Exception as exc:  # noqa: BLE001
                        rec[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    if not graphs:
                        continue
                    try:
                        graph = TD.GraphedStep(graphable(c, conf, name) or fn)
                        t = timed(graph.replay, iters, flush)
                        rec[f"{name}_graph_ms"], rec[f"{name}_graph_loop_ms"] = t["ms"], t["loop_ms"]
                        del graph
                    except Exception as exc:  # noqa: BLE001
                        rec[f"{name}_graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                del impls, bs, c
                for mode in ("", "_graph"):
                    dense = [rec[k] for k in (f"dense_sdpa{mode}_ms", f"dense_triton{mode}_ms") if k in rec]
                    if f"msa{mode}_ms" in rec and dense:
                        rec[f"best_dense{mode}_ms"] = min(dense)
                        rec[f"speedup{mode}_vs_best_dense"] = min(dense) / rec[f"msa{mode}_ms"]
                        if f"dense_sdpa{mode}_ms" in rec:
                            rec[f"speedup{mode}_vs_sdpa"] = rec[f"dense_sdpa{mode}_ms"] / rec[f"msa{mode}_ms"]
                        rec[f"msa{mode}_tokens_per_s"] = b / (rec[f"msa{mode}_ms"] * 1e-3)
                        rec[f"dense{mode}_tokens_per_s"] = b / (min(dense) * 1e-3)
                    if f"msa_fp8ik{mode}_ms" in rec and dense:
                        rec[f"speedup{mode}_fp8ik_vs_best_dense"] = min(dense) / rec[f"msa_fp8ik{mode}_ms"]
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 1M x 8
                rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            report["records"].append(rec)
            log(f"L={fmt_len(L)} b={b}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                        for k, v in rec.items()}))
            save()
    report["meta"]["wall_s"] = round(time.time() - t_start, 1)
    save()
    return report


def markdown(report: Dict[str, object]) -> str:
    m = report["meta"]
    lines = [f"# MSA decode step vs dense ({m['device']}, {m['date']}, commit {m['commit']}, torch {m['torch']}, "
             f"triton {m['triton']})", "", f"One attention layer, {m['layout']}. GPU time per decode step with a cold "
             "L2 (median); tokens/s = batch / step time. `eager`: Python launches each call; `graph`: the same "
             "call captured once as a CUDA graph and replayed (lengths as a device tensor). Speed-up: MSA vs the "
             "faster dense implementation in the same mode. fp8-ik: the opt-in fp8 (e4m3) index-key cache. 3-launch: "
             "index, standalone top-k, attention (the unfused form, for what the fusion saves).", "",
             "| context | batch | mode | MSA ms | index ms | select+attend ms | 3-launch MSA ms | MSA fp8-ik ms | "
             "SDPA dense ms | "
             "Triton dense ms | speed-up vs best dense | fp8-ik speed-up | MSA tok/s | dense tok/s | MSA back-to-back ms "
             "| peak GB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"

    for r in report["records"]:
        if r.get("status") != "ok":
            lines.append(f"| {fmt_len(r['L'])} | {r['b']} | - | {r.get('status')} |" + " |" * 12)
            continue
        for mode, sfx in (("eager", ""), ("graph", "_graph")):
            if mode == "graph" and not any(k.endswith("_graph_ms") for k in r):
                continue
            lines.append(
                f"| {fmt_len(r['L'])} | {r['b']} | {mode} | {f(r, f'msa{sfx}_ms')} | {f(r, f'msa_index{sfx}_ms')} | "
                f"{f(r, f'msa_select_attend{sfx}_ms')} | {f(r, f'msa_3launch{sfx}_ms')} | {f(r, f'msa_fp8ik{sfx}_ms')} | "
                f"{f(r, f'dense_sdpa{sfx}_ms')} | "
                f"{f(r, f'dense_triton{sfx}_ms')} | {f(r, f'speedup{sfx}_vs_best_dense', '{:.1f}x')} | "
                f"{f(r, f'speedup{sfx}_fp8ik_vs_best_dense', '{:.1f}x')} | {f(r, f'msa{sfx}_tokens_per_s', '{:,.0f}')} | "
                f"{f(r, f'dense{sfx}_tokens_per_s', '{:,.0f}')} | {f(r, f'msa{sfx}_loop_ms')} | "
                f"{f(r, 'peak_mem_gb', '{:.1f}')} |")
    lines += ["", "Correctness (kernels vs the pure-PyTorch reference, same bf16 inputs):", ""]
    for c in report["correctness"]:
        lines.append(f"- L={fmt_len(c['L'])} b={c['b']}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
            if k not in ("L", "b", "trace")))
    return "\n".join(lines) + "\n"


__all__ = ["BATCHES", "CONTEXTS", "Caches", "correctness", "graphable", "markdown", "run", "sdpa_dense", "timed"]

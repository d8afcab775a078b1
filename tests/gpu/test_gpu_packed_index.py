"""The index-branch kernels with packed documents (``doc_start``) against the fp32 reference
at the paper layout (64 q / 4 KV heads, d 128, index dim 128, block 128, top-16), bf16, one
packed sequence of L tokens with a realistic document-length mix (log-normal lengths, median
about L/32, plus a run of documents shorter than a block), as in tests/gpu/test_gpu_index.py:
the kernels run on the whole sequence and on a subset of query rows (q_pos = rows, with their
doc_start), the reference on the subset in fp32.

Checked (tolerances of test_gpu_index.py): selection == ``naive.select(doc_start=...)`` up
to near-ties, subset run == full run, no block before a row's document, index LSE, sparse KL
value / gradients / entropies, and (L <= DENSE_MAX_L) the dense (warmup) index LSE and KL with
the document mask. On CUDA it also prints the selection time packed vs one document.

``MSA_GPU_PACKED_LENGTHS`` (default 8192), ``MSA_GPU_INDEX_ROWS`` (default 128)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.gpu.test_gpu_index import (DENSE_MAX_L, GRAD_TOL, KL_TOL, LSE_TOL, PAPER, TIE_TOL, TINY, check_stats,
                                      parse_length, rel)
from tests.helpers import poisoned_outputs


def packed_doc_ids(L: int, B: int, gen: torch.Generator, dev: str) -> torch.Tensor:
    """[1, L] document ids: log-normal lengths (median L/32, clipped to [1, L]); the first
    quarter is re-cut into documents shorter than a block (several boundaries per block)."""
    lens = []
    total = 0
    while total < L:
        n = int(math.exp(math.log(max(L / 32, 2)) + 1.0 * torch.randn(1, generator=gen, device=dev).item()))
        n = max(1, min(n, L - total))
        lens.append(n)
        total += n
    ids = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
    q = L // 4
    short = torch.cumsum((torch.rand(q, generator=gen, device=dev) < 4.0 / B).long(), 0)  # mean length B/4
    ids = torch.cat([short, ids[q:] + short[-1] + 1])
    return ids.view(1, L)


def check_packed(L: int, n_rows: int, seed: int, dev: str = "cuda", layout=PAPER) -> dict:
    from msa_megatron.ops import naive as R
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI

    hq, g, d, di, B, K = (layout[x] for x in ("hq", "g", "d", "di", "B", "K"))
    cfg = MSAConfig(block_size=B, topk=K, index_dim=di, num_index_heads=g)
    gen = torch.Generator(device=dev).manual_seed(seed + L)
    bf = torch.bfloat16
    mk = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(bf)  # noqa: E731
    iq, ik, q, k = mk(1, L, g, di), mk(1, L, di), mk(1, L, hq, d), mk(1, L, g, d)
    ds = R.doc_start_from_doc_ids(packed_doc_ids(L, B, gen, dev))  # [1, L]
    res = dict(L=L, docs=int(torch.unique(ds).numel()), ok=True, fails=[])

    def need(cond: bool, what: str) -> None:
        if not cond:
            res["ok"] = False
            res["fails"].append(what)

    starts = torch.unique(ds)
    edge = torch.cat([starts, (starts - 1).clamp_min(0), torch.tensor([0, L - 1], device=dev)])
    edge = edge[torch.randperm(edge.numel(), device=dev, generator=gen)[: n_rows // 3]]
    extra = torch.randperm(L, device=dev, generator=gen)[: max(0, n_rows - edge.numel())]
    rows = torch.unique(torch.cat([edge, extra]))
    rows = rows[torch.randperm(rows.numel(), device=dev, generator=gen)]
    ds_r = ds[:, rows]

    sel_full, lse_full = TI.index_select(iq, ik, cfg, doc_start=ds)
    need(bool(torch.isfinite(lse_full).all()), "full-run index_lse has NaN/inf")
    iq_s, q_s = iq[:, rows], q[:, rows]
    sel, lse, plan = TI.index_select(iq_s, ik, cfg, q_pos=rows, return_plan=True, doc_start=ds_r)
    res["sub=full %"] = 100.0 * (sel == sel_full[:, :, rows]).all(-1).float().mean().item()
    need(res["sub=full %"] == 100.0, "subset run differs from the full run")
    first = (ds_r // B).view(1, 1, -1, 1)
    need(bool(((sel < 0) | (sel >= first)).all()), "a block before the row's document was selected")

    iq32, ik32 = iq_s.float(), ik.float()
    ref = R.select(iq32, ik32, cfg, rows, doc_start=ds_r)
    same = (sel == ref).all(-1)
    res["sel exact %"] = 100.0 * same.float().mean().item()
    max_gap = 0.0
    if not bool(same.all()):
        nb = math.ceil(L / B)
        scores = R.index_block_scores(iq32, ik32, B, rows, doc_start=ds_r)

        def hot(s):
            h = torch.zeros(*s.shape[:-1], nb + 1, dtype=torch.bool, device=dev)
            return h.scatter_(-1, torch.where(s >= 0, s, nb).long(), True)[..., :nb]

        kh, rh = hot(sel), hot(ref)
        hi = scores.masked_fill(~(rh & ~kh), float("-inf")).amax(-1)
        lo = scores.masked_fill(~(kh & ~rh), float("inf")).amin(-1)
        max_gap = ((hi - lo) / scores.masked_fill(scores == float("-inf"), 0).abs().amax(-1).clamp_min(1.0))[~same].max().item()
    res["max gap"] = max_gap
    need(max_gap <= TIE_TOL, f"selection differs beyond near-ties (rel gap {max_gap:.2e})")

    ref_lse = R.selected_index_lse(iq32, ik32, sel, cfg, rows, doc_start=ds_r)
    res["lse err"] = ((lse - ref_lse).abs().max() / ref_lse.abs().max().clamp_min(1.0)).item()
    need(bool(torch.isfinite(lse).all()) and res["lse err"] <= LSE_TOL, f"index LSE error {res['lse err']:.2e}")

    _, main_lse = R.sparse_attention(q_s.float(), k.float(), k.float(), sel, B, rows, doc_start=ds_r)
    kl, d_iq, d_ik, stats = TI.sparse_kl_backward(q_s, k, iq_s, ik, sel, main_lse, lse, cfg, rows, plan=plan,
                                                  return_stats=True, doc_start=ds_r)
    iq_r, ik_r = iq32.clone().requires_grad_(), ik32.clone().requires_grad_()
    terms = R.sparse_kl_terms(q_s.float(), k.float(), iq_r, ik_r, sel, cfg, rows, doc_start=ds_r)
    (terms.kl / terms.rows).backward()
    check_stats(stats, terms, hq // g, res, need, "")
    ref_kl = (terms.kl / terms.rows).item()
    res["kl err"] = abs(kl.item() - ref_kl) / max(abs(ref_kl), 1e-6)
    res["diq err"], res["dik err"] = rel(d_iq, iq_r.grad), rel(d_ik, ik_r.grad)
    need(res["kl err"] <= KL_TOL, f"sparse KL value error {res['kl err']:.2e}")
    need(res["diq err"] <= GRAD_TOL and res["dik err"] <= GRAD_TOL,
         f"sparse KL grad errors d_iq {res['diq err']:.2e} d_ik {res['dik err']:.2e}")

    if L <= DENSE_MAX_L:
        _, dlse = R.dense_attention(q_s.float(), k.float(), k.float(), rows, doc_start=ds_r)
        dkl, dd_iq, dd_ik, dstats = TI.dense_kl_backward(q_s, k, iq_s, ik, dlse, cfg, rows, return_stats=True,
                                                         doc_start=ds_r)
        iq_r, ik_r = iq32.clone().requires_grad_(), ik32.clone().requires_grad_()
        dterms = R.dense_kl_terms(q_s.float(), k.float(), iq_r, ik_r, cfg, rows, doc_start=ds_r)
        (dterms.kl / dterms.rows).backward()
        check_stats(dstats, dterms, hq // g, res, need, "dense ")
        rdkl = (dterms.kl / dterms.rows).item()
        res["dense kl err"] = abs(dkl.item() - rdkl) / max(abs(rdkl), 1e-6)
        res["dense diq"], res["dense dik"] = rel(dd_iq, iq_r.grad), rel(dd_ik, ik_r.grad)
        need(res["dense kl err"] <= KL_TOL, f"dense KL value error {res['dense kl err']:.2e}")
        need(res["dense diq"] <= GRAD_TOL and res["dense dik"] <= GRAD_TOL,
             f"dense KL grad errors d_iq {res['dense diq']:.2e} d_ik {res['dense dik']:.2e}")

    if dev == "cuda":  # selection + index LSE time, packed vs the same tokens as one document
        def ms(fn, reps=5):
            fn()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(reps):
                fn()
            t1.record()
            torch.cuda.synchronize()
            return t0.elapsed_time(t1) / reps

        poison, TI.POISON_OUTPUTS = TI.POISON_OUTPUTS, False  # time the kernels, not the NaN fills
        try:
            res["select ms packed"] = ms(lambda: TI.index_select(iq, ik, cfg, doc_start=ds))
            res["select ms one-doc"] = ms(lambda: TI.index_select(iq, ik, cfg))
        finally:
            TI.POISON_OUTPUTS = poison
    res["rows"] = rows.numel()
    return res


GPU_LENGTHS = [parse_length(x) for x in os.environ.get("MSA_GPU_PACKED_LENGTHS", "8192").split(",")]
GPU_ROWS = int(os.environ.get("MSA_GPU_INDEX_ROWS", "128"))
SEED = int(os.environ.get("MSA_GPU_SEED", "1234"))
PARAMS = ([pytest.param(L, GPU_ROWS, "cuda", PAPER, marks=pytest.mark.gpu, id=f"gpu-paper-packed-L{L}")
           for L in GPU_LENGTHS] + [pytest.param(256, 24, "cpu", TINY, id="cpu-tiny-packed-L256")])


@pytest.mark.parametrize("L,rows,dev,layout", PARAMS)
def test_packed_index_kernels_vs_reference(L, rows, dev, layout):
    with poisoned_outputs():
        res = check_packed(L, rows, SEED, dev, layout)
    metrics = {k: v for k, v in res.items() if k not in ("fails", "ok")}
    print(f"packed index L={L}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in metrics.items()))
    assert res["ok"], f"L={L}: {'; '.join(res['fails'])} ({metrics})"

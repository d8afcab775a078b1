"""The index-branch kernels (``ops/triton_index.py``) against the fp32 reference at the paper
layout (64 q / 4 KV heads, d 128, index dim 128, block 128, top-16), bf16, batch 1: the
comparisons of the former ``scripts/gpu_check_index.py`` (that script now runs these tests).

Per length the kernels run on the whole sequence and on a random subset of query rows (q_pos =
those rows, all keys: the context-parallel path); the reference runs in fp32 on the subset.
Outputs are NaN-poisoned. Checked: selection equal to ``naive.select`` up to near-ties
(swapped blocks' scores within TIE_TOL), subset run == full run, recall of the kernel's selection
>= RECALL_MIN of the reference's, index LSE, sparse KL value / d_iq / d_ik / entropy statistics,
and (up to DENSE_MAX_L) the flash-attention main LSE and the dense-teacher KL.

Lengths: ``MSA_GPU_INDEX_LENGTHS`` (default 4096; e.g. "8K,32K,64K,128K" for the long check),
rows ``MSA_GPU_INDEX_ROWS`` (default 128). The CPU subset runs the same code on a tiny layout
under the interpreter.

Tolerances (bf16 inputs, fp32 reference on the same values): near-tie gap 2e-3 relative, index
LSE 1e-4, KL value 1e-3, d_iq / d_ik 3e-2 (dS is rounded to bf16 before the gradient dots),
entropies 1e-4 (summation order only), recall ratio >= 0.999.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.helpers import poisoned_outputs

TIE_TOL = 2e-3
LSE_TOL = 1e-4
KL_TOL = 1e-3
ENT_TOL = 1e-4
GRAD_TOL = 3e-2
RECALL_MIN = 0.999
DENSE_MAX_L = 32768

PAPER = dict(hq=64, g=4, d=128, di=128, B=128, K=16)
TINY = dict(hq=4, g=2, d=16, di=16, B=16, K=4)


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_length(L: int, n_rows: int, dense_max_L: int, seed: int, dev: str = "cuda", layout=PAPER) -> dict:
    """All comparisons at one length; returns the metrics and ``fails`` (empty when all pass)."""
    from msa_megatron.ops import naive as R
    from msa_megatron.config import MSAConfig
    from msa_megatron.ops import triton_index as TI

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



GPU_LENGTHS = [parse_length(x) for x in os.environ.get("MSA_GPU_INDEX_LENGTHS", "4096").split(",")]
GPU_ROWS = int(os.environ.get("MSA_GPU_INDEX_ROWS", "128"))
SEED = int(os.environ.get("MSA_GPU_SEED", "1234"))
PARAMS = ([pytest.param(L, GPU_ROWS, "cuda", PAPER, marks=pytest.mark.gpu, id=f"gpu-paper-L{L}") for L in GPU_LENGTHS]
          + [pytest.param(200, 24, "cpu", TINY, id="cpu-tiny-L200")])


@pytest.mark.parametrize("L,rows,dev,layout", PARAMS)
def test_index_kernels_vs_reference(L, rows, dev, layout):
    with poisoned_outputs():
        res = check_length(L, rows, DENSE_MAX_L, SEED, dev, layout)
    metrics = {k: v for k, v in res.items() if k not in ("fails", "ok")}
    print(f"index L={L}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    assert res["ok"], f"L={L}: {'; '.join(res['fails'])} ({metrics})"

"""msa-bench selection kinds, trained-artifact loading, table formatting (CPU), and the
fla-nsa peer against the reference (GPU, with fla-core installed)."""

import json
import math

import pytest
import torch

from msa_megatron.ops import naive
from msa_megatron import selection_stats as ss
from msa_megatron.bench import done_when, harness, selections
from msa_megatron.bench.registry import Case, Skip

SMALL = dict(L=2048, hq=4, hkv=2, d=16, di=16, block=16, topk=8, device="cpu")


def _valid(sel, case):
    own = torch.arange(case.L) // case.block
    assert sel.shape == (case.batch, case.hkv, case.L, case.topk) and sel.dtype == torch.int32
    assert bool(((sel.long() == own[None, None, :, None]) & (sel >= 0)).any(-1).all())
    assert bool((sel.long() <= own[None, None, :, None]).all())


def test_parse_kind():
    assert selections.parse_kind("random") == ("random", ())
    assert selections.parse_kind("pool:24") == ("pool", (24.0,))
    assert selections.parse_kind("churn:0.1,64") == ("churn", (0.1, 64.0))
    for bad in ("rand", "pool", "pool:x", "pool:0", "churn:2,5", "churn:0.1", "flex:3"):
        with pytest.raises(ValueError, match="allowed values are random, flex, trained"):
            selections.parse_kind(bad)


@pytest.mark.parametrize("kind", ["random", "flex", "pool:7", "pool:40", "churn:0.05,64"])
def test_selection_kinds_are_valid_and_ordered(kind):
    case = Case(selection=kind, **SMALL)
    sel = selections.make_selection(case)
    _valid(sel, case)
    u8 = selections.measured_u8(case, sel)
    if kind in ("flex", "pool:7"):  # tile-constant: one block set per 128 queries (8 blocks of 16)
        assert u8 <= case.topk + 1
    if kind == "random":
        assert u8 > 3 * case.topk
    assert u8 == pytest.approx(float(ss.union_sizes(sel, 8).double().mean()))


def test_trained_kind_from_artifact(tmp_path, monkeypatch):
    case = Case(selection="trained", **SMALL)
    monkeypatch.setattr(selections, "DEFAULT_ARTIFACT", tmp_path / "missing.npz")
    monkeypatch.delenv("MSA_TRAINED_SELECTION", raising=False)
    with pytest.raises(Skip, match="no trained-selection artifact"):
        selections.make_selection(case)
    sel = ss.churn_pool_selection(2048, 16, 8, ss.ChurnPool(0.1, 21), groups=2)[0]
    meta = {"seq_len": 2048, "block_size": 16, "topk": 8, "fit": {"r": 0.1, "pool": 21.0, "tile": 128}}
    ss.save_artifact(tmp_path / "sel.npz", {"layer1": sel}, meta)
    monkeypatch.setenv("MSA_TRAINED_SELECTION", str(tmp_path / "sel.npz"))
    got = selections.make_selection(case)
    _valid(got, case)
    assert "r=0.1" in selections.describe(case) and "C=21" in selections.describe(case)
    # the selection_stats.json form works too, and a different block size is refused
    (tmp_path / "s.json").write_text(json.dumps({"fit": {"params": meta["fit"]}, "block_size": 32, "topk": 8}))
    monkeypatch.setenv("MSA_TRAINED_SELECTION", str(tmp_path / "s.json"))
    with pytest.raises(Skip, match="block 32"):
        selections.make_selection(Case(selection="trained", seed=1, **SMALL))


def test_markdown_and_done_when_table():
    meta = dict(device="dev", date="d", commit="c", peak_tflops=700.0)
    case = Case(L=1 << 17, selection="trained")
    recs = [harness.empty_record("cudnn-dense", Case(L=1 << 17), meta, fwd_ms=500.0, fwdbwd_ms=1800.0),
            harness.empty_record("msa-op", case, meta, fwd_ms=80.0, fwdbwd_ms=150.0, U8=21.5,
                                 selection="trained (churn/pool r=0.1, C=24 from x)"),
            harness.empty_record("msa-op-auto", case, meta, status="skipped", reason="n/a: main_impl not available"),
            harness.empty_record("msa-op", Case(L=1 << 20, selection="trained"), meta, fwd_ms=1500.0,
                                 fwdbwd_ms=3800.0, peak_mem_gb=76.5)]
    for r, kind in zip(recs, ["-", "trained", "trained", "trained"]):
        r["sel_kind"] = kind
    md = harness.markdown(recs, dict(meta, layout="x"))
    assert "| msa-op | 128K | trained (churn/pool r=0.1, C=24 from x) | 21.5 |" in md
    header = dict(meta, layout="x", main_impl_available=False)
    t = done_when.table(recs, header)
    assert "| msa-op | trained (churn/pool r=0.1, C=24 from x) |  |  |  | 21.5 | 80.0 | 150.0 | 12.0 | 1500.0 | " \
           "3800.0 | 76.50 |" in t
    assert "| msa-op-auto | trained |" in t and "n/a" in t and "main_impl not available" in t


def test_done_when_plan_covers_the_issue_table():
    steps = done_when.plan(["random", "trained", "flex"], new_path=False)
    impls = {s[0] for s in steps}
    assert {"cudnn-dense", "flex-blocksparse", "fla-nsa", "msa-main", "msa-main-auto", "msa-op", "msa-op-auto"} <= impls
    assert ("msa-op", 1 << 20, "trained", False) in steps  # 1M fwd+bwd on trained selections
    assert all(s[2] == "flex" for s in steps if s[0] == "flex-blocksparse")
    assert {s[1] for s in steps} == {1 << 15, 1 << 17, 1 << 20}
    other = done_when.plan(["random", "trained", "flex"], new_path=False, order="128k,32k,1m")
    assert sorted(other) == sorted(steps) and other != steps  # same cells, 32K before 1M
    assert [s[1] for s in other].index(1 << 20) > max(i for i, s in enumerate(other) if s[1] == 1 << 15)
    with pytest.raises(ValueError, match="--order"):
        done_when.plan(["random"], new_path=False, order="1m")


def test_done_when_lengths_split_and_previous_merge(tmp_path):
    steps = done_when.plan(["random", "flex"], new_path=True)
    only_1m = done_when.keep_lengths(steps, "1m")
    assert only_1m and {s[1] for s in only_1m} == {1 << 20}
    rest = done_when.keep_lengths(steps, "128k, 32K")
    assert sorted(only_1m + rest) == sorted(steps)  # two calls cover the one table
    with pytest.raises(ValueError, match="--lengths"):
        done_when.keep_lengths(steps, "64k")
    rec = lambda impl, status: dict(impl=impl, L=1 << 17, sel_kind="random", status=status, reason="")
    header = dict(device="H100", date="d", commit="c", peak_tflops=600.0)
    prev = tmp_path / "done_when.json"
    prev.write_text(json.dumps(dict(header=header, records=[rec("cudnn-dense", "ok"), rec("fla-nsa", "skipped")])))
    recs, merged = done_when.merge_previous(str(prev), "H100")
    assert [r["impl"] for r in recs] == ["cudnn-dense"] and "commit c" in merged[0]  # cut cells re-measured
    with pytest.raises(ValueError, match="--previous"):
        done_when.merge_previous(str(prev), "H200")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["random", "flex", "pool:24"])
def test_fla_nsa_matches_reference_on_msa_selection(kind):
    """The peer computes the same attention as MSA's reference on the same selection
    (bf16; |out - ref| <= 2e-2 relative norm, as bf16 flash kernels)."""
    fla_nsa = pytest.importorskip("fla.ops.nsa").parallel_nsa
    case = Case(L=1000, hq=32, hkv=2, d=64, di=64, block=64, topk=4, selection=kind)
    sel = selections.make_selection(case)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, case.L, case.hq, case.d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, case.L, case.hkv, case.d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, case.L, case.hkv, case.d, device="cuda", dtype=torch.bfloat16, generator=g)
    out = fla_nsa(q, k, v, block_indices=sel.transpose(1, 2).contiguous(), block_counts=case.topk,
                  block_size=case.block, scale=case.d ** -0.5)
    ref, _ = naive.sparse_attention(q.float(), k.float(), v.float(), sel, case.block)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["random", "churn:0.1,20"])
def test_flex_union_mask_covers_the_selection_and_matches_reference(kind):
    """flex-union's block lists hold every block a query of the tile selected, and Flex's
    eager path (mask_mod everywhere) computes MSA's reference sparse attention."""
    from torch.nn.attention.flex_attention import flex_attention

    from msa_megatron.bench.impls_main import union_block_mask

    case = Case(L=300, hq=4, hkv=2, d=16, di=16, block=32, topk=3, selection=kind, device="cpu")
    sel = selections.make_selection(case)
    mask, u128 = union_block_mask(case, sel)
    kv_num, kv_idx = mask.kv_num_blocks[0], mask.kv_indices[0]  # [hq, tiles], [hq, tiles, blocks]
    G = case.hq // case.hkv
    for h in range(case.hq):
        for t in range(case.L):
            listed = set(kv_idx[h, t // case.block, : kv_num[h, t // case.block]].tolist())
            chosen = {b for b in sel[0, h // G, t].tolist() if b >= 0}
            assert chosen <= listed
    assert case.topk <= u128 <= math.ceil(case.L / case.block)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, case.L, case.hq, case.d, generator=g)
    k = torch.randn(1, case.L, case.hkv, case.d, generator=g)
    v = torch.randn(1, case.L, case.hkv, case.d, generator=g)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                         enable_gqa=True).transpose(1, 2)
    ref, _ = naive.sparse_attention(q, k, v, sel, case.block)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("impl,main_impl", [("msa-main-union", "union"), ("msa-main-auto", "auto"),
                                            ("msa-main-kv", "kv")])
def test_main_bench_fwd_goes_through_the_dispatch_point(monkeypatch, impl, main_impl):
    """The fwd column of msa-main-union / -auto timed the KV-outer forward (sparse_attention_fwd
    directly) in runs 9 and 11: the fwd must call sparse_attention, which dispatches by
    main_impl, without gradients (the prefill limit applies)."""
    from msa_megatron.bench import impls_main, registry
    from msa_megatron.ops import triton_sparse_attn as T

    calls = []

    def dispatching(q, k, v, bidx, B, config=None, **kw):
        calls.append(("dispatch", config.main_impl, q.requires_grad))
        return torch.zeros_like(q), None

    def kv_only(*a, **kw):
        calls.append(("kv-forward",))
        return None, None

    monkeypatch.setattr(impls_main, "_need_cuda", lambda case: None)
    monkeypatch.setattr(T, "sparse_attention", dispatching)
    monkeypatch.setattr(T, "sparse_attention_fwd", kv_only)
    case = Case(selection="flex", dtype=torch.float32, **SMALL)
    bench = registry.get(impl)(case)
    bench.fwd()
    assert calls == [("dispatch", main_impl, False)]

"""msa_megatron.selection_stats: union sizes, generator, fit, artifact (CPU, small sizes)."""

import math

import pytest
import torch

from msa_megatron.ops import naive
from msa_megatron.config import MSAConfig
from msa_megatron.selection_stats import (
    ChurnPool, churn_pool_selection, fit_churn_pool, generator_unions, load_artifact, random_selection, save_artifact,
    selection_overlap, tile_shared_selection, union_sizes, union_summary,
)


def _check_valid(sel: torch.Tensor, block_size: int, topk: int):
    """Ascending, distinct, causal, own block present; early queries select every visible block."""
    b, g, s, k = sel.shape
    assert k == topk and sel.dtype == torch.int32
    own = torch.arange(s) // block_size
    valid = sel >= 0
    x = sel.long()
    # valid entries first, ascending and distinct
    assert bool((valid[..., 1:] <= valid[..., :-1]).all())
    both = valid[..., 1:] & valid[..., :-1]
    assert bool((x[..., 1:][both] > x[..., :-1][both]).all())
    assert bool((x <= own[None, None, :, None]).where(valid, torch.tensor(True)).all())
    assert bool(((x == own[None, None, :, None]) & valid).any(-1).all())
    n_valid = valid.sum(-1)
    expect = torch.clamp(own + 1, max=topk)
    assert bool((n_valid == expect[None, None, :]).all())


def test_union_sizes_known_values():
    # K = 2, window 4: windows with 2, 3 and 5 distinct blocks, -1 never counted
    rows = [[0, -1], [0, -1], [0, -1], [0, -1],
            [0, 1], [1, 2], [0, 2], [0, 1],
            [3, 4], [5, 6], [4, 7], [3, -1],
            [9, 9], [9, 9]]  # partial tail window: dropped
    sel = torch.tensor(rows, dtype=torch.int32)[None, None]
    assert union_sizes(sel, 4)[0, 0].tolist() == [1, 3, 5]
    assert union_sizes(sel, 1)[0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1]
    two = torch.cat([sel, sel.flip(-1)], dim=1)  # groups are counted separately
    assert union_sizes(two, 4)[0].tolist() == [[1, 3, 5], [1, 3, 5]]
    s = union_summary(sel, windows=(4,))
    assert s["U4"]["mean"] == pytest.approx(3.0) and s["U4"]["n"] == 3 and s["groups"]["U4"] == [3.0]


def test_union_sizes_chunking_matches_direct():
    sel = random_selection(4096, 16, 8, batch=1, groups=3, seed=1)
    u = union_sizes(sel, 8)
    direct = torch.tensor([[len(set(sel[0, gi, i * 8:(i + 1) * 8].flatten().tolist()) - {-1})
                            for i in range(4096 // 8)] for gi in range(3)])
    assert torch.equal(u[0], direct)


@pytest.mark.parametrize("params", [ChurnPool(0.0, 7), ChurnPool(0.1, 20), ChurnPool(1.0, 100, tile=32)])
def test_generator_selections_are_valid(params):
    sel = churn_pool_selection(3000, 16, 8, params, batch=2, groups=2, seed=3)
    _check_valid(sel, 16, 8)
    # the same seed gives the same selection, another seed another
    assert torch.equal(sel, churn_pool_selection(3000, 16, 8, params, batch=2, groups=2, seed=3))
    assert not torch.equal(sel, churn_pool_selection(3000, 16, 8, params, batch=2, groups=2, seed=4))


def test_random_selection_valid_and_matches_reference_shape():
    sel = random_selection(1000, 16, 4, batch=1, groups=2, seed=0)
    _check_valid(sel, 16, 4)
    ref = naive.select(torch.randn(1, 1000, 2, 16), torch.randn(1, 1000, 16), MSAConfig(block_size=16, topk=4,
                                                                                           index_dim=16))
    assert (ref >= 0).sum(-1).tolist() == (sel >= 0).sum(-1).tolist()  # same number of blocks per query


def test_tile_constant_pattern_has_union_k():
    # tile = block: inside a tile the own block is fixed and the pool is the K - 1 picks
    sel = tile_shared_selection(4096, 16, 8, groups=2, tile=16)
    u = union_sizes(sel, 16)[..., 8:]  # windows past the first 8 blocks (where queries choose)
    assert bool((u == 8).all())


def test_locality_orders_unions():
    kw = dict(seq_len=4096, block_size=16, topk=8, sequences=2)
    flex = generator_unions(ChurnPool(0.0, 7), **kw)
    low = generator_unions(ChurnPool(0.05, 64), **kw)
    high = generator_unions(ChurnPool(0.5, 64), **kw)
    rand = {f"U{w}": float(union_sizes(random_selection(4096, 16, 8, groups=2), w).double().mean()) for w in (8, 32, 128)}
    for w in ("U8", "U32", "U128"):
        assert flex[w] < low[w] < high[w] < rand[w]


def test_fit_recovers_known_parameters():
    true = ChurnPool(0.1, 28.0)  # pool = 4 x (K - 1)
    kw = dict(seq_len=2048, block_size=16, topk=8)
    target = generator_unions(true, sequences=2, seed=11, **kw)
    fit = fit_churn_pool(target, sequences=2, pool_grid=(1.0, 2.0, 4.0, 16.0), bisect_steps=7, sticky_grid=(0.0,), **kw)
    assert fit["params"]["pool"] == pytest.approx(28.0)
    assert fit["params"]["r"] == pytest.approx(0.1, rel=0.3)
    assert all(abs(e) < 0.1 for e in fit["rel_err"].values()), fit


def test_selection_overlap():
    a = torch.tensor([[0, 3, 5, -1], [1, 2, 4, 6]])
    assert selection_overlap(a, a) == {"blocks": 1.0, "rows": 1.0}
    b = torch.tensor([[0, 3, 7, -1], [1, 2, 4, 6]])
    r = selection_overlap(a, b)
    assert r["blocks"] == pytest.approx(6 / 7) and r["rows"] == 0.5
    with pytest.raises(ValueError, match="shape"):
        selection_overlap(a, b[:1])


def test_artifact_roundtrip(tmp_path):
    sels = {"layer1": churn_pool_selection(2048, 16, 8, ChurnPool(0.1, 20), groups=2)[0],
            "layer3": random_selection(2048, 16, 8, groups=2)[0]}
    size = save_artifact(tmp_path / "a.npz", sels, {"seq_len": 2048, "fit": {"r": 0.1}})
    assert size == (tmp_path / "a.npz").stat().st_size and size < 2048 * 2 * 8 * 2 * 2  # compressed
    got, meta = load_artifact(tmp_path / "a.npz")
    assert meta["seq_len"] == 2048 and meta["fit"] == {"r": 0.1} and meta["names"] == ["layer1", "layer3"]
    for k in sels:
        assert torch.equal(got[k], sels[k].to(torch.int32))
    with pytest.raises(ValueError, match="int16"):
        save_artifact(tmp_path / "b.npz", {"x": torch.tensor([[40000]])}, {})


def test_bad_arguments():
    with pytest.raises(ValueError, match="r="):
        ChurnPool(1.5, 10)
    with pytest.raises(ValueError, match="window"):
        union_sizes(torch.zeros(1, 1, 4, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"\[b, g, s, K\]"):
        union_sizes(torch.zeros(4, 2, dtype=torch.int32), 2)
    assert math.isnan(union_summary(torch.zeros(1, 1, 3, 2, dtype=torch.int32), windows=(8,))["U8"]["mean"])


@pytest.mark.slow
def test_script_end_to_end_on_a_tiny_trained_run(tmp_path):
    """scripts/selection_stats.py on a 3-step tiny msa-train run (CPU, reference backend):
    JSON, markdown and artifact written, statistics and fit present, artifact loadable."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env.pop("TRITON_INTERPRET", None)
    run = tmp_path / "run"
    train = [sys.executable, "-m", "msa_megatron.train", "model=tiny", "train.steps=3", "train.seq_length=128",
             "train.global_batch_size=2", "train.micro_batch_size=2", "train.eval_interval=0",
             "attention.warmup.steps=1", "checkpoint.interval=0", "logging.wandb.enabled=false", f"run_dir={run}"]
    r = subprocess.run(train, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/selection_stats.py", "--run-dir", str(run), "--out", str(out), "--lengths",
           "256,512", "--fit-sequences", "2", "--recall-queries", "32"]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "selection_stats.json").read_text())
    assert set(res["unions"]) == {"256", "512"} and res["block_size"] == 16 and res["topk"] == 4
    for block in res["unions"].values():
        assert set(block["layers"]) == {"1", "2", "3"}  # the MSA layers of model=tiny
        u = block["all_layers"]
        assert 1 <= u["U8"]["mean"] <= u["U32"]["mean"] <= u["U128"]["mean"]
    assert 0 <= res["fit"]["params"]["r"] <= 1 and len(res["validation"]) == 2
    probe = res["probes"]["256"]["1"]
    assert 0.5 < probe["fp8_block_agreement"] <= 1 and 0 < probe["recall_bf16"] <= 1
    sels, meta = load_artifact(out / res["artifact"]["path"])
    assert set(sels) == {"layer1", "layer3"} and meta["fit"] == res["fit"]["params"]
    assert sels["layer1"].shape == (2, 256, 4)
    assert (out / "selection_stats.md").read_text().startswith("# MSA selection statistics")


def test_sticky_slots_lower_unions_and_are_recovered():
    kw = dict(seq_len=2048, block_size=16, topk=8)
    free = generator_unions(ChurnPool(0.3, 28.0), sequences=2, **kw)
    half = generator_unions(ChurnPool(0.3, 28.0, sticky=0.5), sequences=2, **kw)
    assert all(half[k] < free[k] for k in free)
    sel = churn_pool_selection(2048, 16, 8, ChurnPool(0.3, 28.0, sticky=1.0), groups=2)
    _check_valid(sel, 16, 8)
    assert bool((union_sizes(sel, 16)[..., 8:] <= 8 + 1).all())  # all-sticky: tile-constant picks
    target = generator_unions(ChurnPool(0.3, 28.0, sticky=0.5), sequences=2, seed=11, **kw)
    fit = fit_churn_pool(target, sequences=2, pool_grid=(4.0,), sticky_grid=(0.0, 0.5), bisect_steps=7, **kw)
    assert fit["params"]["sticky"] == 0.5 and all(abs(e) < 0.1 for e in fit["rel_err"].values()), fit

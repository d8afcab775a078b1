"""Issue 19 on the CPU: the scale presets compose and validate, the distance-bucketed recall
task, piecewise collection of a partial matrix, the piece driver (budget, SIGTERM, resume) and
its dry run."""

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msa_megatron.experiments.assoc_recall import (AssocRecallSpec, bucket_counts, make_example,
                                                   make_example_with_distance)
from msa_megatron.experiments.fidelity.scale import (SCALE_PRESETS, estimate_s, parse_name, run_names, spec,
                                                     tokens_per_run)

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- presets
def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from msa_megatron.train import CONFIG_DIR
    from msa_megatron.training.config import load_config, validate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    raw.pop("hydra", None)
    return validate(load_config(raw), 1)


def _params(m) -> int:
    """Transformer parameters of a dense-MLP GPT (no embeddings, no norms, no index branch)."""
    d, h = m.hidden_size, m.num_attention_heads * m.kv_channels
    kv = 2 * m.num_query_groups * m.kv_channels * d
    mlp = (3 if m.swiglu else 2) * d * m.ffn_hidden_size
    return m.num_layers * (d * h + kv + h * d + mlp)


@pytest.mark.parametrize("preset", ["scale", "scale_cpu"])
def test_scale_matrix_composes_and_validates(preset, tmp_path):
    p = SCALE_PRESETS[preset]
    names = run_names(p)
    assert len(names) == len(set(names)) == 16
    for v in ("dense", "msa", "swa"):
        assert {parse_name(n)[2] for n in names if parse_name(n)[:2] == ("8k", v)} == {1, 2, 3}
    assert {parse_name(n)[1] for n in names if parse_name(n)[0] == "32k"} == {"dense", "msa"}
    (tmp_path / "runs" / "c8k_dense_s1" / "checkpoints").mkdir(parents=True)
    cfgs = {n: _compose(spec(p, n, str(tmp_path)).overrides) for n in names}
    same = lambda c: (c.model, c.train.seq_length, c.tokens_per_step(), c.total_steps(), c.data)  # noqa: E731
    for ctx in ("8k", "32k"):
        base = cfgs[f"c{ctx}_dense_s1"]
        for n in names:
            c, v, seed = parse_name(n)
            if c == ctx and v not in ("dense_to_msa", "dense_continued"):
                assert same(cfgs[n]) == same(base), n  # identical model, data, tokens
                assert cfgs[n].train.seed == seed
    m, s = cfgs["c8k_msa_s1"], cfgs["c8k_swa_s1"]
    assert m.attention.warmup.steps > 0 and cfgs["c8k_msa_no_warmup_s1"].attention.warmup.steps == 0
    assert cfgs["c8k_msa_no_stopgrad_s1"].msa.index_stop_gradient is False and m.msa.index_stop_gradient
    assert cfgs["c8k_msa_no_teacher_s1"].attention.freeze_indexer and not m.attention.freeze_indexer
    conv = cfgs["c8k_dense_to_msa_s1"]
    assert conv.checkpoint.init_from.endswith("runs/c8k_dense_s1/checkpoints") and conv.attention.type == "msa"
    assert spec(p, "c8k_dense_to_msa_s1", str(tmp_path)).depends_on == "c8k_dense_s1"
    # its reference: the same checkpoint continued dense for the same steps, schedule and evaluations
    ref = cfgs["c8k_dense_continued_s1"]
    assert spec(p, "c8k_dense_continued_s1", str(tmp_path)).depends_on == "c8k_dense_s1"
    assert ref.attention.type == "dense" and ref.checkpoint.init_from == conv.checkpoint.init_from
    assert (same(ref), ref.train.lr, ref.train.min_lr, ref.train.lr_decay_style, ref.train.eval_interval) == \
        (same(conv), conv.train.lr, conv.train.min_lr, conv.train.lr_decay_style, conv.train.eval_interval)
    assert conv.train.eval_interval == (p.convert_eval_interval or conv.train.eval_interval)
    assert conv.total_steps() % conv.train.eval_interval == 0
    # the recall buckets straddle the FLOP-matched window: some distances inside it, some beyond
    for ctx in ("8k", "32k"):
        c = cfgs[f"c{ctx}_msa_s1"]
        edges = list(c.data.assoc_recall.distance_buckets)
        dense = spec(p, f"c{ctx}_dense_s1", str(tmp_path)).overrides
        w = _compose([o for o in dense if o != "attention=dense"] + ["attention=swa"]).swa_window()
        assert edges[1] <= w < edges[-2], (ctx, edges, w)
        assert c.msa.topk * c.msa.block_size <= c.train.seq_length // 4
    if preset == "scale":
        assert _params(m.model) >= 50_000_000
        assert (m.train.seq_length, m.msa.block_size, m.msa.topk, m.train.precision) == (8192, 128, 16, "bf16")
        assert cfgs["c32k_msa_s1"].train.seq_length == 32768
        assert tokens_per_run(p, "8k") >= 50_000_000 and tokens_per_run(p, "32k") >= 50_000_000
        assert estimate_s(p, "c8k_msa_s1") < 600  # one call per 8K run (planning estimate)
        assert 2048 < s.swa_window() < 8192 // 2


def test_run_names_errors():
    assert parse_name("c8k_msa_no_stopgrad_s1") == ("8k", "msa_no_stopgrad", 1)
    for bad in ("c8k_msa", "8k_msa_s1", "c8k_foo_s1", "c8k_msa_sx"):
        with pytest.raises(ValueError, match="allowed values"):
            parse_name(bad)
    with pytest.raises(ValueError, match="context '64k'"):
        spec(SCALE_PRESETS["scale_cpu"], "c64k_msa_s1", "/tmp/x")


# --------------------------------------------------------------------------- distance task
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distance_layout(seed):
    sp = AssocRecallSpec(seq_len=1025, num_pairs=12, num_queries=8, distance_buckets=(16, 100, 300, 600, 993))
    toks, mask, dist = make_example_with_distance(sp, torch.Generator().manual_seed(seed))
    assert toks.shape == mask.shape == dist.shape == (1025,)
    q = mask.nonzero().flatten()
    assert q.tolist() == list(range(1025 - 16, 1025, 2))
    d = dist[q]
    assert ((d >= 16) & (d < 993)).all() and (dist[~mask] == 0).all()
    # every bucket is asked (queries cycle through the 4 buckets)
    assert sorted({int(torch.bucketize(x, torch.tensor([100, 300, 600]), right=True)) for x in d}) == [0, 1, 2, 3]
    for pos, dd in zip(q.tolist(), d.tolist()):
        k = pos - dd  # the planted pair: same key, then the value the query must predict
        assert toks[k] == toks[pos] and toks[k + 1] == toks[pos + 1]
        assert 160 <= toks[k] < 208 and 208 <= toks[k + 1] < 256
    keys = toks[(toks >= 160) & (toks < 208)]
    assert keys.numel() == 12 + 8  # 12 planted pairs (no overlap) + 8 queries
    assert (toks[(toks < 160)] >= 0).all()


def test_distance_layout_places_every_pair_when_the_buckets_are_tight():
    # 8 pairs in 65 tokens, narrow buckets: a valid spec whose rejection sampler (1,000 random
    # draws) failed for some examples (the 2,741st of this seed); the placement now draws among
    # the free slots
    sp = AssocRecallSpec(seq_len=65, num_pairs=8, num_queries=8, distance_buckets=(16, 32, 49))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        toks, mask, dist = make_example_with_distance(sp, gen)
        for pos in mask.nonzero().flatten().tolist():
            k = pos - int(dist[pos])
            assert 16 <= dist[pos] < 49 and toks[k] == toks[pos] and toks[k + 1] == toks[pos + 1]


def test_classic_layout_unchanged_and_distance():
    sp = AssocRecallSpec(seq_len=257, num_pairs=8, num_queries=4)
    t1, m1 = make_example(sp, torch.Generator().manual_seed(5))
    t2, m2, d2 = make_example_with_distance(sp, torch.Generator().manual_seed(5))
    assert torch.equal(t1, t2) and torch.equal(m1, m2)
    for pos in m2.nonzero().flatten().tolist():
        assert t2[pos - d2[pos]] == t2[pos] and t2[pos - d2[pos] + 1] == t2[pos + 1]


@pytest.mark.parametrize("kw, field", [
    ({"distance_buckets": (16,)}, "distance_buckets"),
    ({"distance_buckets": (16, 16, 40)}, "distance_buckets"),
    ({"distance_buckets": (4, 40)}, "2\\*num_queries"),
    ({"distance_buckets": (16, 1020)}, "seq_len - 2\\*num_queries"),
    ({"distance_buckets": (16, 100), "num_pairs": 48, "num_queries": 8}, "num_pairs"),
])
def test_distance_spec_errors(kw, field):
    base = dict(seq_len=193 if kw.get("num_pairs") == 48 else 1025, num_pairs=12, num_queries=8)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        AssocRecallSpec(**base).validate()


def test_bucket_counts_oracle_and_window():
    sp = AssocRecallSpec(seq_len=513, num_pairs=8, num_queries=8, distance_buckets=(16, 128, 256, 497))
    g = torch.Generator().manual_seed(0)
    ex = [make_example_with_distance(sp, g) for _ in range(6)]
    toks, mask, dist = (torch.stack(x) for x in zip(*ex))
    oracle = torch.nn.functional.one_hot(torch.roll(toks, -1, 1), 256).float()
    c = bucket_counts(oracle, toks, mask, dist, sp.distance_buckets)
    assert list(c) == ["d16_128", "d128_256", "d256_497"]
    assert sum(n for _, n in c.values()) == 48 and all(k == n and n > 0 for k, n in c.values())
    # a "window" model: right only where the pair is within 128 tokens, wrong beyond
    wrong = torch.roll(toks, -1, 1).clone()
    wrong[mask & (dist >= 128)] = 0
    c = bucket_counts(torch.nn.functional.one_hot(wrong, 256).float(), toks, mask, dist, sp.distance_buckets)
    assert c["d16_128"][0] == c["d16_128"][1] and c["d128_256"][0] == 0 and c["d256_497"][0] == 0
    with pytest.raises(ValueError, match="shapes disagree"):
        bucket_counts(oracle, toks, mask, dist[:, :-1], sp.distance_buckets)


def test_eval_batches_with_distance_and_model_buckets():
    from msa_megatron.training.assoc_recall_task import eval_batches, assoc_recall_accuracy_of_model

    sp = AssocRecallSpec(seq_len=256, num_pairs=4, num_queries=4, distance_buckets=(8, 64, 128, 248))
    batches = eval_batches(sp, 2, micro_batch=3, seed=0)
    assert len(batches[0]) == 3 and batches[0][2].shape == (3, 256)

    class Oracle(torch.nn.Module):
        def forward(self, tokens, pos, mask):
            return torch.nn.functional.one_hot(torch.roll(tokens, -1, 1), 320).float()

    mean, per = assoc_recall_accuracy_of_model(Oracle(), batches, "cpu", 257, sp.distance_buckets)
    assert mean == 1.0 and set(per) == {"d8_64", "d64_128", "d128_248"} and all(v == 1.0 for v in per.values())


# --------------------------------------------------------------------------- piecewise collection
def _fake_run(root: Path, name: str, val_loss: float, buckets: dict, complete=True, steps=4, recall=None,
              passkey=None):
    d = root / name
    d.mkdir(parents=True)
    recs = []
    for s in range(1, steps + 1):
        r = {"step": s, "lm_loss": val_loss + 1 / s, "tokens": s * 1000, "grad_norm": 1.0}
        if s % 2 == 0:
            r.update(val_lm_loss=val_loss + 0.5 / s)
            if buckets:  # a run that scores the recall task
                r.update(val_assoc_recall_acc=sum(buckets.values()) / len(buckets),
                         **{f"val_assoc_recall_acc/{k}": v for k, v in buckets.items()})
            if passkey is not None:
                r.update(val_passkey_acc=sum(passkey.values()) / len(passkey),
                         **{f"val_passkey_acc/{k}": v for k, v in passkey.items()})
        if recall is not None:
            r.update(recall=recall, attention_mode="msa")
            if s % 2 == 0:  # held-out selection recall at each evaluation, the last one a bit higher
                r.update(**{"val/recall": recall + 0.01 * s / steps, "val/recall/layer_1": recall - 0.02,
                            "val/recall/layer_2": recall + 0.02})
        recs.append(r)
    last = steps if complete else steps // 2
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:last]) + "\n")
    (d / "run.json").write_text(json.dumps({"name": name, "complete": complete, "step": last, "total_steps": steps,
                                            "tokens": last * 1000, "wall_s": 12.5, "devices": ["1 x H100"],
                                            "commits": ["abc123"]}))


def test_partial_matrix_reports_what_is_missing(tmp_path):
    from msa_megatron.experiments.fidelity.scale_report import BEGIN, END, claims, collect_scale, groups, scale_block, write_doc

    p = SCALE_PRESETS["scale_cpu"]
    near, far = {"d8_64": 1.0, "d64_120": 0.9}, {"d120_160": 0.8, "d160_248": 0.7}
    for seed, dl, ml in ((1, 2.00, 2.00), (2, 2.02, 2.02), (3, 2.01, 2.02)):
        _fake_run(tmp_path, f"c8k_dense_s{seed}", dl, {**near, **far})
        _fake_run(tmp_path, f"c8k_msa_s{seed}", ml, {**near, **far}, recall=0.97)
    _fake_run(tmp_path, "c8k_swa_s1", 2.10, {**near, "d120_160": 0.02, "d160_248": 0.0})
    _fake_run(tmp_path, "c8k_swa_s2", 2.12, {**near, "d120_160": 0.03, "d160_248": 0.01}, complete=False)
    col = collect_scale([tmp_path], p)
    assert set(col["runs"]) == {f"c8k_{v}_s{s}" for v in ("dense", "msa") for s in (1, 2, 3)} | {"c8k_swa_s1"}
    assert col["unfinished"] == {"c8k_swa_s2": "2/4"}
    assert "c8k_swa_s3" in col["missing"] and "c32k_msa_s1" in col["missing"] and "c8k_swa_s2" not in col["missing"]
    g = groups(col)
    d = g[("8k", "dense")]["val_loss"]
    assert d["n"] == 3 and abs(d["mean"] - (2.00 + 2.02 + 2.01 + 3 * 0.125) / 3) < 1e-9 and d["std"] > 0
    assert g[("8k", "swa")]["val_loss"]["std"] is None  # one seed: no spread
    text = "\n".join(claims(g, col))
    assert "within 1% of dense at 8K: **confirmed**" in text  # 3 seeds each: +0.00/+0.00/+0.47%, upper bound +0.61%
    assert "beyond the seed spread at 8K: **indicated (fewer than 3 seeds)**" in text  # the window has 1 seed
    assert "Retrieval at 8k, associative recall (trained on), MSA within 5 points" in text
    assert "(d120_160, d160_248): **confirmed** (largest gap 0.0 points" in text
    assert "Retrieval at 8k, passkey copy probe (scored, never trained on), MSA within 5 points of dense: " \
           "**not measured** (runs missing or without this probe)" in text
    assert "Retrieval at 32k" in text and "not measured" in text
    assert "selection recall >= 95% at k=16 at 8k (MSA runs, held-out, last evaluation): **confirmed** (98.0% ± 0.0% " \
           "(n=3); `c8k_msa_s1` 98.0%; `c8k_msa_s2` 98.0%; `c8k_msa_s3` 98.0%; per layer layer 1 95.0%, layer 2 99.0%; " \
           "mean over the sparse training steps 97.0%" in text
    block = scale_block(col, "scale_cpu", "fidelity")
    assert "`c8k_swa_s2` (unfinished, step 2/4)" in block and "`c32k_dense_s1`" in block and "1 x H100" in block
    doc = tmp_path / "doc.md"
    doc.write_text("# keep me\n")
    write_doc(block, doc)
    write_doc(block.replace("keep", "x"), doc)  # a second report replaces the block only
    t = doc.read_text()
    assert t.startswith("# keep me") and t.count(BEGIN) == 1 and t.count(END) == 1


def test_scale_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from msa_megatron.experiments.fidelity.scale_report import scale_report

    _fake_run(tmp_path / "res", "c8k_dense_s1", 2.0, {"d8_64": 1.0, "d160_248": 0.8})
    _fake_run(tmp_path / "res", "c8k_swa_s1", 2.1, {"d8_64": 1.0, "d160_248": 0.0})
    out = scale_report([tmp_path / "res"], SCALE_PRESETS["scale_cpu"], "scale_cpu", tmp_path / "doc.md",
                       tmp_path / "plots")
    assert {p.name for p in out["written"]} == {"scale_loss.png", "scale_accuracy_vs_distance.png"}
    assert all(p.stat().st_size > 1000 for p in out["written"])
    assert "MSA held-out loss within 1% of dense at 8K: **not measured**" in (tmp_path / "doc.md").read_text()


def test_a_continuation_is_drawn_after_the_dense_run_it_continues(tmp_path):
    """The conversion and dense-continued curves count tokens from 0 but start at the end of
    their seed's dense run (run 16's plot drew the conversion over the dense run's start)."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, curve_tokens

    _fake_run(tmp_path, "c8k_dense_s1", 2.0, {})
    _fake_run(tmp_path, "c8k_dense_to_msa_s1", 2.1, {}, recall=0.9)
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    dense_end = col["runs"]["c8k_dense_s1"]["final"]["tokens"]
    assert dense_end == 4000  # the fake: 1,000 tokens per step, 4 steps, evaluations at steps 2 and 4
    assert curve_tokens(col, "c8k_dense_s1") == [2000, 4000]
    assert curve_tokens(col, "c8k_dense_to_msa_s1") == [dense_end + 2000, dense_end + 4000]


# --------------------------------------------------------------------------- the piece driver
_FAKE_TRAINER = r"""#!/usr/bin/env python3
# Stands in for `python -m msa_megatron.train`: one step per 0.2 s, appends metrics; on
# SIGTERM finishes the step, writes a checkpoint marker and exits 0 (as the trainer does: at a
# step boundary, so the checkpoint and the metrics agree); resumes from it.
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
rd, steps = args["run_dir"], int(args["train.steps"])
os.makedirs(rd + "/checkpoints", exist_ok=True)
latest = rd + "/checkpoints/latest"
start = int(open(latest).read()) if os.path.exists(latest) else 0
term = []
signal.signal(signal.SIGTERM, lambda *_: term.append(1))
with open(rd + "/metrics.jsonl", "a") as f:
    for s in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.2")))
        f.write(json.dumps({"step": s, "lm_loss": 1.0, "tokens": s}) + "\n"); f.flush()
        if term and s < steps:
            open(latest, "w").write(str(s)); sys.exit(0)
open(latest, "w").write(str(steps))
"""


def test_piece_budget_sigterm_resume_and_pack(tmp_path, monkeypatch):
    import dataclasses
    import tarfile

    from msa_megatron.experiments.fidelity import piece

    fake = tmp_path / "fakepy"
    fake.write_text(_FAKE_TRAINER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p = dataclasses.replace(SCALE_PRESETS["scale_cpu"], steps=20, convert_steps=3, startup_s=0.1,
                            entries=(("8k", "dense", (1,)), ("8k", "msa", (1,)), ("8k", "dense_to_msa", (1,))))
    work, done = tmp_path / "work", tmp_path / "done"
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    # 20 steps x 0.2 s = 4 s per run: a 2.5 s slice stops the first run midway (SIGTERM), resumable
    r = piece.run_piece(p, work, 2.5, [done], str(fake), REPO, "cpu", "c0ffee", grace_s=0.0, min_slice_s=0.5,
                        log=lambda m: None)
    assert r["ran"] == ["c8k_dense_s1"] and r["status"]["c8k_dense_s1"] == "partial"
    info = json.loads((work / "runs" / "c8k_dense_s1" / "run.json").read_text())
    assert not info["complete"] and info["segments"][0]["stopped"] and 0 < info["step"] < 20
    # next call on the same machine: the partial run resumes first and finishes, then the others
    r = piece.run_piece(p, work, 30, [done], str(fake), REPO, "cpu", "c0ffee", grace_s=0.0, min_slice_s=0.5,
                        log=lambda m: None)
    assert r["ran"] == ["c8k_dense_s1", "c8k_msa_s1", "c8k_dense_to_msa_s1"]
    assert set(r["status"].values()) == {"complete"}
    info = json.loads((work / "runs" / "c8k_dense_s1" / "run.json").read_text())
    assert info["complete"] and len(info["segments"]) == 2 and info["step"] == 20
    assert info["segments"][1]["from_step"] == info["segments"][0]["to_step"]
    steps = [json.loads(ln)["step"] for ln in (work / "runs" / "c8k_dense_s1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the curve continues, no step twice
    tar = piece.pack(work, r["ran"], tmp_path / "out" / "piece.tar.gz", {"ran": r["ran"]})
    with tarfile.open(tar) as t:
        names = set(t.getnames())
        t.extractall(done)
    assert "c8k_msa_s1/run.json" in names and "piece.json" in names and not any("checkpoints" in n for n in names)
    # a fresh machine with the results copied back: nothing left to do
    assert piece.todo(p, tmp_path / "fresh", [done]) == []
    # ... unless asked to run some again (e.g. to score a new probe): once they complete in the
    # work directory they count as complete again
    assert piece.todo(p, tmp_path / "fresh", [done], rerun=["c8k_msa_s1"]) == ["c8k_msa_s1"]
    assert piece.matrix_status(p, work, [done], rerun=["c8k_msa_s1"])["c8k_msa_s1"] == "complete"
    # ... except the conversion, if its result were lost: then its dense run comes again first
    import shutil

    shutil.rmtree(done / "c8k_dense_to_msa_s1")
    assert piece.todo(p, tmp_path / "fresh", [done]) == ["c8k_dense_s1", "c8k_dense_to_msa_s1"]


def test_driver_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable, WORK=str(tmp_path / "w"),
               DONE=str(tmp_path / "none"), BUDGET_S="480")
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_fidelity_piece.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "8k: 50.3M tokens per run" in out and "32k: 50.3M tokens per run" in out
    assert "this call: c8k_dense_s1" in out and "a later call: c32k_msa_s1" in out
    assert (tmp_path / "out" / "piece.log").is_file() and not list((tmp_path / "out").glob("*.tar.gz"))
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").rglob("metrics.jsonl"))


def test_retrieval_claim_needs_dense_to_solve_the_task(tmp_path):
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, groups

    chance = {"d8_64": 0.02, "d160_248": 0.0}
    _fake_run(tmp_path, "c8k_dense_s1", 2.0, chance)
    _fake_run(tmp_path, "c8k_msa_s1", 2.0, chance)
    _fake_run(tmp_path, "c8k_swa_s1", 2.0, chance)
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    text = "\n".join(claims(groups(col), col))
    assert "Retrieval at 8k, associative recall (trained on): **not measured**: dense did not solve it" in text
    assert "met, but with fewer than 3 seeds" in text


def test_claims_pair_each_seed_with_its_own_dense_run(tmp_path):
    """Seeds shift every arm's held-out loss together (data order, scored samples): the claims
    compare MSA with dense and the window *of the same seed*. Unpaired, these numbers would
    neither confirm the window claim (spreads of ~0.15 swamp a 0.04 gap) nor, with MSA's seed 1
    alone against dense's mean of three, judge the dense claim fairly."""
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, groups, paired, scale_block

    buckets = {"d8_64": 0.02}
    for seed, dl, ml, wl in ((1, 1.20, 1.205, 1.25), (2, 1.50, 1.505, 1.56), (3, 1.40, 1.405, 1.46)):
        _fake_run(tmp_path, f"c8k_dense_s{seed}", dl, buckets)
        _fake_run(tmp_path, f"c8k_msa_s{seed}", ml, buckets, recall=0.9)
        _fake_run(tmp_path, f"c8k_swa_s{seed}", wl, buckets)
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    # final held-out loss = value + 0.5 / steps (4): every arm shifted alike
    vs = paired(col, "8k", "msa", "dense")
    want = [(m + 0.125) / (d + 0.125) - 1 for d, m in ((1.20, 1.205), (1.50, 1.505), (1.40, 1.405))]
    assert vs["seeds"] == [1, 2, 3] and vs["n"] == 3 and abs(vs["mean"] - sum(want) / 3) < 1e-12
    text = "\n".join(claims(groups(col), col))
    assert "within 1% of dense at 8K: **confirmed**" in text and "seeds [1, 2, 3]" in text
    assert "beyond the seed spread at 8K: **confirmed**" in text
    assert f"| {100 * sum(want) / 3:+.2f}% ± " in scale_block(col, "scale_cpu", "fidelity")  # MSA's paired column

    # MSA's seed 1 only: paired with dense seed 1, not with dense's mean over three seeds
    for seed in (2, 3):
        for f in (tmp_path / f"c8k_msa_s{seed}").iterdir():
            f.unlink()
        (tmp_path / f"c8k_msa_s{seed}").rmdir()
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    vs = paired(col, "8k", "msa", "dense")
    assert vs["seeds"] == [1] and vs["std"] is None
    text = "\n".join(claims(groups(col), col))
    assert "within 1% of dense at 8K: **met, but with fewer than 3 seeds**" in text and "+0.38%" in text
    assert "beyond the seed spread at 8K: **indicated (fewer than 3 seeds)**" in text


@pytest.mark.parametrize("preset", ["scale", "scale_cpu"])
def test_scale_runs_score_the_passkey_probe_around_the_window(preset, tmp_path):
    """Every run of the matrix scores the passkey probe (not trained on it), with buckets on
    both sides of the FLOP-matched window, and the probe fits each context."""
    p = SCALE_PRESETS[preset]
    for ctx in ("8k", "32k"):
        c = _compose(spec(p, f"c{ctx}_msa_s1", str(tmp_path)).overrides)
        k = c.data.passkey
        assert k.eval_batches == p.passkey_eval_batches > 0 and c.data.assoc_recall.train_fraction > 0
        c.passkey_spec().validate()
        dense = spec(p, f"c{ctx}_dense_s1", str(tmp_path)).overrides
        w = _compose([o for o in dense if o != "attention=dense"] + ["attention=swa"]).swa_window()
        assert k.distance_buckets[1] <= w < k.distance_buckets[-2], (ctx, k.distance_buckets, w)


def test_passkey_probe_reported_per_distance_from_the_runs_that_scored_it(tmp_path):
    """The passkey probe's table, plot and claim use the runs that logged it; runs from before the
    probe (no val_passkey_acc) still count for the loss and the recall task."""
    pytest.importorskip("matplotlib")
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, groups, scale_block, scale_report

    chance = {"d8_64": 0.02, "d160_248": 0.0}
    near_far = {"d50_100": 0.95, "d100_206": 0.9}
    _fake_run(tmp_path, "c8k_dense_s1", 2.0, chance)  # before the probe
    _fake_run(tmp_path, "c8k_dense_s2", 2.0, chance, passkey=near_far)
    _fake_run(tmp_path, "c8k_msa_s2", 2.01, chance, passkey={"d50_100": 0.94, "d100_206": 0.6}, recall=0.9)
    _fake_run(tmp_path, "c8k_swa_s2", 2.02, chance, passkey={"d50_100": 0.95, "d100_206": 0.07})
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    g = groups(col)
    assert g[("8k", "dense")]["val_loss"]["n"] == 2 and g[("8k", "dense")]["passkey_buckets"]["d50_100"]["n"] == 1
    text = "\n".join(claims(g, col))
    assert "Retrieval at 8k, passkey copy probe (scored, never trained on), MSA within 5 points of dense in buckets " \
           "where the window is near chance (d100_206): **not confirmed** (largest gap 30.0 points" in text
    assert "associative recall (trained on): **not measured**: dense did not solve it" in text
    block = scale_block(col, "scale_cpu", "fidelity")
    assert "Accuracy vs distance at 8k, passkey copy probe" in block and "| dense | 1 | 95.0% | 90.0% |" in block
    out = scale_report([tmp_path], SCALE_PRESETS["scale_cpu"], "scale_cpu", tmp_path / "doc.md", tmp_path / "plots")
    assert any(p.name == "scale_accuracy_vs_distance.png" and p.stat().st_size > 1000 for p in out["written"])


def test_overrides_prints_a_runs_trainer_arguments_for_one_off_variants(tmp_path):
    """`--overrides RUN`: one shell-quoted line that splits back into exactly the run's overrides
    (a one-off variant appends its own, later ones winning in Hydra); a bad name is one error."""
    import shlex

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--overrides", "c8k_msa_s2",
                        "--scale-preset", "scale_cpu", "--work", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == spec(SCALE_PRESETS["scale_cpu"], "c8k_msa_s2", str(tmp_path)).overrides
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--overrides", "c8k_msa_s9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--overrides 'c8k_msa_s9' is invalid: allowed values are" in bad.stderr


# --------------------------------------------------------------------------- the retrieval curriculum
@pytest.mark.parametrize("preset", ["retrieval", "retrieval_cpu"])
def test_retrieval_curriculum_runs_start_from_their_base(preset, tmp_path):
    """Every run beyond the base context starts from the same seed's dense run one link down the
    curriculum (the short base, or for the longest context the dense run below it): weights only,
    MSA's index branch from its q/k; all train on the passkey task. The base is a dense copier
    on short sequences full of examples; the arms of one context differ only in attention."""
    from msa_megatron.experiments.fidelity.scale import base_of, steps_of

    p = SCALE_PRESETS[preset]
    names = run_names(p)
    base = run_name_of(p.base_context, "dense", 1)
    assert names[0] == base and base_of(p, base) is None
    for n in names:
        (tmp_path / "runs" / n / "checkpoints").mkdir(parents=True)
    cfgs = {n: _compose(spec(p, n, str(tmp_path)).overrides) for n in names}
    b = cfgs[base]
    assert b.attention.type == "dense" and b.checkpoint.init_from is None and b.data.passkey.train_fraction == 1.0
    assert b.model.rotary_percent == 1.0 and b.train.steps == steps_of(p, p.base_context)
    long_ctx = sorted({parse_name(n)[0] for n in names} - {p.base_context}, key=lambda c: cfgs[
        run_name_of(c, "dense", 1)].train.seq_length)
    assert len(long_ctx) == 2
    # the chain: the shorter long context starts from the base, the longer from its dense run
    assert base_of(p, run_name_of(long_ctx[0], "msa", 1)) == base
    assert base_of(p, run_name_of(long_ctx[1], "msa", 1)) == run_name_of(long_ctx[0], "dense", 1)
    for ctx in long_ctx:
        arms = {parse_name(n)[1]: cfgs[n] for n in names if parse_name(n)[0] == ctx}
        assert {"dense", "swa", "msa"} <= set(arms)
        for v, c in arms.items():
            s = spec(p, run_name_of(ctx, v, 1), str(tmp_path))
            assert s.depends_on == base_of(p, s.name)
            assert c.checkpoint.init_from == f"{tmp_path}/runs/{s.depends_on}/checkpoints"
            assert c.checkpoint.index_init == "mean" and c.model.rotary_percent == 1.0
            assert 0 < c.data.passkey.train_fraction < 1 and c.data.passkey.answer_loss_weight == p.passkey_answer_weight
            assert c.data.assoc_recall.train_fraction == 0
            d = arms["dense"]
            assert (c.model, c.train.seq_length, c.tokens_per_step(), c.total_steps(), c.data) == \
                (d.model, d.train.seq_length, d.tokens_per_step(), d.total_steps(), d.data)
            c.passkey_spec().validate()
        assert 0 < arms["msa"].attention.warmup.steps == p.warmup_steps < p.long_warmup_steps
        # the window sees the near buckets, not the far ones; MSA's budget is <= 1/4 of the context
        k, w = arms["swa"].data.passkey.distance_buckets, arms["swa"].swa_window()
        assert k[1] <= w < k[-2], (ctx, k, w)
        assert arms["msa"].msa.topk * arms["msa"].msa.block_size <= arms["msa"].train.seq_length // 4
    lw = cfgs[run_name_of(long_ctx[0], "msa_long_warmup", 1)]
    assert lw.attention.warmup.steps == p.long_warmup_steps < lw.train.steps
    # equal tokens per run at every long context
    assert len({cfgs[run_name_of(c, "dense", 1)].tokens_per_step() * cfgs[run_name_of(c, "dense", 1)].total_steps()
                for c in long_ctx}) == 1
    with pytest.raises(ValueError, match="allowed values are dense"):
        spec(p, run_name_of(p.base_context, "msa", 1), str(tmp_path))
    with pytest.raises(ValueError, match="long_warmup_steps=0 is invalid"):  # a preset without such a run
        spec(SCALE_PRESETS["scale_cpu"], "c8k_msa_long_warmup_s1", str(tmp_path))


def test_retrieval_long_is_the_retrieval_curriculum_with_twice_the_8k_steps(tmp_path):
    """Preset retrieval_long changes only the 8K arms' length (and drops 32K): its base trains
    exactly as retrieval's, its arms differ from retrieval's in steps alone, and it reports into
    its own block and results directory."""
    from msa_megatron.experiments.fidelity.scale import steps_of

    short, long_ = SCALE_PRESETS["retrieval"], SCALE_PRESETS["retrieval_long"]
    assert set(long_.contexts) == {"256", "8k"} and long_.report_name == "retrieval_long" and not long_.chain
    assert steps_of(long_, "8k") == 2 * steps_of(short, "8k") and long_.warmup_steps < long_.long_warmup_steps
    names = run_names(long_)
    assert names[0] == "c256_dense_s1" and {parse_name(n)[1] for n in names[1:]} == {"dense", "msa", "msa_long_warmup",
                                                                                    "swa"}
    for n in names:
        (tmp_path / "runs" / n / "checkpoints").mkdir(parents=True, exist_ok=True)
    assert spec(long_, "c256_dense_s1", "W").overrides == spec(short, "c256_dense_s1", "W").overrides
    for n in names[1:]:
        a, b = spec(long_, n, str(tmp_path)).overrides, spec(short, n, str(tmp_path)).overrides
        differ = {x.split("=")[0] for x in set(a) ^ set(b)}
        assert differ == {"train.steps", "checkpoint.interval"}, (n, differ)
        assert _compose(a).train.steps == 600


def test_scale_long_is_preset_scale_with_twice_the_steps_and_its_own_report(tmp_path):
    """Preset scale_long (after run 16's 15% same-seed noise): the 8K dense / MSA / window seed
    triples of preset scale, differing from them in steps and (after run 19) in the corpus's
    document order and held-out fraction alone (recipe 3), reported in their own block with the language-modelling
    claims."""
    from msa_megatron.experiments.fidelity.scale import steps_of, tokens_per_run
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, markers, scale_block

    short, long_ = SCALE_PRESETS["scale"], SCALE_PRESETS["scale_long"]
    names = run_names(long_)
    assert names == [f"c8k_{v}_s{s}" for s in (1, 2, 3) for v in ("dense", "msa", "swa")]
    assert steps_of(long_, "8k") == 2 * steps_of(short, "8k") and tokens_per_run(long_, "8k") >= 100_000_000
    assert long_.report_name == "scale_long" and long_.lm_claims and long_.recipe == short.recipe + 1
    for n in names:
        a, b = spec(long_, n, str(tmp_path)).overrides, spec(short, n, str(tmp_path)).overrides
        differ = {x.split("=")[0] for x in set(a) ^ set(b)}
        assert differ == {"train.steps", "checkpoint.interval", "data.corpus.order", "data.split"}, (n, differ)
    composed = _compose(spec(long_, "c8k_msa_s2", str(tmp_path)).overrides)
    assert composed.train.steps == 768 and composed.data.corpus.order == "shuffled" and composed.data.split == "90,10,0"
    plain = _compose(spec(short, "c8k_msa_s2", str(tmp_path)).overrides)
    assert plain.data.corpus.order == "path" and plain.data.split == "98,2,0"
    # its report: its own markers, the paired language-modelling claims
    cpu = replace(SCALE_PRESETS["scale_cpu"], report_name="scale_long")
    for seed in (1, 2, 3):
        _fake_run(tmp_path / "res", f"c8k_dense_s{seed}", 1.2, {})
        _fake_run(tmp_path / "res", f"c8k_msa_s{seed}", 1.2, {}, recall=0.9)
    block = scale_block(collect_scale([tmp_path / "res"], cpu), "scale_long", "fidelity", preset=cpu)
    begin, end = markers("scale_long")
    assert block.startswith(begin) and block.endswith(end) and begin != markers("scale")[0]
    assert block.startswith(begin + "\n\nScale long, preset `scale_long`")
    assert "within 1% of dense at 8K: **confirmed**" in block and "compared with dense *of the same seed*" in block


def test_retrieval_32k_raises_the_rope_base_of_its_32k_runs_only(tmp_path):
    """Preset retrieval_32k: the chain of preset retrieval (base -> 8K dense -> 32K arms) with the
    32K runs' RoPE base raised; the base and the 8K link train exactly as retrieval's."""
    from msa_megatron.experiments.fidelity.scale import NTK_32K_ROTARY_BASE, base_of

    short, ext = SCALE_PRESETS["retrieval"], SCALE_PRESETS["retrieval_32k"]
    names = run_names(ext)
    assert names[:2] == ["c256_dense_s1", "c8k_dense_s1"] and ext.report_name == "retrieval_32k"
    for n in names:
        (tmp_path / "runs" / n / "checkpoints").mkdir(parents=True, exist_ok=True)
    for n in names[:2]:
        assert spec(ext, n, str(tmp_path)).overrides == spec(short, n, str(tmp_path)).overrides
        assert _compose(spec(ext, n, str(tmp_path)).overrides).model.rotary_base == 10000
    long_runs = [n for n in names if parse_name(n)[0] == "32k"]
    assert {parse_name(n)[1] for n in long_runs} == {"dense", "msa", "msa_long_warmup", "swa"}
    for n in long_runs:
        assert base_of(ext, n) == "c8k_dense_s1"
        c = _compose(spec(ext, n, str(tmp_path)).overrides)
        assert c.model.rotary_base == NTK_32K_ROTARY_BASE and c.train.seq_length == 32768
        differ = set(spec(ext, n, str(tmp_path)).overrides) ^ set(spec(short, n, str(tmp_path)).overrides)
        assert differ == {f"model.rotary_base={NTK_32K_ROTARY_BASE}"}, differ
    assert 10000 * 4 ** (64 / 62) == pytest.approx(NTK_32K_ROTARY_BASE, rel=1e-3)  # the NTK rule, head dim 64


def run_name_of(ctx, variant, seed):
    from msa_megatron.experiments.fidelity.scale import run_name

    return run_name(ctx, variant, seed)


def test_curriculum_base_runs_again_where_its_checkpoint_is_missing(tmp_path):
    """Checkpoints never travel: on a fresh machine the base runs again before the arms that
    start from it, although its result was copied back; nothing runs once all arms are done."""
    from msa_megatron.experiments.fidelity import piece

    p = SCALE_PRESETS["retrieval_cpu"]
    done = tmp_path / "done"
    _fake_run(done, "c128_dense_s1", 1.0, {})
    _fake_run(done, "c512_dense_s1", 1.0, {})
    for n in ("c128_dense_s1", "c512_dense_s1"):
        info = json.loads((done / n / "run.json").read_text())
        (done / n / "run.json").write_text(json.dumps({**info, "recipe": p.recipe}))
    # the 1K runs need the 512 dense run's checkpoint, which needs the base's: the whole chain again
    assert piece.todo(p, tmp_path / "fresh", [done]) == ["c128_dense_s1", "c512_swa_s1", "c512_msa_s1",
                                                         "c512_msa_long_warmup_s1", "c512_dense_s1", "c1k_dense_s1",
                                                         "c1k_swa_s1", "c1k_msa_s1"]
    # on the machine that holds the 512 dense run's checkpoint, the 1K runs need nothing else
    work = tmp_path / "warm"
    (work / "runs" / "c512_dense_s1" / "checkpoints").mkdir(parents=True)
    (work / "runs" / "c512_dense_s1" / "checkpoints" / "latest").write_text("4")
    (work / "runs" / "c512_dense_s1" / "run.json").write_text(json.dumps({"complete": True, "recipe": p.recipe}))
    assert piece.todo(p, work, [done], only=["c1k_msa_s1"]) == ["c1k_msa_s1"]
    # a subset runs in the order given (the preset lists the window before MSA)
    assert piece.todo(p, work, [done], only=["c1k_msa_s1", "c1k_dense_s1", "c1k_swa_s1"]) == \
        ["c1k_msa_s1", "c1k_dense_s1", "c1k_swa_s1"]
    # ... and a partial run still goes first: it resumes from its checkpoint
    (work / "runs" / "c1k_swa_s1" / "checkpoints").mkdir(parents=True)
    (work / "runs" / "c1k_swa_s1" / "checkpoints" / "latest").write_text("2")
    (work / "runs" / "c1k_swa_s1" / "run.json").write_text(json.dumps({"complete": False, "recipe": p.recipe}))
    assert piece.todo(p, work, [done], only=["c1k_msa_s1", "c1k_swa_s1"]) == ["c1k_swa_s1", "c1k_msa_s1"]
    for n in ("c512_swa_s1", "c512_msa_s1", "c512_msa_long_warmup_s1", "c1k_dense_s1", "c1k_swa_s1", "c1k_msa_s1"):
        _fake_run(done, n, 1.0, {})
    assert piece.todo(p, tmp_path / "fresh", [done]) == []


def test_retrieval_report_has_its_own_block_and_only_its_claims(tmp_path):
    """The retrieval preset reports into its own doc block (the scale block stays), states the
    passkey task as trained on, judges retrieval only at the long context (not at the base's),
    and makes no language-modelling claim (its arms are not equal-token pretraining runs)."""
    pytest.importorskip("matplotlib")
    from msa_megatron.experiments.fidelity.scale_report import BEGIN, END, markers, scale_report

    p = SCALE_PRESETS["retrieval_cpu"]
    res = tmp_path / "res"
    _fake_run(res, "c128_dense_s1", 1.5, {}, passkey={"d25_64": 0.98, "d64_103": 0.97})
    far = {"d50_128": 0.97, "d128_256": 0.96, "d256_462": 0.95}
    _fake_run(res, "c512_dense_s1", 1.0, {}, passkey=far)
    _fake_run(res, "c512_swa_s1", 1.0, {}, passkey={"d50_128": 0.98, "d128_256": 0.06, "d256_462": 0.05})
    _fake_run(res, "c512_msa_s1", 1.0, {}, passkey={"d50_128": 0.96, "d128_256": 0.93, "d256_462": 0.60}, recall=0.95)
    doc = tmp_path / "doc.md"
    doc.write_text(f"# fidelity\n\n{BEGIN}\nthe scale block\n{END}\n")
    out = scale_report([res], p, "retrieval_cpu", doc, tmp_path / "plots")
    assert {x.name for x in out["written"]} == {"retrieval_loss.png", "retrieval_accuracy_vs_distance.png",
                                                "retrieval_onset.png"}  # the arms reached 50%: an onset plot
    text = doc.read_text()
    begin, end = markers("retrieval")
    assert "the scale block" in text and text.count(begin) == 1 and text.count(end) == 1
    block = text[text.index(begin):text.index(end)]
    assert "Accuracy vs distance at 128, passkey copy task (trained on)" in block
    assert "| sliding window (FLOP-matched) | 1 | 98.0% | 6.0% | 5.0% |" in block
    assert ("Retrieval at 512, passkey copy task (trained on), MSA within 5 points of dense in buckets where the "
            "window is near chance (d128_256, d256_462): **not confirmed** (largest gap 35.0 points") in block
    assert "Retrieval at 128" not in block and "associative recall" not in block
    assert "within 1% of dense" not in block and "FLOP-matched window beyond" not in block
    assert block.index("| 128 | dense |") < block.index("| 512 | dense |")  # shortest context first
    assert "Needle selection" not in block  # no run logged it
    # a second report replaces its block only
    scale_report([res], p, "retrieval_cpu", doc, tmp_path / "plots")
    assert doc.read_text().count(begin) == 1 and "the scale block" in doc.read_text()


def test_needle_selection_tabled_per_distance_for_the_runs_that_logged_it(tmp_path):
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    p = SCALE_PRESETS["retrieval_cpu"]
    _fake_run(tmp_path, "c512_dense_s1", 1.0, {}, passkey={"d50_128": 0.97})
    _fake_run(tmp_path, "c512_msa_s1", 1.0, {}, passkey={"d50_128": 0.96}, recall=0.95)
    recs = [json.loads(x) for x in (tmp_path / "c512_msa_s1" / "metrics.jsonl").read_text().splitlines()]
    recs[-1].update({"val_passkey_needle": 0.7, "val_passkey_needle/d50_128": 0.9, "val_passkey_needle/d256_462": 0.25,
                     "val_passkey_needle/layer_1": 0.5, "val_passkey_needle/layer_3": 0.875})
    (tmp_path / "c512_msa_s1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    block = scale_block(collect_scale([tmp_path], p), "retrieval_cpu", "fidelity", preset=p)
    assert "| run | layers | 50-128 | 256-462 | per layer |" in block
    assert "| `c512_msa_s1` | mean | 90.0% | 25.0% | 1: 50%, 3: 88% |" in block and "`c512_dense_s1` | 9" not in block
    assert "| any |" not in block  # a run from before the any-layer counts: the mean row only
    # since run 15 the tally also logs any layer and each layer per bucket: rows 'any' and the best layer's
    recs[-1].update({"val_passkey_needle/any": 0.95, "val_passkey_needle/any/d50_128": 1.0,
                     "val_passkey_needle/any/d256_462": 0.875, "val_passkey_needle/layer_1/d50_128": 0.5,
                     "val_passkey_needle/layer_3/d50_128": 1.0, "val_passkey_needle/layer_3/d256_462": 0.75})
    (tmp_path / "c512_msa_s1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    block = scale_block(collect_scale([tmp_path], p), "retrieval_cpu", "fidelity", preset=p)
    assert "| `c512_msa_s1` | mean | 90.0% | 25.0% | 1: 50%, 3: 88% |" in block  # per-bucket keys stay out of it
    assert "| `c512_msa_s1` | any | 100.0% | 87.5% | |" in block
    assert "| `c512_msa_s1` | layer 3 | 100.0% | 75.0% | |" in block


def _with_passkey_curve(root: Path, name: str, curve: dict):
    """Rewrite a fake run's passkey accuracy per evaluation: {bucket: [acc at step 2, acc at step 4]}."""
    path = root / name / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    evals = [r for r in recs if "val_lm_loss" in r]
    for i, r in enumerate(evals):
        r.update({f"val_passkey_acc/{b}": accs[i] for b, accs in curve.items()})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_onset_table_and_rerun_noise_in_the_retrieval_claim(tmp_path):
    """The step each bucket first reached 50% (a lag the end-of-run table hides; 'lost' when it fell
    back), every judged MSA arm stated, and a rerun's accuracy spread beside the verdict."""
    pytest.importorskip("matplotlib")
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block, scale_report

    p = SCALE_PRESETS["retrieval_cpu"]
    main, old = tmp_path / "main", tmp_path / "old"
    curves = {"c512_dense_s1": {"d50_128": [0.9, 0.95], "d256_462": [0.6, 0.9]},
              "c512_swa_s1": {"d50_128": [0.9, 0.97], "d256_462": [0.05, 0.06]},
              "c512_msa_s1": {"d50_128": [0.9, 0.93], "d256_462": [0.1, 0.55]},
              "c512_msa_long_warmup_s1": {"d50_128": [0.7, 0.4], "d256_462": [0.1, 0.88]}}
    for n, c in curves.items():
        _fake_run(main, n, 1.0, {}, passkey={b: v[-1] for b, v in c.items()}, recall=0.95 if "msa" in n else None)
        _with_passkey_curve(main, n, c)
    _fake_run(old, "c512_msa_s1", 1.0, {}, passkey={"d50_128": 0.9, "d256_462": 0.75}, recall=0.95)
    _with_passkey_curve(old, "c512_msa_s1", {"d50_128": [0.9, 0.9], "d256_462": [0.5, 0.75]})
    col = collect_scale([main], p, [old])
    block = scale_block(col, "retrieval_cpu", "fidelity", preset=p)
    assert "| run | 50-128 | 256-462 |" in block
    assert "| `c512_dense_s1` | 2 | 2 |" in block and "| `c512_swa_s1` | 2 | - |" in block
    assert "| `c512_msa_s1` | 2 | 4 |" in block and "| `c512_msa_s1` (earlier run) | 2 | 2 |" in block
    assert "| `c512_msa_long_warmup_s1` | 2 (lost: 40% at the end) | 4 |" in block
    assert ("MSA within 5 points of dense in buckets where the window is near chance (d256_462): **not confirmed** "
            "(largest gap 35.0 points; dense mean accuracy there 90.0%, chance 6.2%; a same-seed rerun moved MSA by "
            "up to 20.0 points there)") in block
    assert "MSA, long warmup within 5 points of dense in buckets where the window is near chance (d256_462): " \
           "**confirmed** (largest gap 2.0 points" in block
    assert "selection recall >= 95% at k=16 at 512" in block and "at k=16 at 1k" not in block
    out = scale_report([main], p, "retrieval_cpu", tmp_path / "doc.md", tmp_path / "plots", rerun_dirs=[old])
    assert any(x.name == "retrieval_onset.png" and x.stat().st_size > 1000 for x in out["written"])
    assert "retrieval_onset.png" in (tmp_path / "doc.md").read_text()
    # the language-modelling runs learn nothing: no onset table, no onset plot
    col = collect_scale([tmp_path / "lm"], SCALE_PRESETS["scale_cpu"])
    assert "first reached" not in scale_block(col, "scale_cpu", "fidelity")


def test_retrieval_not_solved_far_states_the_gap_where_dense_did_solve_it(tmp_path):
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, groups

    p = SCALE_PRESETS["retrieval_cpu"]
    _fake_run(tmp_path, "c1k_dense_s1", 1.0, {}, passkey={"d50_200": 0.95, "d512_768": 0.9, "d768_974": 0.1})
    _fake_run(tmp_path, "c1k_swa_s1", 1.0, {}, passkey={"d50_200": 0.95, "d512_768": 0.3, "d768_974": 0.05})
    _fake_run(tmp_path, "c1k_msa_s1", 1.0, {}, passkey={"d50_200": 0.85, "d512_768": 0.2, "d768_974": 0.05}, recall=0.9)
    col = collect_scale([tmp_path], p)
    text = "\n".join(claims(groups(col), col, p))
    assert ("Retrieval at 1k, passkey copy task (trained on): **not measured**: dense did not solve it (mean accuracy "
            "10.0% in d768_974; needs >= 50%, chance 6.2%). Where dense did solve it (d50_200, d512_768), MSA trails it "
            "by up to 70.0 points.") in text
    assert "selection recall >= 95% at k=16 at 1k (MSA runs, held-out, last evaluation): **not confirmed**" in text


def test_a_run_done_twice_states_the_run_to_run_noise(tmp_path):
    """An earlier complete run of the same name (--reruns) gives the noise floor of one seed:
    tabled, and stated beside the language-modelling claims."""
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, groups, rerun_spread, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path / "main", "c8k_dense_s1", 1.20, {"d8_64": 0.02})
    _fake_run(tmp_path / "main", "c8k_msa_s1", 1.21, {"d8_64": 0.02}, recall=0.9)
    _fake_run(tmp_path / "old", "c8k_dense_s1", 1.16, {"d8_64": 0.02})
    _fake_run(tmp_path / "old", "c8k_swa_s1", 9.0, {"d8_64": 0.02})  # not in the main results: ignored
    col = collect_scale([tmp_path / "main"], p, [tmp_path / "old"])
    sp = rerun_spread(col)
    want = abs((1.16 + 0.125) / (1.20 + 0.125) - 1)  # final held-out = value + 0.5 / 4 steps
    assert [x["name"] for x in sp] == ["c8k_dense_s1"] and abs(sp[0]["max_rel"] - want) < 1e-12
    text = "\n".join(claims(groups(col), col))
    assert f"`c8k_dense_s1` run twice (same seed, recipe and code path) ended {100 * want:.2f}% apart" in text
    # one seed, MSA +0.75% vs dense: 'met' alone, but not against a 3% rerun spread
    assert f"within 1% of dense at 8K: **undecided: fewer than 3 seeds, and a same-seed rerun differs by " \
           f"{100 * want:.2f}%**" in text
    # the second metric: training loss over the last 10% of steps (here step 4 of 4: value + 1/4)
    tail = abs((1.16 + 0.25) / (1.20 + 0.25) - 1)
    assert abs(sp[0]["max_rel_tail"] - tail) < 1e-12
    assert f"| `c8k_dense_s1` | 1.3250 / 1.2850 | {100 * want:.2f}% | 1.4500 / 1.4100 | {100 * tail:.2f}% |" in \
        scale_block(col, "scale_cpu", "fidelity")
    assert f"and {100 * tail:.2f}% apart in training loss over the last 10% of steps" in text
    # a run done twice enters the paired ratios as the mean of its copies
    assert f"MSA / dense - 1 at 8K, same seed: {100 * (1.46 / 1.43 - 1):+.2f}% (n=1), seeds [1]" in text
    assert f"MSA / dense - 1, same seed: {100 * (1.335 / 1.305 - 1):+.2f}% (n=1)" in text
    # without reruns: no noise statement
    col = collect_scale([tmp_path / "main"], p)
    text = "\n".join(claims(groups(col), col))
    assert rerun_spread(col) == [] and "run twice" not in text and "met, but with fewer than 3 seeds" in text


@pytest.mark.parametrize("msa, verdict", [
    # paired ratios (fake held-out = value + 0.125): -10.9%, +7.5%, -4.9%: the bounds enclose +1%
    ((1.10, 1.30, 1.23), "undecided: the paired mean's one-sided 95% bounds, "),
    # +4.1%, +5.0%, +4.6%: the lower bound is above +1%
    ((1.306, 1.266, 1.366), "not confirmed"),
])
def test_three_seeds_decide_within_one_percent_by_the_bounds_of_the_paired_mean(tmp_path, msa, verdict):
    """Three seeds do not make a verdict by their mean alone: run 16's MSA was 8.95% *below* dense
    on average with a spread of 8%, which says nothing about "within 1%". The one-sided 95% t
    bounds of the paired mean decide; where they enclose +1% the claim is undecided."""
    from msa_megatron.experiments.fidelity.scale_report import T95_ONE_SIDED, claims, collect_scale, groups, mean_bounds, paired

    for seed, dl, ml in zip((1, 2, 3), (1.25, 1.20, 1.30), msa):
        _fake_run(tmp_path, f"c8k_dense_s{seed}", dl, {})
        _fake_run(tmp_path, f"c8k_msa_s{seed}", ml, {}, recall=0.9)
    col = collect_scale([tmp_path], SCALE_PRESETS["scale_cpu"])
    vs = paired(col, "8k", "msa", "dense")
    rel = [(m + 0.125) / (d + 0.125) - 1 for d, m in zip((1.25, 1.20, 1.30), msa)]
    mean = sum(rel) / 3
    sd = (sum((r - mean) ** 2 for r in rel) / 2) ** 0.5
    lo, hi = mean_bounds(vs)
    assert lo == pytest.approx(mean - T95_ONE_SIDED[2] * sd / 3 ** 0.5) and hi == pytest.approx(mean + 2.920 * sd / 3 ** 0.5)
    text = "\n".join(claims(groups(col), col))
    assert f"within 1% of dense at 8K: **{verdict}" in text
    if verdict.startswith("undecided"):
        assert f"{100 * lo:+.2f}% to {100 * hi:+.2f}%, enclose +1%**" in text
    assert mean_bounds({"n": 1, "mean": 0.0, "std": None}) is None


def test_a_run_done_three_times_enters_as_the_mean_of_its_copies(tmp_path):
    """Two reruns directories (run 16 ran `c8k_dense_s1` a third time): all copies are tabled,
    the noise sentence counts them, and the group mean and the paired ratio use their mean."""
    from msa_megatron.experiments.fidelity.scale_report import claims, collect_scale, copies_mean, groups, paired, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path / "main", "c8k_dense_s1", 1.40, {})
    _fake_run(tmp_path / "main", "c8k_msa_s1", 1.24, {}, recall=0.9)
    _fake_run(tmp_path / "r13", "c8k_dense_s1", 1.19, {})
    _fake_run(tmp_path / "r14", "c8k_dense_s1", 1.23, {})
    col = collect_scale([tmp_path / "main"], p, [tmp_path / "r13", tmp_path / "r14"])
    dense = (1.40 + 1.19 + 1.23) / 3 + 0.125
    assert copies_mean(col, "c8k_dense_s1") == pytest.approx(dense)
    assert copies_mean(col, "c8k_msa_s1") == pytest.approx(1.365)  # no copies: the run itself
    assert groups(col)[("8k", "dense")]["val_loss"]["mean"] == pytest.approx(dense)
    assert paired(col, "8k", "msa", "dense")["mean"] == pytest.approx(1.365 / dense - 1)
    text = "\n".join(claims(groups(col), col))
    assert "`c8k_dense_s1` run 3 times (same seed, recipe and code path) ended" in text
    assert "| `c8k_dense_s1` | 1.5250 / 1.3150 / 1.3550 |" in scale_block(col, "scale_cpu", "fidelity")


def test_a_continuation_is_its_reported_copy_and_the_conversion_row_is_against_dense_continued(tmp_path):
    """Run 19: the conversion's copies start from different copies of the dense run (0.8456 vs
    1.1190 at the end), so a continuation enters as its reported copy, which shares a checkpoint
    with the reported dense continued; the main table compares the conversion with that
    reference, and neither continuation with the dense run (fewer tokens)."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, copies_mean, groups, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path / "main", "c8k_dense_s1", 1.00, {})
    _fake_run(tmp_path / "main", "c8k_dense_to_msa_s1", 0.85, {}, recall=0.9)
    _fake_run(tmp_path / "main", "c8k_dense_continued_s1", 0.84, {})
    _fake_run(tmp_path / "r17", "c8k_dense_s1", 1.40, {})
    _fake_run(tmp_path / "r17", "c8k_dense_to_msa_s1", 1.12, {}, recall=0.9)
    col = collect_scale([tmp_path / "main"], p, [tmp_path / "r17"])
    assert copies_mean(col, "c8k_dense_s1") == pytest.approx((1.00 + 1.40) / 2 + 0.125)  # copies averaged
    assert copies_mean(col, "c8k_dense_to_msa_s1") == pytest.approx(0.85 + 0.125)  # the reported copy alone
    assert groups(col)[("8k", "dense_to_msa")]["val_loss"]["mean"] == pytest.approx(0.975)
    block = scale_block(col, "scale_cpu", "fidelity", preset=p)
    rel = 100 * (0.975 / 0.965 - 1)
    assert f"| 8k | dense -> MSA conversion | 1 | 0.9750 (n=1) | {rel:+.2f}% (n=1) vs dense continued |" in block
    assert "| 8k | dense, continued (the conversion's reference) | 1 | 0.9650 (n=1) | - | - |" in block
    assert "| `c8k_dense_to_msa_s1` | 0.9750 / 1.2450 |" in block  # both copies still tabled as copies


def test_the_report_states_what_the_held_out_loss_is_measured_on(tmp_path):
    """Run 19: the held-out set was 28% one generated file. Runs log their held-out split as the
    event ``held_out``; the report lists each distinct one with its runs (a resumed run logs it
    once per segment, listed once), and says nothing where no run logged one."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path, "c8k_dense_s1", 1.0, {})
    _fake_run(tmp_path, "c8k_msa_s1", 1.0, {}, recall=0.9)
    assert "Held-out set" not in scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    msg = "held-out split: 43 documents, 0.73M tokens; the largest, document 2110 (torch/x.py), is 28.0% of them"
    for name in ("c8k_dense_s1", "c8k_msa_s1"):
        path = tmp_path / name / "metrics.jsonl"
        event = json.dumps({"step": 0, "event": "held_out", "message": msg})
        path.write_text(event + "\n" + path.read_text() + event.replace('"step": 0', '"step": 2') + "\n")
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert f"Held-out set (each run's `held_out` event):\n\n* {msg}: `c8k_dense_s1`, `c8k_msa_s1`\n" in block


def test_per_layer_index_statistics_over_the_last_tenth_and_held_out_recall(tmp_path):
    """Issue 19's per-layer KL, entropy and recall: training statistics averaged over the last 10%
    of the logged steps (steps 19-20 of 20 here), recall from the last held-out evaluation;
    dense runs have no row."""
    from msa_megatron.experiments.fidelity.layer_stats import layer_tail_means
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    recs = [{"step": s, "lm_loss": 1.0, **{f"indexer_kl/layer_{i}": s * i / 10 for i in (1, 2)},
             **{f"main_entropy/layer_{i}": 5.0 - s / 10 for i in (1, 2)}} for s in range(1, 21)]
    assert layer_tail_means(recs, 0.1) == {"indexer_kl": {1: 1.95, 2: 3.9}, "main_entropy": {1: 3.05, 2: 3.05}}
    assert layer_tail_means([], 0.1) == {} and layer_tail_means([{"step": 1, "lm_loss": 1.0}], 0.1) == {}

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path, "c8k_dense_s1", 1.0, {})
    _fake_run(tmp_path, "c8k_msa_s1", 1.0, {}, recall=0.9)
    path = tmp_path / "c8k_msa_s1" / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:  # 4 steps: the last 10% is step 4
        r.update({"indexer_kl/layer_1": 0.25 * r["step"], "index_entropy/layer_1": 4.0, "main_entropy/layer_1": 2.5})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert "Per-layer index statistics at 8k" in block
    assert "| run | statistic | layer 1 | layer 2 |" in block
    assert "| `c8k_msa_s1` | indexer KL | 1.000 | - |" in block
    assert "| `c8k_msa_s1` | main-branch entropy (nats) | 2.500 | - |" in block
    assert "| `c8k_msa_s1` | selection recall (held-out, end) | 88.0% | 92.0% |" in block
    assert "`c8k_dense_s1` | indexer KL" not in block


def test_conversion_is_judged_against_dense_continued_alike(tmp_path):
    """Run 14's conversion beat the dense run's *final* loss at its first sparse evaluation,
    because dense was still improving: the reference is dense continued from the same
    checkpoint for the same steps, compared evaluation by evaluation after the switch."""
    from msa_megatron.experiments.fidelity.collect import conversion_vs_continued
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    conv = {"switch_step": 4, "val_loss": [[2, 200, 1.00], [4, 400, 1.30], [6, 600, 1.22], [8, 800, 1.205]]}
    cont = {"val_loss": [[2, 200, 1.00], [4, 400, 1.20], [6, 600, 1.20], [8, 800, 1.195]]}
    v = conversion_vs_continued(cont, conv)
    assert [x[0] for x in v["pairs"]] == [4, 6, 8]  # evaluations from the switch on (step 2 was dense)
    assert v["pairs"][0][4] == pytest.approx(1.30 / 1.20 - 1) and v["final_rel"] == pytest.approx(1.205 / 1.195 - 1)
    assert (v["within_at_step"], v["within_at_tokens"]) == (8, 800)  # 1.22/1.20 = +1.7%, 1.205/1.195 = +0.84%
    assert conversion_vs_continued(cont, {**conv, "switch_step": None})["pairs"] == []
    assert conversion_vs_continued(cont, conv, tolerance=0.001)["within_at_tokens"] is None

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path, "c8k_dense_s1", 1.20, {})
    _fake_run(tmp_path, "c8k_dense_to_msa_s1", 1.25, {}, recall=0.9)
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert "Dense -> MSA conversion (8K, seed 1)" in block and "dense continued" not in block
    # dense's own end is named as the weak target it is: fake val loss 1.20 + 0.5 / step, steps 2 and 4
    assert (f"its held-out loss moved {100 * (1.325 / 1.45 - 1):+.2f}% over its last evaluation interval); the judged "
            "reference, `c8k_dense_continued_s1`") in block
    _fake_run(tmp_path, "c8k_dense_continued_s1", 1.20, {})
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert "(`c8k_dense_continued_s1`, the target that moves as dense keeps improving): not within 1% by the end" in block
    assert "| 4 | 4,000 | 1.3750 | 1.3250 | +3.77% |" in block  # fake val loss = value + 0.5 / step


def test_train_tail_is_the_mean_over_the_last_tenth_of_the_steps():
    from msa_megatron.experiments.fidelity.scale_report import train_tail

    recs = [{"step": s, "lm_loss": float(s)} for s in range(1, 101)] + [{"step": 100, "val_lm_loss": 9.0}]
    assert train_tail(recs) == sum(range(91, 101)) / 10  # steps 91-100
    assert train_tail(recs[:50], 0.2) == sum(range(41, 51)) / 10
    assert train_tail([{"step": 1, "lm_loss": float("nan")}]) is None and train_tail([]) is None


def test_piece_refuses_a_gpu_preset_without_a_gpu_and_names_the_cpu_presets(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--piece", "retrieval", "--work",
                        str(tmp_path / "w"), "--done", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--piece retrieval needs a CUDA GPU" in r.stderr
    assert "scale_cpu" in r.stderr and "retrieval_cpu" in r.stderr


def _with_series(root: Path, name: str, **series):
    """Overwrite per-step metrics of a fake run: ``key=f(step)``."""
    path = root / name / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r.update({k: f(r["step"]) for k, f in series.items()})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_grad_spikes_and_kl_tail():
    from msa_megatron.experiments.fidelity.ablations import grad_spikes, kl_tail

    norms = [[s, 50.0 if s <= 2 else (9.0 if s in (12, 15) else 1.0)] for s in range(1, 21)]
    # steps 1-2 are the first 10% (excluded); past them the median is 1.0 and two steps exceed 3x it
    assert grad_spikes(norms) == {"count": 2, "max": 9.0, "median": 1.0}
    assert grad_spikes([]) == {"count": None, "max": None, "median": None}
    assert kl_tail({"indexer_kl": [[s, float(s)] for s in range(1, 21)]}) == pytest.approx(19.5)  # steps 19-20
    assert kl_tail({}) is None


@pytest.mark.parametrize("variant,series,appears", [
    ("msa_no_stopgrad", {"grad_norm": lambda s: 9.0 if s == 18 else 1.0}, "gradient spikes **appear** (1 logged"),
    ("msa_no_stopgrad", {}, "gradient spikes **do not appear** (0 logged"),
    ("msa_no_warmup", {"indexer_kl": lambda s: 0.6}, "a teacher-chasing indexer **appears** (indexer KL 0.600, "
                                                       "at most 0.500 in the 1 MSA seed;"),
    ("msa_no_warmup", {"indexer_kl": lambda s: 0.52}, "a teacher-chasing indexer **does not appear**"),
    ("msa_no_teacher", {"val/recall": lambda s: 0.80}, "a worse selection **appears** (selection recall 80.0%, "
                                                       "at least 90.0% in the 1 MSA seed: +10.0 points below)"),
    ("msa_no_teacher", {"val/recall": lambda s: 0.895}, "a worse selection **does not appear**"),
])
def test_ablations_state_whether_the_papers_pathology_appears(tmp_path, variant, series, appears):
    """Issue 19: each ablation beside MSA of the same seed, the paper's pathology for it judged by
    the thresholds of fidelity/ablations.py, and a loss difference within the same-seed noise
    not called an effect."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path, "c8k_dense_s1", 1.0, {})
    _fake_run(tmp_path, "c8k_msa_s1", 1.0, {}, recall=0.9, steps=20)
    _with_series(tmp_path, "c8k_msa_s1", indexer_kl=lambda s: 0.5, **{"val/recall": lambda s: 0.9})
    name = f"c8k_{variant}_s1"
    _fake_run(tmp_path, name, 1.02, {}, recall=0.9, steps=20)
    _with_series(tmp_path, name, **{"indexer_kl": lambda s: 0.5, "val/recall": lambda s: 0.9, **series})
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert f"| `{name}` | 1.0450 | +1.95% |" in block  # fake val loss = value + 0.5 / step, last step 20
    assert appears in block and "![ablations: gradient norm, indexer KL, selection recall](fidelity/scale_ablations.png)" in block
    from msa_megatron.experiments.fidelity.scale_report import plots
    written = plots(collect_scale([tmp_path], p), tmp_path / "plots", p)
    assert tmp_path / "plots" / "scale_ablations.png" in written and (tmp_path / "plots" / "scale_ablations.png").stat().st_size > 0
    assert "one copy each and no same-seed noise measured, so not a verdict" in block
    # a second copy of dense seed 1, 5% apart: the 1.95% loss difference is within that noise
    reruns = tmp_path / "reruns"
    _fake_run(reruns, "c8k_dense_s1", 1.05, {})
    block = scale_block(collect_scale([tmp_path], p, rerun_dirs=[reruns]), "scale_cpu", "fidelity", preset=p)
    assert "within the same-seed noise" in block and "no loss effect resolved" in block
    # no MSA run of that seed: no ablation row or claim
    import shutil
    shutil.rmtree(tmp_path / "c8k_msa_s1")
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert "Ablation" not in block and "ablations.png" not in block
    assert not any(x.name.endswith("ablations.png") for x in plots(collect_scale([tmp_path], p), tmp_path / "p2", p))


def test_software_stack_recorded_per_segment_and_grouped_in_the_report(tmp_path, monkeypatch):
    """Run 17: four copies of one run split into two pairs by lending; each segment now records
    the versions it trained on, and the report groups runs by them."""
    import dataclasses

    from msa_megatron.experiments.fidelity import piece
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    fake = tmp_path / "fakepy"
    fake.write_text(_FAKE_TRAINER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p = dataclasses.replace(SCALE_PRESETS["scale_cpu"], steps=3, startup_s=0.1, entries=(("8k", "dense", (1,)),))
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    sw = {"torch": "2.11.0", "cuda": "13.0", "cudnn": "91000", "triton": "3.6.0", "driver": "580.1"}
    piece.run_piece(p, tmp_path / "work", 30, [], str(fake), REPO, "cpu", "c0ffee", grace_s=0.0, min_slice_s=0.5,
                    log=lambda m: None, software=sw)
    info = json.loads((tmp_path / "work" / "runs" / "c8k_dense_s1" / "run.json").read_text())
    assert info["segments"][0]["software"] == sw

    q = SCALE_PRESETS["scale_cpu"]
    _fake_run(tmp_path / "done", "c8k_dense_s1", 1.0, {})
    _fake_run(tmp_path / "done", "c8k_msa_s1", 1.0, {}, recall=0.9)
    assert "Software per run" not in scale_block(collect_scale([tmp_path / "done"], q), "scale_cpu", "f", preset=q)
    path = tmp_path / "done" / "c8k_msa_s1" / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "segments": info["segments"]}))
    block = scale_block(collect_scale([tmp_path / "done"], q), "scale_cpu", "f", preset=q)
    assert ("* torch 2.11.0, cuda 13.0, cudnn 91000, triton 3.6.0, driver 580.1: `c8k_msa_s1`" in block
            and "* not recorded (before run 18): `c8k_dense_s1`" in block)


def test_an_ablation_inside_the_msa_seeds_range_shows_no_pathology(tmp_path):
    """Selection recall 1.7 points below MSA seed 1 but inside the range of MSA's seeds (run 16:
    92.1-94.0%) is seed noise, not a pathology."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    for seed, recall in ((1, 0.938), (2, 0.921)):
        _fake_run(tmp_path, f"c8k_msa_s{seed}", 1.0, {}, recall=recall, steps=20)
        _with_series(tmp_path, f"c8k_msa_s{seed}", **{"val/recall": lambda s, v=recall: v})
    _fake_run(tmp_path, "c8k_msa_no_teacher_s1", 1.0, {}, recall=0.921, steps=20)
    _with_series(tmp_path, "c8k_msa_no_teacher_s1", **{"val/recall": lambda s: 0.921})
    block = scale_block(collect_scale([tmp_path], p), "scale_cpu", "fidelity", preset=p)
    assert "| 92.1% (93.8%) |" in block  # tabled beside its own seed's MSA run
    assert ("a worse selection **does not appear** (selection recall 92.1%, at least 92.1% in the 2 MSA seeds: "
            "+0.0 points below)") in block


def test_the_report_finds_every_reruns_directory_beside_the_results(tmp_path):
    """Each rerun moves the earlier copy to a new `<results>_reruns_runN` directory; the report
    finds them all (oldest first, run 100 after run 99) without a hand-kept list, and ignores
    look-alikes that are not reruns of this directory."""
    from msa_megatron.experiments.fidelity.scale_report import sibling_rerun_dirs

    for name in ("fidelity_scale", "fidelity_scale_reruns_run100", "fidelity_scale_reruns_run16",
                 "fidelity_scale_reruns", "fidelity_scale_reruns_run99", "fidelity_scale_rerunsX",
                 "fidelity_scale_long_reruns"):
        (tmp_path / name).mkdir()
    (tmp_path / "fidelity_scale_reruns_file").write_text("")
    got = [d.name for d in sibling_rerun_dirs(tmp_path / "fidelity_scale")]
    assert got == ["fidelity_scale_reruns", "fidelity_scale_reruns_run16", "fidelity_scale_reruns_run99",
                   "fidelity_scale_reruns_run100"]
    assert [d.name for d in sibling_rerun_dirs(tmp_path / "fidelity_scale_long")] == ["fidelity_scale_long_reruns"]
    assert sibling_rerun_dirs(tmp_path / "fidelity_scale_reruns_run16") == []


def test_a_copy_moved_aside_for_a_rerun_still_counts_until_the_rerun_lands(tmp_path):
    """Before a rerun, the current copy moves to a reruns directory; if no GPU comes, the results
    lack that name. The report then stands in the newest complete rerun copy (named in the
    block), counts the older copies as its reruns, and never drops the seed; a partial run in
    the results does not hide it either."""
    from msa_megatron.experiments.fidelity.scale_report import collect_scale, scale_block

    p = SCALE_PRESETS["scale_cpu"]
    main, old, newer = tmp_path / "fidelity_scale", tmp_path / "fidelity_scale_reruns", tmp_path / "fidelity_scale_reruns_run9"
    _fake_run(main, "c8k_msa_s1", 1.21, {}, recall=0.9)
    _fake_run(main, "c8k_dense_s2", 1.30, {}, complete=False)
    _fake_run(old, "c8k_dense_s1", 1.16, {})
    _fake_run(newer, "c8k_dense_s1", 1.40, {})
    _fake_run(newer, "c8k_dense_s2", 1.25, {})
    col = collect_scale([main], p, [old, newer])
    assert col["runs"]["c8k_dense_s1"]["final"]["val_loss"] == pytest.approx(1.40 + 0.125)  # the newest copy
    assert [o["val_loss"] for o in col["reruns"]["c8k_dense_s1"]] == [pytest.approx(1.16 + 0.125)]
    assert col["runs"]["c8k_dense_s2"]["final"]["val_loss"] == pytest.approx(1.25 + 0.125)
    assert "c8k_dense_s2" not in col["unfinished"] and "c8k_dense_s1" not in col["missing"]
    assert col["from_reruns"] == {"c8k_dense_s1": str(newer), "c8k_dense_s2": str(newer)}
    assert f"`c8k_dense_s1` (`{newer}`)" in scale_block(col, "scale_cpu", "fidelity")
    # once the rerun lands in the results, it is the reported copy and both moved copies are reruns
    _fake_run(main, "c8k_dense_s1", 1.30, {})
    col = collect_scale([main], p, [old, newer])
    assert col["runs"]["c8k_dense_s1"]["final"]["val_loss"] == pytest.approx(1.30 + 0.125)
    assert len(col["reruns"]["c8k_dense_s1"]) == 2 and "c8k_dense_s1" not in col["from_reruns"]


def test_msa_runs_pin_global_clipping_and_the_sepclip_arm_differs_only_there(tmp_path):
    """Every recorded MSA run clipped all parameters by one norm; the presets pin
    msa.index_grad_clip=global so the default (separate) does not change a recipe under way.
    The retrieval preset's msa_sepclip arm is its MSA arm with the index branch clipped alone."""
    from msa_megatron.experiments.fidelity.scale import LABELS, VARIANTS

    p = SCALE_PRESETS["retrieval"]
    assert "msa_sepclip" in VARIANTS and "msa_sepclip" in LABELS and "c8k_msa_sepclip_s1" in run_names(p)
    (tmp_path / "runs" / "c256_dense_s1" / "checkpoints").mkdir(parents=True)
    msa = spec(p, "c8k_msa_s1", str(tmp_path)).overrides
    sep = spec(p, "c8k_msa_sepclip_s1", str(tmp_path)).overrides
    own = lambda o: not o.startswith("run_dir=")  # noqa: E731 (each run has its own directory)
    assert [o for o in msa if o not in sep and own(o)] == ["attention.msa.index_grad_clip=global"]
    assert [o for o in sep if o not in msa and own(o)] == ["attention.msa.index_grad_clip=separate"]
    assert _compose(sep).msa.index_grad_clip == "separate" and _compose(msa).msa.index_grad_clip == "global"
    for preset in ("scale", "retrieval", "retrieval_32k", "scale_long"):
        for name in run_names(SCALE_PRESETS[preset]):
            if "msa" in parse_name(name)[1] and parse_name(name)[1] != "msa_sepclip":
                assert "attention.msa.index_grad_clip=global" in spec(SCALE_PRESETS[preset], name, "W").overrides, name

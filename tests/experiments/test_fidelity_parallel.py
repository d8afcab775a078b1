"""Issue 19, several scale-matrix runs sharing one GPU (piece.py --parallel), on the CPU: the
planning model, the admission rule, the dry-run plan, and the live scheduler with the trainer
replaced by a tiny fake (which runs start, distinct MASTER_PORTs, each run's budget, SIGTERM
at the budget for all, resume next call, an out-of-memory exit queued again); the scale report
on arbitrary subsets of the matrix."""

import dataclasses
import json
import socket
import stat
import tarfile
import time
from pathlib import Path

import pytest

from msa_megatron.experiments.fidelity import piece
from msa_megatron.experiments.fidelity.piece import Load, Planning, admit, gain, plan_call, planning, simulate
from msa_megatron.experiments.fidelity import scale as scale_mod
from msa_megatron.experiments.fidelity.scale import SCALE_PRESETS

REPO = Path(__file__).resolve().parents[2]


def _pl(**kw) -> Planning:
    base = dict(alone_tps={"8k": 1000.0, "32k": 250.0}, startup_s=10.0, share_efficiency=0.5,
                peak_gib={"8k": 20.0, "32k": 36.0}, usable_gib=72.0, parallel=None, max_parallel=4, fit_margin=0.0)
    base.update(kw)
    return Planning(**base)


# --------------------------------------------------------------------------- the planning model
def test_gain_caps_and_simulate():
    assert gain(1, 0.4) == 1 and gain(3, 0.5) == 2.0 and gain(2, 0.0) == 1.0
    pl = _pl()
    assert pl.cap("8k") == 3 and pl.cap("32k") == 2  # 72 GiB // 20, // 36
    assert _pl(usable_gib=200.0).cap("8k") == 4  # max_parallel
    assert _pl(usable_gib=None).cap("8k") == 1 and _pl(parallel=5, usable_gib=None).cap("8k") == 5
    # alone: 10 s start-up + 10,000 tokens at 1,000/s
    assert simulate([Load("a", "8k", 10, 10_000)], pl, 1e9) == {"a": pytest.approx(20.0)}
    # two together: each at 1,000 x 1.5 / 2 = 750 tokens/s -> 10 + 13.33 s
    two = simulate([Load("a", "8k", 10, 10_000), Load("b", "8k", 10, 10_000)], pl, 1e9)
    assert two["a"] == pytest.approx(10 + 10_000 / 750) and two["b"] == two["a"]
    # unequal: b (half the tokens) ends first, then a runs alone at full speed
    t = simulate([Load("a", "8k", 0, 10_000), Load("b", "8k", 0, 3_000)], pl, 1e9)
    assert t["b"] == pytest.approx(4.0) and t["a"] == pytest.approx(4.0 + (10_000 - 3_000) / 1000)
    # beyond the horizon: None
    assert simulate([Load("a", "8k", 10, 10_000)], pl, 19.0) == {"a": None}


def test_admit_rules():
    pl = _pl()
    a = Load("a", "8k", 10, 10_000)  # 20 s alone
    b = Load("b", "8k", 10, 10_000)
    # fits alone, fits shared (23.3 s each), not within 22 s; the first run of a call always starts
    assert admit(a, [], pl, 25, first_of_call=False, resumable=False) is None
    assert admit(b, [a], pl, 25, first_of_call=False, resumable=False) is None
    assert "would not finish" in admit(b, [a], pl, 22, first_of_call=False, resumable=False)
    assert admit(a, [], pl, 5, first_of_call=True, resumable=False) is None
    # a resumable (partial) run always starts, capacity permitting
    assert admit(b, [a], pl, 1, first_of_call=False, resumable=True) is None
    # pushing a running run past the end: a would finish in 20 s alone, not with b (b is short)
    short = Load("s", "8k", 10, 100)
    assert "would push a" in admit(short, [a], _pl(share_efficiency=0.0), 20.05, first_of_call=False, resumable=False)
    # the fit margin: 23.3 s x 1.1 > 25
    assert "would not finish" in admit(b, [a], _pl(fit_margin=0.1), 25, first_of_call=False, resumable=False)
    # capacity from memory (automatic mode): 3 x 8K fit in 72 GiB, a 32K next to two 8K does not
    assert "holds 3" in admit(Load("d", "8k", 0, 1), [a, b, short], pl, 1e9, False, True)
    assert "holds 2" in admit(Load("l", "32k", 0, 1), [a, b], pl, 1e9, False, True)
    assert "holds 1" in admit(Load("l", "32k", 0, 1), [a], _pl(usable_gib=50.0), 1e9, False, True)
    assert admit(Load("l", "32k", 0, 1), [a], pl, 1e9, False, True) is None
    # an explicit --parallel is the cap, memory unchecked
    assert admit(Load("l", "32k", 0, 1), [a, b], _pl(parallel=3), 1e9, False, True) is None


def test_measured_sharing():
    m = piece.measured_sharing({"8k": [{"1": 100, "2": 70}, {"2": 70, "3": 60}], "32k": [{"2": 50}]})
    assert m["8k"]["tokens_per_s"] == {"1": 100, "2": 70, "3": 60}
    assert m["8k"]["e"] == pytest.approx((3 * 60 / 100 - 1) / 2)  # 1.8x with 3 runs -> e = 0.4
    assert m["32k"]["e"] is None  # never measured alone


def _seg_run(root: Path, name: str, segs, peaks=()):
    d = root / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "segments": segs}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "peak_mem_gib": p}) + "\n"
                                             for i, p in enumerate(peaks)))


def test_planning_calibrates_from_measured_segments(tmp_path):
    p = dataclasses.replace(SCALE_PRESETS["scale"], max_parallel=4, contexts={
        c: dataclasses.replace(x, est_tokens_per_s_by_kind=()) for c, x in SCALE_PRESETS["scale"].contexts.items()})
    pl = planning(p, tmp_path / "w", [tmp_path / "done"], gpu_mem_gib=80.0)
    assert pl.alone_tps["8k"] == 180e3 and pl.peak_gib["8k"] == 20.0 and pl.cap("8k") == 3 and pl.cap("32k") == 2
    assert pl.alone("8k", "msa") == 180e3  # no per-kind figure yet: the context's
    assert "planned" in pl.describe() and "parallel=auto" in pl.describe()
    # measured, per cost kind: dense 150K tokens/s with 2 on the GPU (e=0.5 -> 200K alone), MSA
    # 100K alone, the window 210K alone; peaks 30 GiB -> 30 x 1.1 + 1.5 = 34.5 GiB/run -> 2 at once
    _seg_run(tmp_path / "done", "c8k_dense_s1", [{"tokens_per_s": 150e3, "shared_mean": 2.0, "startup_s": 40}],
             peaks=(12.0, 30.0))
    _seg_run(tmp_path / "done", "c8k_msa_s1", [{"tokens_per_s": 100e3, "shared_mean": 1.0, "startup_s": 50}])
    _seg_run(tmp_path / "w" / "runs", "c8k_swa_s1", [{"tokens_per_s": 210e3, "shared_mean": 1.0, "startup_s": 30}])
    pl = planning(p, tmp_path / "w", [tmp_path / "done"], gpu_mem_gib=80.0, share_efficiency=0.5)
    assert (pl.alone("8k", "dense"), pl.alone("8k", "msa"), pl.alone("8k", "swa")) == (200e3, 100e3, 210e3)
    assert pl.alone("32k", "msa") == 75e3  # 32K: nothing measured
    assert pl.peak_gib["8k"] == pytest.approx(34.5) and pl.cap("8k") == 2
    assert pl.startup_s == 40 and "msa 100K tok/s alone (measured, 1 segments alone)" in pl.describe()
    assert "dense 200K tok/s alone (measured, 1 segments shared, scaled by e)" in pl.describe()
    # a segment that ran alone wins over shared ones scaled by the e knob
    _seg_run(tmp_path / "done", "c8k_dense_s2", [{"tokens_per_s": 180e3, "shared_mean": 1.0}])
    assert planning(p, tmp_path / "w", [tmp_path / "done"], share_efficiency=0.5).alone("8k", "dense") == 180e3
    # an MSA run is planned at MSA's rate: 1M tokens take 10 s alone, a dense run's 5 s
    loads = [piece.Load("m", "8k", 0.0, 1e6, "msa"), piece.Load("d", "8k", 0.0, 1e6, "dense")]
    assert simulate(loads[:1], pl, 1e9) == {"m": pytest.approx(10.0)}
    assert simulate(loads[1:], pl, 1e9) == {"d": pytest.approx(5.0)}


def test_scale_preset_plans_each_kind_at_its_measured_rate_one_run_at_a_time():
    p = SCALE_PRESETS["scale"]
    assert [scale_mod.cost_kind(v) for v in ("dense", "swa", "msa", "msa_no_teacher", "dense_to_msa")] == \
        ["dense", "swa", "msa", "msa", "msa"]
    msa, dense = scale_mod.estimate_s(p, "c8k_msa_s1"), scale_mod.estimate_s(p, "c8k_dense_s1")
    assert msa - p.startup_s == pytest.approx(3.4 * (dense - p.startup_s), rel=0.01)  # 460K vs 135K tokens/s
    assert planning(p, Path("/nonexistent"), [], gpu_mem_gib=80.0).cap("8k") == 1


# --------------------------------------------------------------------------- the plan of a call
def _tiny(**kw):
    """scale_cpu, 3 8K runs + the conversion + one 32K run; 20 steps of 1,024 tokens at 8K."""
    kw.setdefault("entries", (("8k", "dense", (1,)), ("8k", "msa", (1,)), ("8k", "swa", (1,)),
                              ("8k", "dense_to_msa", (1,)), ("32k", "dense", (1,))))
    return dataclasses.replace(SCALE_PRESETS["scale_cpu"], steps=20, convert_steps=3, startup_s=0.5, **kw)


def test_plan_call_shares_orders_and_waits_for_the_dependency(tmp_path):
    p = _tiny()
    q = piece.todo(p, tmp_path, [])
    assert q == ["c8k_dense_s1", "c8k_msa_s1", "c8k_swa_s1", "c8k_dense_to_msa_s1", "c32k_dense_s1"]
    # 8K run: 20,480 tokens; 32K: 20 x 2 x 512 = 20,480. Perfect sharing (e=1), 3 at once:
    pl = _pl(alone_tps={"8k": 2048.0, "32k": 1024.0}, startup_s=1.0, share_efficiency=1.0)
    rows = {r["name"]: r for r in plan_call(p, tmp_path, q, pl, 40.0, min_slice_s=1.0)}
    for n in ("c8k_dense_s1", "c8k_msa_s1", "c8k_swa_s1"):
        assert rows[n]["start"] == 0 and rows[n]["end"] == pytest.approx(11.0) and rows[n]["shared_max"] == 3
    # the conversion waits for its dense run, the 32K run would not finish (21 s, 29 left x ... shared)
    conv = rows["c8k_dense_to_msa_s1"]
    assert conv["start"] == pytest.approx(11.0) and conv["end"] == pytest.approx(11.0 + 1.0 + 3 * 1024 / 2048)
    assert rows["c32k_dense_s1"]["start"] == pytest.approx(11.0)  # 1 + 20 s alone-speed, fits in 29 s
    # no gain from sharing: only the first run starts with the call, the other 8K runs do not fit
    # next to it nor after it (11 s each, 15 s in all); the short conversion does, after the dense run
    rows = plan_call(p, tmp_path, q, _pl(alone_tps={"8k": 2048.0, "32k": 1024.0}, startup_s=1.0,
                                         share_efficiency=0.0), 15.0, min_slice_s=1.0)
    started = [(r["name"], r["start"]) for r in rows if r["start"] is not None]
    assert started == [("c8k_dense_s1", 0.0), ("c8k_dense_to_msa_s1", pytest.approx(11.0))]
    why = {r["name"]: r["why"] for r in rows if r["start"] is None}
    assert "would not finish" in why["c8k_msa_s1"] and "would not finish" in why["c32k_dense_s1"]
    # the dependency's reason is what kept it from starting with the call
    rows = plan_call(p, tmp_path, ["c8k_dense_to_msa_s1"], pl, 15.0, min_slice_s=1.0)
    assert rows[0]["start"] is None and "needs c8k_dense_s1's checkpoint" in rows[0]["why"]


def test_dry_run_prints_the_plan_of_this_call(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--piece", "scale", "--dry-run",
                          "--work", str(tmp_path / "w"), "--done", str(tmp_path / "none"), "--budget-s", "520",
                          "--share-eff", "1.0", "--gpu-mem-gib", "80"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    t = out.stdout
    assert "parallel=auto (72 GiB usable)" in t and "up to 1 at once" in t and "e=1" in t
    assert "dense ~2.8 min at 460K tokens/s, msa ~7.2 min at 135K tokens/s" in t
    # one at a time (the preset's max_parallel, from run 12): dense 60 s + 50.3M / 460K = ~169 s,
    # then the conversion (96 MSA steps: 60 s + 12.6M / 135K = ~153 s); c8k_msa_s1 (~433 s) does not fit
    assert "this call: c8k_dense_s1 starts ~0s, ends ~169s, up to 1 run(s)" in t
    assert "this call: c8k_dense_to_msa_s1 starts ~169s, ends ~323s, up to 1 run(s)" in t
    assert "a later call: c8k_msa_s1" in t and "a later call: c32k_msa_s1" in t
    # --parallel 3 with perfect sharing: the window and another dense run start beside the first
    shared = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--piece", "scale", "--dry-run",
                             "--work", str(tmp_path / "w"), "--done", str(tmp_path / "none"), "--budget-s", "520",
                             "--share-eff", "1.0", "--gpu-mem-gib", "80", "--parallel", "3"],
                            capture_output=True, text=True, timeout=120).stdout
    assert "up to 3 at once" in shared and "this call: c8k_swa_s1 starts ~0s, ends ~375s, up to 3 run(s)" in shared
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "fidelity.py"), "--piece", "scale", "--dry-run",
                          "--parallel", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--parallel '0' is invalid: allowed values are auto or an integer >= 1" in bad.stderr


# --------------------------------------------------------------------------- the live scheduler
_FAKE = r"""#!/usr/bin/env python3
# Stands in for `python -m msa_megatron.train`: one step per FAKE_STEP_S, metrics per step; on
# SIGTERM finishes the step, writes a checkpoint marker and exits 0 (as the trainer does: at a
# step boundary, so the checkpoint and the metrics agree); resumes from it. Logs
# (name, MASTER_PORT, start, end) to FAKE_LOG; FAKE_OOM=<name> makes that run's first attempt
# exit 1 with a CUDA out-of-memory message.
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
rd, steps = args["run_dir"], int(args["train.steps"])
name = os.path.basename(rd)
t0 = time.time()
def note(**kw):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"name": name, "port": os.environ.get("MASTER_PORT"), "t0": t0, "t1": time.time(),
                            "world": os.environ.get("WORLD_SIZE"), **kw}) + "\n")
if os.environ.get("FAKE_OOM") == name and not os.path.exists(rd + ".oom"):
    open(rd + ".oom", "w").close()
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"); note(rc=1); sys.exit(1)
os.makedirs(rd + "/checkpoints", exist_ok=True)
latest = rd + "/checkpoints/latest"
start = int(open(latest).read()) if os.path.exists(latest) else 0
term = []
signal.signal(signal.SIGTERM, lambda *_: term.append(1))
with open(rd + "/metrics.jsonl", "a") as f:
    for s in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.1")))
        f.write(json.dumps({"step": s, "lm_loss": 1.0, "tokens_per_s": 1000.0}) + "\n"); f.flush()
        if term and s < steps:
            open(latest, "w").write(str(s)); note(rc=0, stopped=True); sys.exit(0)
open(latest, "w").write(str(steps))
note(rc=0)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    path = tmp_path / "fakepy"
    path.write_text(_FAKE)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "fake.log"))
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    monkeypatch.setenv("WORLD_SIZE", "8")  # must not leak into the runs
    return path


def _notes(tmp_path):
    return [json.loads(ln) for ln in (tmp_path / "fake.log").read_text().splitlines()]


def _go(p, work, budget, fake, pl, msgs, **kw):
    return piece.run_piece(p, work, budget, [work.parent / "done"], str(fake), REPO, "cpu", "c0ffee", grace_s=0.0,
                           min_slice_s=0.3, poll_s=0.05, log=msgs.append, plan=pl, calib_window_s=1e9, min_rate_s=0.0,
                           **kw)


def test_parallel_runs_ports_budgets_sigterm_and_resume(tmp_path, fake):
    p = _tiny(entries=(("8k", "dense", (1,)), ("8k", "msa", (1,)), ("8k", "dense_to_msa", (1,))))
    work = tmp_path / "work"
    # planned 0.5 s + 20 steps x 1,024 tokens at 100K tokens/s: everything "fits"; 2 at once;
    # each step of the fake takes 0.1 s, so a run needs ~2 s: a 1.2 s call stops both midway
    pl = _pl(alone_tps={"8k": 1e5, "32k": 1e5}, startup_s=0.5, parallel=2, usable_gib=None)
    msgs = []
    r = _go(p, work, 1.2, fake, pl, msgs)
    assert sorted(r["ran"]) == ["c8k_dense_s1", "c8k_msa_s1"]
    assert r["status"]["c8k_dense_s1"] == r["status"]["c8k_msa_s1"] == "partial"
    assert "needs c8k_dense_s1" in r["later"]["c8k_dense_to_msa_s1"]
    notes = _notes(tmp_path)
    assert len(notes) == 2 and all(n.get("stopped") for n in notes)
    assert notes[0]["port"] != notes[1]["port"] and all(n["world"] is None for n in notes)  # own ports, no launcher env
    assert max(n["t0"] for n in notes) < min(n["t1"] for n in notes)  # they ran at the same time
    for name in ("c8k_dense_s1", "c8k_msa_s1"):
        info = json.loads((work / "runs" / name / "run.json").read_text())
        seg = info["segments"][0]
        assert seg["stopped"] and not info["complete"] and 0 < info["step"] < 20
        assert 0.6 < seg["budget_s"] <= 1.2 and seg["shared_max"] == 2 and seg["shared_mean"] > 1.5
        assert set(seg["tokens_per_s_by_shared"]) == {"2"}
        assert seg["port"] == int(next(n["port"] for n in notes if n["name"] == name))
    # next call on the same machine: both partial runs resume together first, then the
    # conversion (its budget is what was left when it started)
    msgs.clear()
    r = _go(p, work, 20, fake, pl, msgs)
    assert r["ran"][-1] == "c8k_dense_to_msa_s1" and set(r["status"].values()) == {"complete"}
    notes = _notes(tmp_path)[2:]
    first_two = [n for n in notes if n["name"] != "c8k_dense_to_msa_s1"]
    conv = next(n for n in notes if n["name"] == "c8k_dense_to_msa_s1")
    assert max(n["t0"] for n in first_two) < min(n["t1"] for n in first_two)
    dense_end = next(n["t1"] for n in first_two if n["name"] == "c8k_dense_s1")
    assert conv["t0"] >= dense_end  # waited for the dense checkpoint
    for name in ("c8k_dense_s1", "c8k_msa_s1"):
        info = json.loads((work / "runs" / name / "run.json").read_text())
        assert info["complete"] and len(info["segments"]) == 2 and info["shared_max"] == 2
        assert info["segments"][1]["from_step"] == info["segments"][0]["to_step"] > 0
        steps = [json.loads(ln)["step"] for ln in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 21))
        assert info["segments"][1]["trainer_tokens_per_s"] == 1000
    cseg = json.loads((work / "runs" / "c8k_dense_to_msa_s1" / "run.json").read_text())["segments"][0]
    # what was left of the 20 s call when it started (t0: the fakes' own start times, so the
    # comparison is within their start-up jitter; a fast machine finishes the resumed runs in < 1 s)
    left = 20 - (conv["t0"] - min(n["t0"] for n in first_two))
    assert cseg["budget_s"] < 20 and abs(cseg["budget_s"] - left) < 0.6, (cseg["budget_s"], left)
    tar = piece.pack(work, r["ran"], tmp_path / "out" / "piece.tar.gz", {"ran": r["ran"]})
    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert {"c8k_msa_s1/run.json", "c8k_dense_to_msa_s1/metrics.jsonl", "piece.json"} <= names
    assert not any("checkpoints" in n for n in names)


def test_fresh_runs_start_only_if_they_fit_and_oom_is_queued_again(tmp_path, fake, monkeypatch):
    p = _tiny(entries=(("8k", "dense", (1,)), ("8k", "msa", (1,)), ("8k", "swa", (1,))))
    # planned: 0.2 s start-up + 20,480 tokens at 10,240/s = 2.2 s alone; shared by 2 (e=0.5):
    # 0.2 + 2.67 = 2.9 s; by 3: 0.2 + 3.0 = 3.2 s. A 3.0 s call: two start, the third would not finish
    pl = _pl(alone_tps={"8k": 10240.0, "32k": 1.0}, startup_s=0.2, parallel=3, usable_gib=None)
    msgs = []
    r = _go(p, tmp_path / "work", 3.0, fake, pl, msgs)
    started = {n["name"] for n in _notes(tmp_path)}
    assert started == {"c8k_dense_s1", "c8k_msa_s1"} and "would not finish" in r["later"]["c8k_swa_s1"]
    assert any(m.startswith("[piece] not now: c8k_swa_s1: would not finish") for m in msgs)
    # out of memory: the msa run's first attempt dies; it is queued again and completes alone
    # once the GPU holds no more than what still runs
    work2 = tmp_path / "work2"
    (tmp_path / "fake.log").unlink()
    monkeypatch.setenv("FAKE_OOM", "c8k_msa_s1")
    p2 = _tiny(entries=(("8k", "dense", (1,)), ("8k", "msa", (1,))))
    pl2 = _pl(alone_tps={"8k": 1e6, "32k": 1e6}, startup_s=0.1, parallel=2, usable_gib=None)
    r = _go(p2, work2, 20, fake, pl2, msgs)
    assert set(r["status"].values()) == {"complete"}
    assert any("ran out of GPU memory with 2 runs sharing: at most 1 at once" in m for m in msgs)
    segs = json.loads((work2 / "runs" / "c8k_msa_s1" / "run.json").read_text())["segments"]
    assert [s["rc"] for s in segs] == [1, 0] and segs[1]["shared_max"] == 1
    assert set(segs[1]["tokens_per_s_by_shared"]) == {"1"} and "1" in r["sharing"]["8k"]["tokens_per_s"]
    notes = _notes(tmp_path)
    dense_end = next(n["t1"] for n in notes if n["name"] == "c8k_dense_s1")
    assert next(n["t0"] for n in notes if n["name"] == "c8k_msa_s1" and n["rc"] == 0 and "stopped" not in n) \
        >= dense_end - 0.2


def test_driver_interrupted_stops_and_records_the_runs(tmp_path, fake):
    p = _tiny(entries=(("8k", "dense", (1,)), ("8k", "msa", (1,))))
    pl = _pl(alone_tps={"8k": 1e6, "32k": 1e6}, startup_s=0.1, parallel=2, usable_gib=None)
    msgs = []

    def log(m):  # the driver gets SIGTERM (-> KeyboardInterrupt) once both runs are going
        msgs.append(m)
        if m.startswith("[piece] start c8k_msa_s1"):
            time.sleep(0.5)
            raise KeyboardInterrupt

    r = piece.run_piece(p, tmp_path / "work", 60, [], str(fake), REPO, "cpu", "c0ffee", grace_s=0.0,
                        min_slice_s=0.3, poll_s=0.05, log=log, plan=pl)
    assert r["interrupted"] and sorted(r["ran"]) == ["c8k_dense_s1", "c8k_msa_s1"]
    for name in r["ran"]:
        seg = json.loads((tmp_path / "work" / "runs" / name / "run.json").read_text())["segments"][0]
        assert seg["stopped"] and seg["rc"] == 0 and not seg["killed"]
    assert any("driver interrupted" in m for m in msgs)


def test_free_port_avoids_taken_and_is_bindable():
    a = piece.free_port([])
    with socket.socket() as s:
        s.bind(("127.0.0.1", a))
    taken = list({piece.free_port([]) for _ in range(5)})
    assert piece.free_port(taken) not in taken


# --------------------------------------------------------------------------- report on any subset
def _done_run(root: Path, name: str, loss: float, run_extra=None, buckets=None, complete=True):
    d = root / name
    d.mkdir(parents=True)
    b = buckets or {"d8_64": 0.9, "d160_248": 0.5}
    recs = [{"step": s, "lm_loss": loss + 1 / s, "tokens": s * 1000,
             **({"val_lm_loss": loss, "val_assoc_recall_acc": sum(b.values()) / len(b),
                 **{f"val_assoc_recall_acc/{k}": v for k, v in b.items()}} if s == 4 else {})} for s in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    info = {"name": name, "complete": complete, "step": 4, "total_steps": 4, "tokens": 4000, "wall_s": 10.0,
            "devices": ["1 x NVIDIA H100"], "commits": ["abc"]}
    info.update(run_extra or {})
    (d / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("subset", ["empty", "only32k", "ablations_and_conversion", "one_each", "no_run_json_fields"])
def test_scale_report_on_any_subset(tmp_path, subset):
    from msa_megatron.experiments.fidelity.scale_report import BEGIN, scale_report

    p = SCALE_PRESETS["scale_cpu"]
    res = tmp_path / "res"
    res.mkdir()
    if subset == "only32k":
        _done_run(res, "c32k_dense_s1", 2.0, {"shared_mean": 1.0, "shared_max": 1})
        _done_run(res, "c32k_msa_s1", 2.01, {"shared_mean": 1.6, "shared_max": 2})
    elif subset == "ablations_and_conversion":  # the conversion without its dense run
        for v in ("msa_no_warmup", "msa_no_teacher", "dense_to_msa"):
            _done_run(res, f"c8k_{v}_s1", 2.2)
    elif subset == "one_each":
        for v in ("dense", "msa", "swa"):
            _done_run(res, f"c8k_{v}_s1", 2.0, {"shared_mean": 2.5, "shared_max": 3})
        _done_run(res, "c8k_dense_s2", 2.1, complete=False)
    elif subset == "no_run_json_fields":  # a run.json from before --parallel (no sharing fields)
        _done_run(res, "c8k_dense_s1", 2.0)
    out = scale_report([res, tmp_path / "absent"], p, "scale_cpu", tmp_path / "doc.md", tmp_path / "plots",
                       make_plots=False)
    text = (tmp_path / "doc.md").read_text()
    col = out["collected"]
    assert BEGIN in text and len(col["runs"]) + len(col["unfinished"]) + len(col["missing"]) == 16
    assert "Trained selection recall >= 95% at k=16: **not measured**" in text
    if subset == "empty":
        assert not col["runs"] and "MSA held-out loss within 1% of dense at 8K: **not measured**" in text
    if subset == "only32k":
        assert "| `c32k_msa_s1` |" in text and "| 1.6 / 2 |" in text
        assert "Retrieval at 32k" in text and "MSA held-out loss within 1% of dense at 8K: **not measured**" in text
    if subset == "ablations_and_conversion":
        assert "Dense -> MSA conversion" not in text and "MSA, frozen indexer" in text
    if subset == "one_each":
        assert "fewer than 3 seeds" in text and "| 2.5 / 3 |" in text and "`c8k_dense_s2` (unfinished" in text
    if subset == "no_run_json_fields":
        assert "| `c8k_dense_s1` |" in text and "| - |" in text


def test_runs_of_an_earlier_recipe_do_not_count_and_are_started_afresh(tmp_path, fake):
    from msa_megatron.experiments.fidelity.scale_report import collect_scale

    p1 = _tiny(entries=(("8k", "dense", (1,)),))
    p2 = dataclasses.replace(p1, recipe=2)
    done = tmp_path / "done"
    _done_run(done, "c8k_dense_s1", 2.0)  # a run.json without "recipe": recipe 1
    assert piece.matrix_status(p1, tmp_path / "w", [done]) == {"c8k_dense_s1": "complete"}
    assert piece.matrix_status(p2, tmp_path / "w", [done]) == {"c8k_dense_s1": "missing"}
    col = collect_scale([done], p2)
    assert not col["runs"] and col["missing"] == ["c8k_dense_s1"] and col["other_recipe"] == {"c8k_dense_s1": 1}
    # on the machine: a recipe-1 run stopped midway with its checkpoint is not resumed under recipe 2
    work = tmp_path / "machine" / "work"
    pl = _pl(alone_tps={"8k": 1e5, "32k": 1e5}, startup_s=0.5, parallel=1, usable_gib=None)
    msgs = []
    _go(p1, work, 1.0, fake, pl, msgs)
    assert piece.run_recipe(work / "runs" / "c8k_dense_s1") == 1 and piece.has_checkpoint(work / "runs" / "c8k_dense_s1", 1)
    assert not piece.has_checkpoint(work / "runs" / "c8k_dense_s1", 2)
    msgs.clear()
    r = _go(p2, work, 20, fake, pl, msgs)
    assert r["status"] == {"c8k_dense_s1": "complete"}
    assert any("holds recipe 1, the preset is at recipe 2: starting it afresh" in m for m in msgs)
    info = json.loads((work / "runs" / "c8k_dense_s1" / "run.json").read_text())
    assert info["recipe"] == 2 and len(info["segments"]) == 1 and info["segments"][0]["from_step"] == 0


def test_scale_spec_carries_the_recipe_data_and_answer_weight():
    p = dataclasses.replace(SCALE_PRESETS["scale_cpu"], corpus_packages=("torch",), recall_answer_weight=8.0)
    ov = scale_mod.spec(p, "c8k_msa_s1", "/w").overrides
    assert "data.corpus.packages=[torch]" in ov and "data.assoc_recall.answer_loss_weight=8.0" in ov
    plain = scale_mod.spec(SCALE_PRESETS["scale_cpu"], "c8k_msa_s1", "/w").overrides
    assert not any(o.startswith(("data.corpus.packages", "data.assoc_recall.answer_loss_weight")) for o in plain)


def test_planning_prefers_the_segments_of_this_device(tmp_path):
    """Run 17's H200 trained at 0.63x run 16's H100: a call plans from its own device's segments
    where there are any, from all of them otherwise."""
    p = SCALE_PRESETS["scale"]
    h100, h200 = "1 x NVIDIA H100 80GB HBM3", "1 x NVIDIA H200"
    _seg_run(tmp_path / "done", "c8k_dense_s1", [{"tokens_per_s": 400e3, "shared_mean": 1.0, "device": h100}])
    _seg_run(tmp_path / "done", "c8k_dense_s2", [{"tokens_per_s": 420e3, "shared_mean": 1.0, "device": h100}])
    _seg_run(tmp_path / "done", "c8k_dense_s3", [{"tokens_per_s": 250e3, "shared_mean": 1.0, "device": h200}])
    _seg_run(tmp_path / "done", "c8k_msa_s1", [{"tokens_per_s": 90e3, "shared_mean": 1.0, "device": h100}])
    here = planning(p, tmp_path / "w", [tmp_path / "done"], device=h200)
    assert here.alone("8k", "dense") == 250e3 and "measured, 1 segments alone on this device" in here.describe()
    assert here.alone("8k", "msa") == 90e3  # no H200 segment of this kind: all devices'
    assert planning(p, tmp_path / "w", [tmp_path / "done"], device=h100).alone("8k", "dense") == 420e3  # median of 2
    assert planning(p, tmp_path / "w", [tmp_path / "done"]).alone("8k", "dense") == 400e3  # median of all 3

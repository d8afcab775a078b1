"""Piecewise execution of the scale matrix (issue 19): run the next missing runs within a
time budget, several at once on one GPU, resume unfinished ones, pack small results.

A GPU lending is short (one call <= 10 min, ~30 min per machine) and its disk is lost when
the machine goes back, so:

* results are keyed by run name; a run is *complete* when its metrics reach its last step
  (the trainer exits 0 also on SIGTERM, so the exit code alone does not say so);
* runs already complete in any ``--done`` directory (the results copied back earlier,
  e.g. ``results/fidelity_scale`` in the repo) are skipped;
* up to ``parallel`` runs share the GPU, each its own ``python -m msa_megatron.train`` process
  with its own ``MASTER_PORT`` (free, and distinct from the other live runs' ports);
* a fresh run starts only if the planner expects it to finish within the call without
  pushing a run that would have finished past the end (partial runs always resume; the
  first run of a call starts anyway, so a 32K run that needs two calls gets going);
* at the budget every running trainer gets SIGTERM, saves a checkpoint and exits; the next
  call *on the same warm machine* resumes it from the work directory (checkpoints are
  hundreds of MB: they never travel). On a fresh machine an unfinished run starts again;
* each run directory gets ``run.json``: segments (wall time, device, commit, steps, port, its
  budget, how many runs shared the GPU, tokens/s), tokens, completeness; the tarball holds
  only metrics/summary/config/run.json per run (KBs).

Planning model (:class:`Planning`): one run alone does ``est_tokens_per_s`` of its context
after ``startup_s``; K runs together deliver ``1 + (K - 1) e`` times that (``e`` =
``share_efficiency``, a guess until measured), shared equally. Measured segments of earlier
calls (``run.json``) and the live progress of the running runs replace the guesses for the
alone throughput, the start-up and the memory; ``e`` stays a knob (the records give each
segment's sharing, from which it can be read off).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .scale import ScalePreset, cost_kind, parse_name, run_names, spec

SMALL_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "recall_sweep.json", "run.json")
#: memory a measured run needs beyond its logged max_memory_allocated (CUDA context, allocator slack)
MEM_SLACK_GIB = 1.5
MEM_SLACK_FRAC = 0.10


def _steps_of(overrides: List[str]) -> int:
    return int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.steps=")))


def _records(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for ln in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(ln)
            except ValueError:  # a line torn by a kill: not a record
                continue
            if isinstance(r, dict):
                out.append(r)
    return out


def last_step(run_dir: Path) -> int:
    return max([r["step"] for r in _records(run_dir) if isinstance(r.get("step"), int)], default=0)


def read_run_json(run_dir: Path) -> Dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recipe_of(info: Dict) -> int:
    """The preset recipe of a run.json's contents (1 before recipes were recorded)."""
    return int(info.get("recipe", 1))


def run_recipe(run_dir: Path) -> int:
    return recipe_of(read_run_json(run_dir))


def is_complete(run_dir: Path, recipe: Optional[int] = None) -> bool:
    """Complete (and, given ``recipe``, recorded under it: another recipe's run does not count)."""
    info = read_run_json(run_dir)
    return bool(info.get("complete")) and (recipe is None or recipe_of(info) == recipe)


def has_checkpoint(run_dir: Path, recipe: Optional[int] = None) -> bool:
    """A checkpoint to resume from (given ``recipe``: only one of a run recorded under it)."""
    return (Path(run_dir) / "checkpoints" / "latest").exists() and (
        recipe is None or not (Path(run_dir) / "run.json").is_file() or run_recipe(run_dir) == recipe)


def matrix_status(preset: ScalePreset, work: Path, done_dirs: List[Path], rerun: Sequence[str] = ()) -> Dict[str, str]:
    """{run name: "complete" | "partial" (resumable here) | "missing"} in launch order. Runs named
    in ``rerun`` count as complete only once they completed again here (in ``work``), e.g. runs
    recorded before a new held-out probe that should score them too."""
    out = {}
    rc = preset.recipe
    for name in run_names(preset):
        done = [] if name in rerun else done_dirs
        if any(is_complete(d / name, rc) for d in done) or is_complete(work / "runs" / name, rc):
            out[name] = "complete"
        elif has_checkpoint(work / "runs" / name, rc):
            out[name] = "partial"
        else:
            out[name] = "missing"
    return out


def todo(preset: ScalePreset, work: Path, done_dirs: List[Path], only: Optional[List[str]] = None,
         rerun: Sequence[str] = ()) -> List[str]:
    """Runs to (re)start, in order: partial runs first (they resume), then the preset's launch
    order, or ``only``'s when given (run 15 wanted the 32K MSA run before the window, and got the
    window first). A run whose dependency's checkpoint is not in the work directory (the
    conversion's dense run, a curriculum's base) gets that run again before it, and so on down
    the chain (32K <- 8K <- base)."""
    st = matrix_status(preset, work, done_dirs, rerun)
    names = [n for n in st if st[n] != "complete" and (only is None or n in only)]
    if only is not None:
        names.sort(key=list(only).index)
    names.sort(key=lambda n: st[n] != "partial")
    out: List[str] = []

    def missing_deps(name: str) -> List[str]:
        dep = spec(preset, name, str(work)).depends_on
        if dep is None or (is_complete(work / "runs" / dep, preset.recipe)
                           and has_checkpoint(work / "runs" / dep, preset.recipe)):
            return []
        return missing_deps(dep) + [dep]

    for n in names:
        for m in missing_deps(n) + [n]:
            if m not in out:
                out.append(m)
    return out


# --------------------------------------------------------------------------- planning
def gain(n: int, eff: float) -> float:
    """Throughput of ``n`` runs sharing the GPU, relative to one run alone."""
    return 1.0 + (max(n, 1) - 1) * eff


@dataclass
class Planning:
    """The planner's knobs and what calibrated them (``source``)."""

    alone_tps: Dict[str, float]             # tokens/s of one run alone, per context, and per "ctx/kind" where known
    startup_s: float
    share_efficiency: float
    peak_gib: Dict[str, float]              # GPU memory per run, per context (0 = unknown)
    usable_gib: Optional[float] = None      # GPU memory the runs may use (None: no GPU / unknown)
    parallel: Optional[int] = None          # None = automatic (from memory)
    max_parallel: int = 4
    fit_margin: float = 0.10                # a fresh run must finish with this fraction of its time to spare
    source: Dict[str, str] = field(default_factory=dict)

    def cap(self, ctx: str) -> int:
        """Most runs of context ``ctx`` that may share the GPU."""
        if self.parallel:
            return self.parallel
        if not self.usable_gib or not self.peak_gib.get(ctx):
            return 1
        return max(1, min(self.max_parallel, int(self.usable_gib // self.peak_gib[ctx])))

    def alone(self, ctx: str, kind: str = "") -> float:
        """Tokens/s of one run alone: its cost kind's figure where known, else its context's."""
        return self.alone_tps.get(f"{ctx}/{kind}", self.alone_tps[ctx])

    def per_run_tps(self, ctx: str, n: int, kind: str = "") -> float:
        return self.alone(ctx, kind) * gain(n, self.share_efficiency) / max(n, 1)

    def describe(self) -> str:
        def tps(c: str) -> str:
            kinds = [k for k in self.alone_tps if k.startswith(c + "/")]
            return ", ".join(f"{k.split('/', 1)[1] + ' ' if '/' in k else ''}{self.alone_tps[k] / 1e3:.0f}K tok/s alone "
                             f"({self.source.get('tps_' + k, 'planned')})" for k in (kinds or [c]))
        ctxs = ", ".join(f"{c}: {tps(c)}, {self.peak_gib.get(c, 0):.0f} GiB/run "
                         f"({self.source.get('peak_' + c, 'planned')}), up to {self.cap(c)} at once"
                         for c in self.alone_tps if "/" not in c)
        gpu = f"{self.usable_gib:.0f} GiB usable" if self.usable_gib else "GPU memory unknown"
        return (f"parallel={'auto' if not self.parallel else self.parallel} ({gpu}); {ctxs}; start-up "
                f"{self.startup_s:.0f}s ({self.source.get('startup', 'planned')}); sharing efficiency "
                f"e={self.share_efficiency:g} (a knob, not measured: K runs give 1+(K-1)e x one run's throughput); "
                f"fit margin {100 * self.fit_margin:.0f}%")


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x and x > 0)
    return xs[len(xs) // 2] if xs else None


def planning(preset: ScalePreset, work: Path, done_dirs: List[Path], parallel: Optional[int] = None,
             share_efficiency: Optional[float] = None, gpu_mem_gib: Optional[float] = None,
             fit_margin: float = 0.10, device: Optional[str] = None) -> Planning:
    """The preset's estimates, replaced by what earlier segments measured (any run.json and
    metrics.jsonl under ``work/runs`` and the ``done`` directories). With ``device`` (as segments
    record it, e.g. "1 x NVIDIA H200"), a kind's tokens/s comes from that device's segments where
    there are any: run 17's H200 trained at 0.63x the H100's rate."""
    eff = preset.share_efficiency if share_efficiency is None else share_efficiency
    alone = {c: x.est_tokens_per_s for c, x in preset.contexts.items()}
    alone.update({f"{c}/{k}": v for c, x in preset.contexts.items() for k, v in x.est_tokens_per_s_by_kind})
    pl = Planning(alone_tps=alone, startup_s=preset.startup_s,
                  share_efficiency=eff, peak_gib={c: x.est_peak_gib for c, x in preset.contexts.items()},
                  usable_gib=0.9 * gpu_mem_gib if gpu_mem_gib else None, parallel=parallel,
                  max_parallel=preset.max_parallel, fit_margin=fit_margin)
    # per scope ("all" segments, "here": those of ``device``): tokens/s per "ctx/kind", scaled by e,
    # and the same from segments that ran alone (preferred: no e in them)
    seen: Dict[str, Tuple[Dict[str, List[float]], Dict[str, List[float]]]] = {"all": ({}, {}), "here": ({}, {})}
    peaks: Dict[str, List[float]] = {c: [] for c in preset.contexts}
    starts: List[float] = []
    for root in [Path(work) / "runs", *map(Path, done_dirs)]:
        if not root.is_dir():
            continue
        for rd in sorted(root.iterdir()):
            try:
                ctx, variant, _ = parse_name(rd.name)
            except ValueError:
                continue
            if ctx not in peaks:
                continue
            for seg in read_run_json(rd).get("segments", []):
                if seg.get("tokens_per_s") and seg.get("shared_mean"):
                    n = seg["shared_mean"]
                    key = f"{ctx}/{cost_kind(variant)}"
                    for scope in ["all"] + (["here"] if device and seg.get("device") == device else []):
                        tps, alone_seen = seen[scope]
                        tps.setdefault(key, []).append(seg["tokens_per_s"] * n / (1.0 + (n - 1.0) * eff))
                        if n <= 1.1:
                            alone_seen.setdefault(key, []).append(seg["tokens_per_s"])
                if seg.get("startup_s"):
                    starts.append(seg["startup_s"])
            peaks[ctx] += [r["peak_mem_gib"] for r in _records(rd) if isinstance(r.get("peak_mem_gib"), (int, float))]
    for key in seen["all"][0]:
        scope = "here" if key in seen["here"][0] else "all"
        tps, alone_seen = seen[scope]
        if key not in alone_seen and key in pl.alone_tps:
            continue  # shared segments scaled by the e knob do not override the preset's per-kind figure
        xs, how = (alone_seen[key], "alone") if key in alone_seen else (tps[key], "shared, scaled by e")
        where = " on this device" if scope == "here" else ""
        if _median(xs):
            pl.alone_tps[key], pl.source["tps_" + key] = _median(xs), f"measured, {len(xs)} segments {how}{where}"
    for c in preset.contexts:
        if peaks[c]:
            pl.peak_gib[c] = max(peaks[c]) * (1 + MEM_SLACK_FRAC) + MEM_SLACK_GIB
            pl.source["peak_" + c] = f"measured {max(peaks[c]):.1f} GiB + slack"
    if _median(starts):
        pl.startup_s, pl.source["startup"] = _median(starts), f"measured, {len(starts)} segments"
    return pl


@dataclass
class Load:
    """What is left of one run, for :func:`simulate`."""

    name: str
    ctx: str
    startup_left: float
    tokens_left: float
    kind: str = ""  # cost kind (scale.cost_kind): its own throughput where the planning knows it


def simulate(loads: Sequence[Load], pl: Planning, horizon: float) -> Dict[str, Optional[float]]:
    """Seconds from now until each load finishes when they all share the GPU (``None``: not
    within ``horizon``). A run in start-up counts as sharing but is not slowed."""
    active = [Load(x.name, x.ctx, max(0.0, x.startup_left), max(0.0, x.tokens_left), x.kind) for x in loads]
    out: Dict[str, Optional[float]] = {}
    t = 0.0
    while active:
        n = len(active)
        dts = [x.startup_left if x.startup_left > 0 else x.tokens_left / pl.per_run_tps(x.ctx, n, x.kind) for x in active]
        dt = min(dts)
        if t + dt > horizon:
            out.update({x.name: None for x in active})
            break
        t += dt
        for x, d in zip(active, dts):
            if x.startup_left > 0:
                x.startup_left = 0.0 if d <= dt + 1e-9 else x.startup_left - dt
            else:
                x.tokens_left = 0.0 if d <= dt + 1e-9 else x.tokens_left - dt * pl.per_run_tps(x.ctx, n, x.kind)
        for x in [x for x in active if x.startup_left <= 0 and x.tokens_left <= 0]:
            out[x.name] = t
            active.remove(x)
    return out


def admit(cand: Load, running: Sequence[Load], pl: Planning, time_left: float, first_of_call: bool,
          resumable: bool) -> Optional[str]:
    """None if ``cand`` may start now next to ``running``, else why not (one line)."""
    n = len(running) + 1
    cap = min([pl.cap(cand.ctx)] + [pl.cap(r.ctx) for r in running])
    if n > cap:  # automatic: n <= usable // peak of every run, so their memory adds up to <= usable
        return f"the GPU holds {cap} run(s) at once"
    if resumable or first_of_call:
        return None
    before = simulate(running, pl, time_left)
    after = simulate([*running, cand], pl, time_left / (1 + pl.fit_margin))
    mine = after[cand.name]
    if mine is None:
        full = simulate([*running, cand], pl, float("inf"))[cand.name]
        return (f"would not finish: ~{full:.0f}s with {n} run(s) on the GPU, +{100 * pl.fit_margin:.0f}% margin, "
                f"{time_left:.0f}s left")
    pushed = [r.name for r in running if before.get(r.name) is not None and
              (after.get(r.name) is None or after[r.name] * (1 + pl.fit_margin) > time_left)]
    if pushed:
        return f"would push {', '.join(pushed)} past the end of the call"
    return None


# --------------------------------------------------------------------------- execution
def _update_run_json(run_dir: Path, name: str, total_steps: int, segment: Dict, tokens_per_step: int,
                     recipe: int = 1) -> Dict:
    info = read_run_json(run_dir) or {"name": name, "segments": []}
    info["recipe"] = recipe
    info["segments"].append(segment)
    step = last_step(run_dir)
    segs = info["segments"]
    wall = sum(s.get("wall_s", 0) for s in segs)
    info.update(total_steps=total_steps, step=step, tokens=step * tokens_per_step,
                complete=step >= total_steps and segment.get("rc") == 0,
                wall_s=round(wall, 1),
                devices=sorted({s.get("device", "?") for s in segs}),
                commits=sorted({s.get("commit", "?") for s in segs}),
                # how many runs shared the GPU (wall-time weighted over the segments; 1 = alone)
                shared_mean=round(sum(s.get("shared_mean", 1) * s.get("wall_s", 0) for s in segs) / wall, 2)
                if wall else None,
                shared_max=max(s.get("shared_max", 1) for s in segs))
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return info


def free_port(taken: Sequence[int]) -> int:
    """A TCP port free now and not in ``taken`` (the ports of this driver's live runs)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free TCP port for MASTER_PORT after 100 tries")


@dataclass
class _Run:
    """A launched trainer process and what the driver observed of it."""

    name: str
    ctx: str
    kind: str
    total_steps: int
    tokens_per_step: int
    from_step: int
    t0: float
    budget_s: float
    port: int
    proc: subprocess.Popen
    samples: List[Tuple[float, int, int]] = field(default_factory=list)  # (time, step, runs on the GPU) at each new step
    shared_s: float = 0.0                                           # integral of runs sharing over time
    watched_s: float = 0.0
    shared_max: int = 1
    n_since: float = 0.0                                            # when the sharing count last changed
    n_last: int = 0
    stopped: bool = False
    killed: bool = False

    def load(self, now: float, pl: Planning) -> Load:
        step = self.samples[-1][1] if self.samples else self.from_step
        started = bool(self.samples)
        return Load(self.name, self.ctx, 0.0 if started else max(pl.startup_s - (now - self.t0), 5.0),
                    max(0, self.total_steps - step) * self.tokens_per_step, self.kind)

    def rates_by_shared(self, min_s: float) -> Dict[str, int]:
        """{runs on the GPU: tokens/s} over the stretches between observed steps where that
        count did not change (counts observed for less than ``min_s`` in all are left out: a
        few steps say little): the raw material for the sharing efficiency."""
        acc: Dict[int, List[float]] = {}
        for a, b in zip(self.samples, self.samples[1:]):
            if a[2] == b[2] and b[0] > a[0]:
                x = acc.setdefault(b[2], [0.0, 0.0])
                x[0] += (b[1] - a[1]) * self.tokens_per_step
                x[1] += b[0] - a[0]
        return {str(k): round(v[0] / v[1]) for k, v in sorted(acc.items()) if v[1] > 0 and v[1] >= min_s}

    def rate(self, min_window_s: float) -> Optional[float]:
        """Tokens/s over the samples since the sharing count last changed (None: too few)."""
        xs = [s for s in self.samples if s[0] >= self.n_since]
        if len(xs) < 2 or xs[-1][0] - xs[0][0] < min_window_s:
            return None
        return (xs[-1][1] - xs[0][1]) * self.tokens_per_step / (xs[-1][0] - xs[0][0])


def _trainer_stats(run_dir: Path, from_step: int) -> Dict:
    recs = [r for r in _records(run_dir) if isinstance(r.get("step"), int) and r["step"] > from_step]
    tps = [r["tokens_per_s"] for r in recs if isinstance(r.get("tokens_per_s"), (int, float))]
    peaks = [r["peak_mem_gib"] for r in recs if isinstance(r.get("peak_mem_gib"), (int, float))]
    out = {}
    if tps:
        out["trainer_tokens_per_s"] = round(sum(tps) / len(tps))  # the trainer's own, training steps only
    if peaks:
        out["peak_mem_gib"] = round(max(peaks), 2)
    return out


def run_piece(preset: ScalePreset, work: Path, budget_s: float, done_dirs: List[Path], python: str, repo: Path,
              device: str, commit: str, only: Optional[List[str]] = None, dry_run: bool = False,
              min_slice_s: float = 60.0, grace_s: float = 60.0, log: Callable[[str], None] = print,
              plan: Optional[Planning] = None, poll_s: float = 1.0, calib_window_s: float = 20.0,
              kill_after_s: float = 30.0, min_rate_s: float = 10.0, rerun: Sequence[str] = (),
              software: Optional[Dict[str, str]] = None) -> Dict:
    """Run ``todo`` until ``budget_s`` is spent, up to ``plan.cap`` runs at once; returns
    {"ran": [...], "planned": [...], "status": {...}, "plan": [...]}. ``grace_s`` of the budget
    is kept for the SIGTERM checkpoints and packing; a run still alive ``kill_after_s`` after
    the budget is killed (its checkpoint may then be missing). ``software`` (torch, CUDA, cuDNN,
    Triton, driver versions) goes into every segment: copies of one run on two lendings may differ
    by the machine image, not only by GPU nondeterminism (run 17)."""
    work = Path(work)
    pl = plan or planning(preset, work, done_dirs)
    queue = todo(preset, work, done_dirs, only, rerun)
    log(f"[piece] planning: {pl.describe()}")
    if dry_run:
        rows = plan_call(preset, work, queue, pl, budget_s - grace_s, min_slice_s)
        for r in rows:
            s = spec(preset, r["name"], str(work))
            if r["start"] is None:
                log(f"[piece] a later call: {r['name']} ({r['why']})")
            else:
                end = "beyond this call (resumes next call on a warm machine)" if r["end"] is None \
                    else f"ends ~{r['end']:.0f}s"
                log(f"[piece] this call: {r['name']} starts ~{r['start']:.0f}s, {end}, up to {r['shared_max']} "
                    "run(s) on the GPU meanwhile: " + " ".join(s.overrides))
        return {"ran": [], "planned": queue, "plan": rows, "sharing": {}, "interrupted": False,
                "later": {r["name"]: r["why"] for r in rows if r["start"] is None},
                "status": matrix_status(preset, work, done_dirs, rerun)}

    t_start = time.time()
    t_stop = t_start + budget_s - grace_s   # SIGTERM to every run still going
    t_end = t_start + budget_s
    running: List[_Run] = []
    ran: List[str] = []
    skipped: Dict[str, str] = {}
    oom_retried: set = set()
    live: Dict = {"cap": None, "tps": {}, "startup": None}  # this call's measurements (cap: after an OOM)
    planned = list(queue)
    by_shared: Dict[str, List[Dict[str, int]]] = {}
    interrupted = False
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def calibrated() -> Planning:
        """``pl`` with the alone throughput and start-up measured on this call's runs so far."""
        est: Dict[str, List[float]] = {}
        for r in running:
            x = r.rate(calib_window_s)
            if x:
                est.setdefault(f"{r.ctx}/{r.kind}", []).append(x * len(running) / gain(len(running), pl.share_efficiency))
            if r.samples:
                live["startup"] = r.samples[0][0] - r.t0
        live["tps"].update({c: sum(xs) / len(xs) for c, xs in est.items()})
        q = Planning(**{**pl.__dict__, "alone_tps": {**pl.alone_tps, **live["tps"]}, "source": dict(pl.source)})
        if live["startup"] is not None:
            q.startup_s = live["startup"]
        if live["cap"] is not None:
            q.parallel = min(live["cap"], q.parallel or live["cap"])
        return q

    def ready(name: str) -> bool:
        dep = spec(preset, name, str(work)).depends_on
        return dep is None or (is_complete(work / "runs" / dep, preset.recipe)
                               and has_checkpoint(work / "runs" / dep, preset.recipe))

    def start(name: str, now: float) -> None:
        s = spec(preset, name, str(work))
        run_dir = work / "runs" / name
        if (run_dir / "run.json").is_file() and run_recipe(run_dir) != preset.recipe:
            log(f"[piece] {name}: its directory holds recipe {run_recipe(run_dir)}, the preset is at recipe "
                f"{preset.recipe}: starting it afresh")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port([r.port for r in running])
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(repo) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        cmd = [python, "-m", "msa_megatron.train", *s.overrides]
        ctx, variant, _ = parse_name(name)
        c = preset.contexts[ctx]
        from_step = last_step(run_dir)
        fh = open(work / "logs" / f"{name}.log", "a")
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        r = _Run(name, ctx, cost_kind(variant), _steps_of(s.overrides), c.global_batch_size * c.seq_length, from_step, now,
                 round(t_stop - now, 1), port, proc, n_since=now)
        running.append(r)
        log(f"[piece] start {name} at step {from_step} (port {port}, {len(running)} running, its budget "
            f"{r.budget_s:.0f}s): {' '.join(cmd[3:])}")

    def finish(r: _Run, now: float) -> None:
        run_dir = work / "runs" / r.name
        steps_seen = r.samples
        seg = {"from_step": r.from_step, "to_step": last_step(run_dir), "rc": r.proc.returncode,
               "wall_s": round(now - r.t0, 1), "device": device, "commit": commit,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r.t0)), "stopped": r.stopped,
               "killed": r.killed, "port": r.port, "budget_s": r.budget_s,
               "parallel": pl.parallel or "auto",
               "shared_mean": round(r.shared_s / r.watched_s, 2) if r.watched_s else 1.0,
               "shared_max": r.shared_max}
        if software:
            seg["software"] = dict(software)
        if steps_seen:
            seg["startup_s"] = round(steps_seen[0][0] - r.t0, 1)
        if len(steps_seen) >= 2 and steps_seen[-1][0] > steps_seen[0][0]:
            # wall clock from the first observed step to the last (evaluations included)
            seg["tokens_per_s"] = round((steps_seen[-1][1] - steps_seen[0][1]) * r.tokens_per_step
                                        / (steps_seen[-1][0] - steps_seen[0][0]))
        seg["tokens_per_s_by_shared"] = r.rates_by_shared(min_rate_s)
        seg.update(_trainer_stats(run_dir, r.from_step))
        by_shared.setdefault(r.ctx, []).append(seg["tokens_per_s_by_shared"])
        info = _update_run_json(run_dir, r.name, r.total_steps, seg, r.tokens_per_step, preset.recipe)
        log(f"[piece] {r.name}: exit {r.proc.returncode}, step {info['step']}/{info['total_steps']}, "
            f"{'complete' if info['complete'] else 'unfinished'} ({seg['wall_s']:.0f}s this call, shared by "
            f"{seg['shared_mean']} on average, {seg.get('tokens_per_s', '?')} tokens/s)")
        if r.name not in ran:
            ran.append(r.name)
        if r.proc.returncode != 0:
            tail = (work / "logs" / f"{r.name}.log").read_text(errors="replace")[-20000:]
            if "out of memory" in tail.lower() and r.name not in oom_retried and not r.stopped:
                live["cap"] = max(1, len(running))  # the others still run: no more than them at once
                oom_retried.add(r.name)
                queue.insert(0, r.name)
                log(f"[piece] {r.name} ran out of GPU memory with {len(running) + 1} runs sharing: at most "
                    f"{live['cap']} at once for the rest of this call, {r.name} queued again")
            else:
                log(f"[piece] {r.name} failed (see {work / 'logs' / (r.name + '.log')}); going on with the next run")

    try:
        while True:
            now = time.time()
            q = calibrated()
            if not (now >= t_stop - min_slice_s):
                for name in list(queue):
                    if not ready(name):
                        skipped[name] = (f"needs {spec(preset, name, str(work)).depends_on}'s checkpoint "
                                         "on this machine")
                        continue
                    ctx, variant, _ = parse_name(name)
                    rd = work / "runs" / name
                    if is_complete(rd, preset.recipe):  # a dependency re-run whose checkpoint is present
                        queue.remove(name)
                        continue
                    resumable = has_checkpoint(rd, preset.recipe)
                    cand = Load(name, ctx, q.startup_s, max(0, _steps_of(spec(preset, name, str(work)).overrides)
                                                              - (last_step(rd) if resumable else 0))
                                * preset.contexts[ctx].global_batch_size * preset.contexts[ctx].seq_length,
                                cost_kind(variant))
                    why = admit(cand, [r.load(now, q) for r in running], q, t_stop - now,
                                first_of_call=not running and not ran, resumable=resumable)
                    if why is None:
                        queue.remove(name)
                        skipped.pop(name, None)
                        start(name, now)
                    else:
                        if name not in skipped or skipped[name].startswith("needs "):
                            log(f"[piece] not now: {name}: {why}")
                        skipped[name] = why
            if not running:
                break
            time.sleep(poll_s)
            now2 = time.time()
            n = len(running)
            for r in list(running):
                r.shared_s += n * (now2 - now)
                r.watched_s += now2 - now
                r.shared_max = max(r.shared_max, n)
                if n != r.n_last:
                    r.n_last, r.n_since = n, now2
                st = last_step(work / "runs" / r.name)
                if st > (r.samples[-1][1] if r.samples else r.from_step):
                    r.samples.append((now2, st, n))
                if not r.stopped and now2 >= t_stop and r.proc.poll() is None:
                    log(f"[piece] budget reached: SIGTERM to {r.name} (it checkpoints and exits)")
                    r.proc.send_signal(signal.SIGTERM)
                    r.stopped = True
                if r.stopped and now2 >= t_end + kill_after_s and r.proc.poll() is None:
                    log(f"[piece] {r.name} still running {kill_after_s:.0f}s after the budget: killed (its last "
                        "checkpoint may be missing)")
                    r.proc.kill()
                    r.proc.wait()
                    r.killed = True
                if r.proc.poll() is not None:
                    running.remove(r)
                    finish(r, now2)
    except KeyboardInterrupt:  # the driver itself stopped (SIGTERM/Ctrl-C): still record and pack
        interrupted = True
        log("[piece] driver interrupted: stopping the runs, recording and packing what exists")
    finally:  # stop the runs still going, keep their records
        for r in running:
            if r.proc.poll() is None:
                log(f"[piece] SIGTERM to {r.name}")
                r.proc.send_signal(signal.SIGTERM)
                r.stopped = True
        for r in list(running):
            try:
                r.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
                r.killed = True
            running.remove(r)
            finish(r, time.time())
    sharing = measured_sharing(by_shared)
    for c, m in sharing.items():
        log(f"[piece] measured at {c}: " + ", ".join(f"{k} run(s) on the GPU {v / 1e3:.0f}K tokens/s each"
                                                     for k, v in m["tokens_per_s"].items())
            + (f" -> sharing efficiency e ~ {m['e']:.2f} (planned {pl.share_efficiency:g}; --share-eff)"
               if m.get("e") is not None else " (no alone/shared pair: e not measured)"))
    later = {n: skipped.get(n, "not reached") for n in queue}
    if later:
        log("[piece] left for a later call: " + "; ".join(f"{n} ({w})" for n, w in later.items()))
    return {"ran": ran, "planned": planned, "later": later, "sharing": sharing, "interrupted": interrupted,
            "status": matrix_status(preset, work, done_dirs, rerun)}


def measured_sharing(by_shared: Dict[str, List[Dict[str, int]]]) -> Dict[str, Dict]:
    """Per context: mean tokens/s per run at each sharing count, and the efficiency e implied
    by the alone rate and the most shared one (K runs at r_K each vs one at r_1:
    K r_K = (1 + (K - 1) e) r_1)."""
    out = {}
    for ctx, segs in by_shared.items():
        pooled: Dict[str, List[int]] = {}
        for d in segs:
            for k, v in d.items():
                pooled.setdefault(k, []).append(v)
        if not pooled:
            continue
        tps = {k: sum(v) / len(v) for k, v in sorted(pooled.items(), key=lambda kv: int(kv[0]))}
        e = None
        top = max(int(k) for k in tps)
        if "1" in tps and top > 1:
            e = (top * tps[str(top)] / tps["1"] - 1) / (top - 1)
        out[ctx] = {"tokens_per_s": tps, "e": e}
    return out


def plan_call(preset: ScalePreset, work: Path, queue: List[str], pl: Planning, time_s: float,
              min_slice_s: float = 60.0) -> List[Dict]:
    """The schedule :func:`run_piece` would follow if the planning model were exact: rows
    {name, start, end (None: beyond the call), shared_max, why (when not this call)}."""
    queue = list(queue)
    rows: Dict[str, Dict] = {}
    running: List[Load] = []
    done: set = {n for n in queue if is_complete(Path(work) / "runs" / n, preset.recipe)}
    t = 0.0
    started_any = False
    while True:
        if t < time_s - min_slice_s:
            for name in list(queue):
                dep = spec(preset, name, str(work)).depends_on
                if dep and dep not in done and not (is_complete(Path(work) / "runs" / dep, preset.recipe)
                                                    and has_checkpoint(Path(work) / "runs" / dep, preset.recipe)):
                    rows.setdefault(name, {"name": name, "start": None, "end": None, "shared_max": 0,
                                           "why": f"needs {dep}'s checkpoint on this machine"})
                    continue
                ctx, variant, _ = parse_name(name)
                rd = Path(work) / "runs" / name
                resumable = has_checkpoint(rd, preset.recipe)
                steps = _steps_of(spec(preset, name, str(work)).overrides) - (last_step(rd) if resumable else 0)
                c = preset.contexts[ctx]
                cand = Load(name, ctx, pl.startup_s, max(0, steps) * c.global_batch_size * c.seq_length, cost_kind(variant))
                why = admit(cand, running, pl, time_s - t, first_of_call=not started_any, resumable=resumable)
                if why is None:
                    queue.remove(name)
                    running.append(cand)
                    started_any = True
                    rows[name] = {"name": name, "start": t, "end": None, "shared_max": len(running), "why": ""}
                    for r in running:
                        rows[r.name]["shared_max"] = max(rows[r.name]["shared_max"], len(running))
                else:  # the first reason is kept: it says why the run did not start with the call
                    rows.setdefault(name, {"name": name, "start": None, "end": None, "shared_max": 0, "why": why})
        if not running:
            break
        fin = simulate(running, pl, time_s - t)
        first = min((v for v in fin.values() if v is not None), default=None)
        if first is None:  # nothing finishes in this call: SIGTERM at the budget
            break
        # advance every load to the first finish
        n = len(running)
        for x in running:
            if x.startup_left >= first:
                x.startup_left -= first
            else:
                x.tokens_left -= (first - x.startup_left) * pl.per_run_tps(x.ctx, n, x.kind)
                x.startup_left = 0.0
        t += first
        for x in [x for x in running if fin[x.name] is not None and abs(fin[x.name] - first) < 1e-6]:
            running.remove(x)
            rows[x.name]["end"] = t
            done.add(x.name)
    return sorted((r for r in rows.values() if r["start"] is not None), key=lambda r: r["start"]) + \
        [r for r in rows.values() if r["start"] is None]


def pack(work: Path, names: List[str], dest: Path, extra: Optional[Dict] = None) -> Path:
    """One small tarball: ``<name>/<SMALL_FILES>`` per run, plus piece.json (status, extra)
    and the logs' last 200 lines. Extract it into the results directory (``tar xzf -C``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for n in names:
            for f in SMALL_FILES:
                p = Path(work) / "runs" / n / f
                if p.is_file():
                    tar.add(p, arcname=f"{n}/{f}")
            lg = Path(work) / "logs" / f"{n}.log"
            if lg.is_file():
                tail = "\n".join(lg.read_text(errors="replace").splitlines()[-200:]).encode()
                ti = tarfile.TarInfo(f"{n}/train.log.tail")
                ti.size = len(tail)
                tar.addfile(ti, io.BytesIO(tail))
        blob = json.dumps(extra or {}, indent=1).encode()
        ti = tarfile.TarInfo("piece.json")
        ti.size = len(blob)
        tar.addfile(ti, io.BytesIO(blob))
    return dest


__all__ = ["Load", "Planning", "SMALL_FILES", "admit", "free_port", "gain", "has_checkpoint", "is_complete",
           "last_step", "matrix_status", "measured_sharing", "pack", "plan_call", "planning", "recipe_of", "run_piece",
           "run_recipe", "simulate", "todo"]

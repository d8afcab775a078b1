"""Piecewise execution of the scale matrix (issue 19): run the next missing runs within a
time budget, resume unfinished ones, pack small results.

A GPU lending is short (one call <= 10 min, ~30 min per machine) and its disk is lost when
the machine goes back, so:

* results are keyed by run name; a run is *complete* when its metrics reach its last step
  (the trainer exits 0 also on SIGTERM, so the exit code alone does not say so);
* runs already complete in any ``--done`` directory (the results copied back earlier,
  e.g. ``results/fidelity_scale`` in the repo) are skipped;
* at the budget the running trainer gets SIGTERM, saves a checkpoint and exits; the next call
  *on the same warm machine* resumes it from the work directory (checkpoints are hundreds of
  MB: they never travel). On a fresh machine an unfinished run starts again;
* each run directory gets ``run.json``: segments (wall time, device, commit, steps), tokens,
  completeness; the tarball holds only metrics/summary/config/run.json per run (KBs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .scale import ScalePreset, estimate_s, run_names, spec

SMALL_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "recall_sweep.json", "run.json")


def _steps_of(overrides: List[str]) -> int:
    return int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.steps=")))


def last_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for ln in path.read_text().splitlines():
        try:
            steps.append(json.loads(ln).get("step", 0))
        except ValueError:  # a line torn by a kill: not a step
            continue
    return max([s for s in steps if isinstance(s, int)], default=0)


def read_run_json(run_dir: Path) -> Dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_complete(run_dir: Path) -> bool:
    return bool(read_run_json(run_dir).get("complete"))


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / "checkpoints" / "latest").exists()


def matrix_status(preset: ScalePreset, work: Path, done_dirs: List[Path]) -> Dict[str, str]:
    """{run name: "complete" | "partial" (resumable here) | "missing"} in launch order."""
    out = {}
    for name in run_names(preset):
        if any(is_complete(d / name) for d in done_dirs) or is_complete(work / "runs" / name):
            out[name] = "complete"
        elif has_checkpoint(work / "runs" / name):
            out[name] = "partial"
        else:
            out[name] = "missing"
    return out


def todo(preset: ScalePreset, work: Path, done_dirs: List[Path], only: Optional[List[str]] = None) -> List[str]:
    """Runs to (re)start, in order; partial runs first (they resume). A conversion run whose
    dense checkpoint is not in the work directory gets that dense run again before it."""
    st = matrix_status(preset, work, done_dirs)
    names = [n for n in st if st[n] != "complete" and (only is None or n in only)]
    names.sort(key=lambda n: st[n] != "partial")
    out: List[str] = []
    for n in names:
        dep = spec(preset, n, str(work)).depends_on
        if dep and not (is_complete(work / "runs" / dep) and has_checkpoint(work / "runs" / dep)) and dep not in out:
            out.append(dep)
        if n not in out:
            out.append(n)
    return out


def _update_run_json(run_dir: Path, name: str, total_steps: int, segment: Dict, tokens_per_step: int) -> Dict:
    info = read_run_json(run_dir) or {"name": name, "segments": []}
    info["segments"].append(segment)
    step = last_step(run_dir)
    info.update(total_steps=total_steps, step=step, tokens=step * tokens_per_step,
                complete=step >= total_steps and segment.get("rc") == 0,
                wall_s=round(sum(s.get("wall_s", 0) for s in info["segments"]), 1),
                devices=sorted({s.get("device", "?") for s in info["segments"]}),
                commits=sorted({s.get("commit", "?") for s in info["segments"]}))
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return info


def run_piece(preset: ScalePreset, work: Path, budget_s: float, done_dirs: List[Path], python: str, repo: Path,
              device: str, commit: str, only: Optional[List[str]] = None, dry_run: bool = False,
              min_slice_s: float = 60.0, grace_s: float = 60.0, log: Callable[[str], None] = print) -> Dict:
    """Run ``todo`` in order until ``budget_s`` is spent; returns {"ran": [...], "status": {...}}.
    ``grace_s`` of the budget is kept for the SIGTERM checkpoint and packing."""
    work = Path(work)
    t_end = time.time() + budget_s
    plan = todo(preset, work, done_dirs, only)
    ran: List[str] = []
    sim = budget_s - grace_s  # dry run: the budget spent by the planned estimates
    for name in plan:
        left = t_end - time.time() - grace_s
        s = spec(preset, name, str(work))
        if dry_run:
            est = estimate_s(preset, name)
            when = "this call" if sim >= min_slice_s and (est <= sim or sim == budget_s - grace_s) else "a later call"
            log(f"[piece] {when}: {name} (~{est / 60:.1f} min planned): " + " ".join(s.overrides))
            if when == "this call":
                sim -= est
            continue
        if left < min_slice_s:
            log(f"[piece] {left:.0f}s left: stopping before {name}")
            break
        run_dir = work / "runs" / name
        if ran and not has_checkpoint(run_dir) and estimate_s(preset, name) > left:
            # a fresh run that would not finish in this call: leave it for a call of its own
            # (resuming needs the same warm machine)
            log(f"[piece] skip {name} for now: ~{estimate_s(preset, name):.0f}s planned, {left:.0f}s left")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_complete(run_dir):  # a dependency re-run whose checkpoint is present
            continue
        from_step = last_step(run_dir)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + (os.getpid() + len(ran)) % 1000),
                   PYTHONPATH=str(repo) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(k, None)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "msa_megatron.train", *s.overrides]
        log(f"[piece] start {name} at step {from_step} with {left:.0f}s of budget: {' '.join(cmd[3:])}")
        t0 = time.time()
        with open(work / "logs" / f"{name}.log", "a") as fh:
            proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT)
            stopped = False
            while proc.poll() is None:
                if not stopped and time.time() > t0 + left:
                    log(f"[piece] budget reached: SIGTERM to {name} (it checkpoints and exits)")
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
                time.sleep(1.0)
        ctx_tokens = preset.contexts[name.split("_")[0][1:]]
        info = _update_run_json(run_dir, name, _steps_of(s.overrides),
                                {"from_step": from_step, "to_step": last_step(run_dir), "rc": proc.returncode,
                                 "wall_s": round(time.time() - t0, 1), "device": device, "commit": commit,
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stopped": stopped},
                                ctx_tokens.global_batch_size * ctx_tokens.seq_length)
        log(f"[piece] {name}: exit {proc.returncode}, step {info['step']}/{info['total_steps']}, "
            f"{'complete' if info['complete'] else 'unfinished'} ({info['wall_s']:.0f}s in all)")
        ran.append(name)
        if proc.returncode != 0:
            log(f"[piece] {name} failed (see {work / 'logs' / (name + '.log')}); going on with the next run")
    return {"ran": ran, "planned": plan, "status": matrix_status(preset, work, done_dirs)}


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
                import io

                ti = tarfile.TarInfo(f"{n}/train.log.tail")
                ti.size = len(tail)
                tar.addfile(ti, io.BytesIO(tail))
        blob = json.dumps(extra or {}, indent=1).encode()
        import io

        ti = tarfile.TarInfo("piece.json")
        ti.size = len(blob)
        tar.addfile(ti, io.BytesIO(blob))
    return dest


__all__ = ["SMALL_FILES", "has_checkpoint", "is_complete", "last_step", "matrix_status", "pack", "run_piece", "todo"]

#!/usr/bin/env python
"""Fidelity report (issue 10): does our MSA train like the paper says?

Trains the seven runs of msa_megatron/experiments/fidelity/matrix.py through the trainer (one
subprocess each, identical data, tokens, seed and model), collects DIR/results.json, and
(separately, where matplotlib is) writes docs/fidelity_first_wave.md and docs/fidelity/*.png; the scale
matrix of issue 19 (--piece, --scale-report) reports into docs/fidelity.md.

    python scripts/fidelity.py --preset cpu --out runs/fidelity-cpu             # tiny, CPU smoke
    python scripts/fidelity.py --preset gpu --gpus 0,0,0 --out /tmp/fid --export $OUT/fidelity    # one H100, 3 at a time
    python scripts/fidelity.py --preset gpu --gpus 0,1,0,1 --out /tmp/fid --export $OUT/fidelity  # two GPUs
    python scripts/fidelity.py --report runs/fidelity-cpu                       # table + plots into docs/

Scale matrix (issue 19; msa_megatron/experiments/fidelity/scale.py), piecewise over GPU lendings:

    python scripts/fidelity.py --piece scale --budget-s 480 --work /tmp/fid_scale \
        --done results/fidelity_scale --export $OUT          # next missing runs, one tarball in $OUT
    python scripts/fidelity.py --piece scale --dry-run      # the plan of the next call
    python scripts/fidelity.py --piece scale --parallel 2 ...   # at most 2 runs share the GPU (default: from memory)
    python scripts/fidelity.py --scale-report results/fidelity_scale   # table, plots, statement

``--gpus`` lists one slot per concurrent run (a GPU id may repeat: small models leave an
H100 mostly idle). Runs wait for their dependency (the conversion run for the dense run's
checkpoint). Finished runs (summary.json present) are skipped on a re-run unless --force.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from msa_megatron.experiments.fidelity.collect import collect, conversion_summary  # noqa: E402
from msa_megatron.experiments.fidelity.matrix import PRESETS, RUN_NAMES, RunSpec, plan  # noqa: E402


def _commit() -> str:
    """MSA_COMMIT wins: a copied tree (a GPU host) may carry a stale .git of another commit."""
    if os.environ.get("MSA_COMMIT"):
        return os.environ["MSA_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MSA_COMMIT", "unknown (no git checkout; set MSA_COMMIT)")


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _software() -> Dict[str, str]:
    """Versions a GPU run's numbers depend on, recorded in every segment of its run.json (two
    lendings' copies of one run may differ by the machine image; run 17)."""
    import torch

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda),
           "cudnn": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if torch.cuda.is_available():
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            out["driver"] = "unknown (nvidia-smi failed)"
    return out


def _model_shape(preset) -> Dict[str, int]:
    """Model/MSA shape of the preset and its FLOP-matched window (from the model YAML)."""
    import yaml

    from msa_megatron.config import MSAConfig
    from msa_megatron.flops import flop_matched_window_for

    m = yaml.safe_load((REPO / "configs" / "model" / f"{preset.model}.yaml").read_text())
    msa = MSAConfig(block_size=m["msa_block_size"], topk=m["msa_topk"], index_dim=m["msa_index_dim"])
    window = flop_matched_window_for(msa, m["num_attention_heads"], m["kv_channels"], m["num_query_groups"],
                                     preset.seq_length)
    return {"block_size": msa.block_size, "topk": msa.topk, "swa_window": window}


class Scheduler:
    """Runs the specs on the slots, one run per slot at a time, respecting dependencies."""

    def __init__(self, specs: List[RunSpec], slots: List[Optional[str]], out: Path, python: str):
        self.pending = list(specs)
        self.slots = slots
        self.out = out
        self.python = python
        self.status: Dict[str, Dict] = {}

    def _start(self, spec: RunSpec, slot: Optional[str], port: int) -> subprocess.Popen:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO)
                   + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        log_path = self.out / "logs" / f"{spec.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "msa_megatron.train", *spec.overrides]
        (self.out / "logs" / f"{spec.name}.cmd").write_text(" ".join(cmd) + "\n")
        print(f"[fidelity] start {spec.name} on {'GPU ' + slot if slot is not None else 'CPU'}: "
              f"{' '.join(cmd[3:])}", flush=True)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def run(self) -> Dict[str, Dict]:
        running: Dict[int, tuple] = {}  # slot index -> (spec, proc, t0)
        try:
            return self._loop(running)
        finally:  # interrupted (Ctrl-C, SIGTERM as KeyboardInterrupt): stop the runs we started
            for spec, proc, _ in running.values():
                if proc.poll() is None:
                    print(f"[fidelity] stopping {spec.name}", flush=True)
                    proc.terminate()
                    proc.wait(timeout=60)

    def _loop(self, running: Dict[int, tuple]) -> Dict[str, Dict]:
        port = 29600 + (os.getpid() % 200) * 10
        while self.pending or running:
            for i, slot in enumerate(self.slots):
                if i in running:
                    continue
                spec = self._next_ready()
                if spec is None:
                    break
                port += 1
                running[i] = (spec, self._start(spec, slot, port), time.time())
            time.sleep(0.5)
            for i, (spec, proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                wall = time.time() - t0
                self.status[spec.name] = {"rc": rc, "wall_s": round(wall, 1)}
                print(f"[fidelity] {spec.name}: exit {rc} after {wall:.0f}s"
                      + ("" if rc == 0 else f" (see {self.out / 'logs' / (spec.name + '.log')})"), flush=True)
                del running[i]
            if not running and self.pending and self._next_ready(peek=True) is None:
                for spec in self.pending:  # dependencies failed: nothing can start
                    self.status[spec.name] = {"rc": None, "skipped": f"dependency {spec.depends_on} failed"}
                    print(f"[fidelity] {spec.name}: skipped (dependency {spec.depends_on} failed)", flush=True)
                self.pending = []
        return self.status

    def _next_ready(self, peek: bool = False) -> Optional[RunSpec]:
        for spec in self.pending:
            dep = spec.depends_on
            if dep is None or self.status.get(dep, {}).get("rc") == 0:
                if not peek:
                    self.pending.remove(spec)
                return spec
        return None


def launch(args) -> int:
    preset = PRESETS[args.preset]
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    specs = plan(preset, str(out), args.steps, args.recall_sweep)
    wanted = args.runs.split(",") if args.runs else list(RUN_NAMES)
    bad = [n for n in wanted if n not in RUN_NAMES]
    if bad:
        print(f"fidelity: error: --runs {bad[0]!r} is invalid: allowed values are {', '.join(RUN_NAMES)}", file=sys.stderr)
        return 2
    specs = [s for s in specs if s.name in wanted]
    status: Dict[str, Dict] = {}
    todo = []
    for s in specs:
        run_dir = out / "runs" / s.name
        if args.force and run_dir.exists():
            shutil.rmtree(run_dir)
        if (run_dir / "summary.json").is_file():
            status[s.name] = {"rc": 0, "reused": True}
            print(f"[fidelity] {s.name}: already finished in {run_dir} (reused; --force reruns)", flush=True)
        else:
            todo.append(s)
    for s in todo:
        if s.depends_on and s.depends_on not in wanted and not (out / "runs" / s.depends_on / "summary.json").is_file():
            print(f"fidelity: error: --runs includes {s.name} but not {s.depends_on}, which it needs "
                  f"(and {out / 'runs' / s.depends_on} holds no finished run)", file=sys.stderr)
            return 2
        if s.depends_on and (out / "runs" / s.depends_on / "summary.json").is_file():
            status.setdefault(s.depends_on, {"rc": 0, "reused": True})
    if args.preset == "gpu" or args.gpus:
        slots: List[Optional[str]] = [g.strip() for g in (args.gpus or "0").split(",") if g.strip()]
    else:
        slots = [None] * max(1, args.jobs)
    # The corpus is built once here, not by concurrent runs.
    from msa_megatron.training.corpus import build_corpus

    build_corpus()
    commit = _commit()  # the code the runs start from
    t0 = time.time()
    sched = Scheduler(todo, slots, out, sys.executable)
    sched.status.update(status)
    try:
        status = sched.run()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (e.g. `timeout`): keep what finished, mark the rest
        status = sched.status
        for s in todo:
            status.setdefault(s.name, {"rc": None, "skipped": "interrupted"})
        print("[fidelity] interrupted: writing partial results", flush=True)
    wall = time.time() - t0
    write_results(args, out, status, wall, commit)
    if args.export:
        export(out, Path(args.export))
    failed = [n for n, s in status.items() if s.get("rc") != 0]
    print(f"[fidelity] done in {wall / 60:.1f} min; results: {out / 'results.json'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


#: What --export copies: everything the report needs, no checkpoints (hundreds of MB).
EXPORT_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "recall_sweep.json")


def export(out: Path, dest: Path) -> None:
    """Copy results.json, logs/ and each run's metrics (not its checkpoints) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "results.json", dest / "results.json")
    if (out / "logs").is_dir():
        shutil.copytree(out / "logs", dest / "logs", dirs_exist_ok=True)
    for run in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        for name in EXPORT_FILES:
            if (run / name).is_file():
                (dest / "runs" / run.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / name, dest / "runs" / run.name / name)
    print(f"[fidelity] exported results, logs and metrics (no checkpoints) to {dest}", flush=True)


def write_results(args, out: Path, status: Dict[str, Dict], wall: float, commit: str) -> Dict:
    import torch

    preset = PRESETS[args.preset]
    runs = collect(out, RUN_NAMES)
    results = {
        "meta": {
            "label": "CPU smoke results (tiny model, a few steps: not evidence)" if args.preset == "cpu"
            else "GPU results",
            "preset": args.preset, "device": _device(), "commit": commit, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python scripts/fidelity.py " + " ".join(sys.argv[1:]), "out_dir": str(args.export or out), "wall_s": round(wall, 1),
        },
        "model": preset.model, "seq_length": preset.seq_length, **_model_shape(preset),
        "status": status, "runs": runs,
        "conversion": conversion_summary(runs["dense"], runs["dense_to_msa"])
        if "dense" in runs and "dense_to_msa" in runs else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _sweep(text: str) -> List[List[int]]:
    try:
        pairs = [[int(x) for x in item.split(":")] for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(pr) != 2 for pr in pairs):
        raise argparse.ArgumentTypeError(f"--recall-sweep {text!r} is invalid: use block:topk pairs, e.g. 16:2,16:4")
    return pairs


DEFAULT_DONE = REPO / "results" / "fidelity_scale"


def default_done(preset) -> Path:
    """Where a preset family's complete runs are copied back: results/fidelity_<report_name>."""
    return REPO / "results" / f"fidelity_{preset.report_name}"


def _gpu_mem_gib() -> Optional[float]:
    """Total memory of the first visible GPU (nvidia-smi, so this process makes no CUDA context)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return float(out[int(vis) if vis.isdigit() and int(vis) < len(out) else 0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def piece(args) -> int:
    """One slice of the scale matrix: the next missing runs within --budget-s, then a tarball."""
    from msa_megatron.experiments.fidelity.piece import matrix_status, pack, planning, run_piece
    from msa_megatron.experiments.fidelity.scale import SCALE_PRESETS, estimate_s, run_names, tokens_per_run

    preset = SCALE_PRESETS[args.piece]
    work = Path(args.work or f"/tmp/fid_{args.piece}").resolve()
    done = [Path(d).resolve() for d in (args.done.split(",") if args.done else [str(default_done(preset))]) if d]
    only = args.runs.split(",") if args.runs else None
    rerun = args.rerun.split(",") if args.rerun else []
    for flag, names in (("--runs", only or []), ("--rerun", rerun)):
        bad = [n for n in names if n not in run_names(preset)]
        if bad:
            print(f"fidelity: error: {flag} {bad[0]!r} is invalid: allowed values are {', '.join(run_names(preset))}",
                  file=sys.stderr)
            return 2
    st = matrix_status(preset, work, done, rerun)
    print(f"[piece] preset {args.piece}: " + ", ".join(f"{n}={s}" for n, s in st.items()), flush=True)
    for ctx, c in preset.contexts.items():
        kinds = [k for k, _ in c.est_tokens_per_s_by_kind] or ["dense"]
        print(f"[piece] {ctx}: {tokens_per_run(preset, ctx) / 1e6:.1f}M tokens per run, planned alone (start-up "
              "included): " + ", ".join(f"{k} ~{estimate_s(preset, f'c{ctx}_{k}_s1') / 60:.1f} min at "
                                        f"{c.tokens_per_s(k) / 1e3:.0f}K tokens/s" for k in kinds), flush=True)
    on_cpu = preset.train == "cpu"  # the *_cpu presets: tests and smoke runs
    if not args.dry_run and not on_cpu:
        import torch

        if not torch.cuda.is_available():
            cpu_twins = ", ".join(n for n, q in SCALE_PRESETS.items() if q.train == "cpu")
            print(f"fidelity: error: --piece {args.piece} needs a CUDA GPU (use --dry-run, or a CPU preset: {cpu_twins})",
                  file=sys.stderr)
            return 2
    if not args.dry_run:
        from msa_megatron.training.corpus import build_corpus

        build_corpus(packages=preset.corpus_packages, order=preset.corpus_order)  # once, not by each run
    device = _device()
    commit = _commit()
    software = _software()
    mem = args.gpu_mem_gib or _gpu_mem_gib()
    if mem is None and args.dry_run and not on_cpu:
        mem = 80.0
        print("[piece] no GPU here: planning for 80 GiB (an H100; --gpu-mem-gib sets another)", flush=True)
    pl = planning(preset, work, done, parallel=args.parallel, share_efficiency=args.share_eff, gpu_mem_gib=mem,
                  fit_margin=args.fit_margin, device=device)
    res = run_piece(preset, work, args.budget_s, done, sys.executable, REPO, device, commit, only=only,
                    dry_run=args.dry_run, grace_s=args.grace_s, log=lambda m: print(m, flush=True), plan=pl,
                    rerun=rerun, software=software)
    remaining = [n for n, s in res["status"].items() if s != "complete"]
    print(f"[piece] ran {', '.join(res['ran']) or 'nothing'}; not complete yet: {', '.join(remaining) or 'none'}",
          flush=True)
    if args.export and not args.dry_run:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
        tar = pack(work, res["ran"], Path(args.export) / f"fidelity_piece_{stamp}.tar.gz",
                   {"preset": args.piece, "device": device, "commit": commit, "software": software, "ran": res["ran"],
                    "later": res["later"], "sharing": res["sharing"], "status": res["status"], "date": stamp,
                    "budget_s": args.budget_s,
                    "planning": pl.describe()})
        print(f"[piece] packed {tar} ({tar.stat().st_size / 1e3:.0f} KB): extract with "
              f"tar xzf {tar.name} -C {_rel(done[0])}", flush=True)
    failed = [n for n in res["ran"] if n in remaining and res["status"][n] == "missing"]
    return 1 if failed else 0


def _rel(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (the copy-back target here)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _parallel(text: str) -> Optional[int]:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--parallel {text!r} is invalid: allowed values are auto or an integer >= 1")
    return int(text)


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the runs too
    p = argparse.ArgumentParser(prog="fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="run the matrix with this preset")
    p.add_argument("--out", help="output directory (default runs/fidelity-<preset>)")
    p.add_argument("--gpus", help="comma-separated GPU ids, one per concurrent run (ids may repeat), e.g. 0,0 or 0,1")
    p.add_argument("--jobs", type=int, default=1, help="concurrent runs on the CPU (cpu preset)")
    p.add_argument("--runs", help=f"subset of runs, comma-separated ({', '.join(RUN_NAMES)})")
    p.add_argument("--steps", type=int, help="override the preset's steps per run (CI / quick checks)")
    p.add_argument("--recall-sweep", type=_sweep, help="override the preset's recall sweep: B:k,B:k (e.g. 16:2,16:4)")
    p.add_argument("--export", metavar="DIR", help="at the end, copy results.json, logs and metrics (no checkpoints) "
                   "to DIR (e.g. $OUT on a GPU host)")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--piece", metavar="PRESET", help="scale matrix: run the next missing runs of this scale preset "
                   "(a name of SCALE_PRESETS in msa_megatron/experiments/fidelity/scale.py, e.g. scale or retrieval; "
                   "an unknown name lists them all) within --budget-s, pack metrics into --export")
    p.add_argument("--budget-s", type=float, default=480.0, help="with --piece: seconds for this slice (default 480)")
    p.add_argument("--work", help="with --piece: run directories and checkpoints, default /tmp/fid_<preset> (one "
                   "per preset: runs of two presets may share a name) "
                   "(kept between calls on a warm machine)")
    p.add_argument("--done", help="with --piece: comma-separated directories of complete runs copied back "
                   f"(default results/fidelity_<family>: {DEFAULT_DONE.relative_to(REPO)} for scale, "
                   "results/fidelity_retrieval for retrieval, results/fidelity_retrieval_32k for retrieval_32k, ...)")
    p.add_argument("--grace-s", type=float, default=60.0, help="with --piece: seconds of the budget kept for the "
                   "SIGTERM checkpoint and packing (default 60)")
    p.add_argument("--dry-run", action="store_true", help="with --piece: print the plan of this call, run nothing")
    p.add_argument("--rerun", help="with --piece: comma-separated runs to run again although complete in --done "
                   "(e.g. runs recorded before a held-out probe was added); their new results replace the old "
                   "when copied back")
    p.add_argument("--parallel", type=_parallel, default=None, help="with --piece: most runs sharing the GPU at once "
                   "(default auto: GPU memory / planned or measured memory per run, at most the preset's max_parallel)")
    p.add_argument("--share-eff", type=float, default=None, help="with --piece: planning knob e in [0, 1]: K runs "
                   "sharing the GPU give 1+(K-1)e x one run's throughput (default: the preset's, a guess)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="with --piece: GPU memory for the automatic "
                   "--parallel (default: nvidia-smi; a dry run without a GPU plans for 80)")
    p.add_argument("--fit-margin", type=float, default=0.10, help="with --piece: a fresh run starts only if planned "
                   "to finish with this fraction of its time to spare (default 0.10)")
    p.add_argument("--scale-report", metavar="DIRS", help="report of the scale matrix from these comma-separated "
                   "result directories (default preset scale)")
    p.add_argument("--reruns", metavar="DIRS", help="with --scale-report: comma-separated directories of earlier "
                   "complete runs of the same names (a run done twice): the report states their spread as the "
                   "run-to-run noise of one seed (default: every <first DIR>_reruns* beside the first directory; "
                   "'' for none)")
    p.add_argument("--scale-preset", default="scale", help="with --scale-report / --overrides: the scale preset")
    p.add_argument("--overrides", metavar="RUN", help="print the trainer overrides of one scale-matrix run, shell-quoted "
                   "on one line (for a one-off variant: python -m msa_megatron.train $(... --overrides RUN) "
                   "model.rotary_percent=1.0 run_dir=...); run directory under --work")
    p.add_argument("--report", metavar="DIR", help="write the table and plots from DIR/results.json")
    p.add_argument("--doc", default=None, help="the markdown file: with --report default docs/fidelity_first_wave.md "
                   "(issue 10's small matrix), with --scale-report docs/fidelity.md")
    p.add_argument("--plots", default=str(REPO / "docs" / "fidelity"), help="with --report: the PNG directory")
    args = p.parse_args(argv)
    if args.doc is None:
        args.doc = str(REPO / "docs" / ("fidelity.md" if args.scale_report else "fidelity_first_wave.md"))
    if args.piece:
        from msa_megatron.experiments.fidelity.scale import SCALE_PRESETS

        if args.piece not in SCALE_PRESETS:
            p.error(f"--piece {args.piece!r} is invalid: allowed values are {', '.join(SCALE_PRESETS)}")
        if not 0 <= args.grace_s < args.budget_s:
            p.error(f"--grace-s {args.grace_s:g} is invalid: allowed values are 0 <= grace < --budget-s "
                    f"({args.budget_s:g})")
        if args.share_eff is not None and not 0 <= args.share_eff <= 1:
            p.error(f"--share-eff {args.share_eff} is invalid: allowed values are 0 to 1")
        return piece(args)
    if args.overrides:
        import shlex

        from msa_megatron.experiments.fidelity.scale import SCALE_PRESETS, run_names, spec

        if args.scale_preset not in SCALE_PRESETS:
            p.error(f"--scale-preset {args.scale_preset!r} is invalid: allowed values are {', '.join(SCALE_PRESETS)}")
        preset = SCALE_PRESETS[args.scale_preset]
        if args.overrides not in run_names(preset):
            p.error(f"--overrides {args.overrides!r} is invalid: allowed values are {', '.join(run_names(preset))}")
        work = args.work or f"/tmp/fid_{args.scale_preset}"
        print(" ".join(shlex.quote(o) for o in spec(preset, args.overrides, work).overrides))
        return 0
    if args.scale_report:
        from msa_megatron.experiments.fidelity.scale import SCALE_PRESETS
        from msa_megatron.experiments.fidelity.scale_report import scale_report, sibling_rerun_dirs

        if args.scale_preset not in SCALE_PRESETS:
            p.error(f"--scale-preset {args.scale_preset!r} is invalid: allowed values are {', '.join(SCALE_PRESETS)}")
        dirs = [Path(d) for d in args.scale_report.split(",") if d]
        if args.reruns is None:
            reruns = sibling_rerun_dirs(dirs[0]) if dirs else []
            print(f"scale report: reruns from {', '.join(map(str, reruns)) or 'no directory'} (beside {dirs[0] if dirs else '-'}; "
                  "--reruns names others, --reruns '' none)", flush=True)
        else:
            reruns = [Path(d) for d in args.reruns.split(",") if d]
        out = scale_report(dirs, SCALE_PRESETS[args.scale_preset], args.scale_preset, Path(args.doc), Path(args.plots),
                           rerun_dirs=reruns)
        col = out["collected"]
        print(f"scale report: {len(col['runs'])} complete runs; unfinished: {', '.join(col['unfinished']) or 'none'}; "
              f"missing: {', '.join(col['missing']) or 'none'}")
        for path in out["written"] + [args.doc]:
            print(f"wrote {path}")
        return 0
    if args.report:
        from msa_megatron.experiments.fidelity.report import report

        results = Path(args.report) / "results.json"
        if not results.is_file():
            p.error(f"--report {args.report}: {results} not found (run a preset first)")
        for path in report(results, Path(args.doc), Path(args.plots)):
            print(f"wrote {path}")
        return 0
    if not args.preset:
        p.error("one of --preset or --report is required")
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be >= 2")
    args.out = args.out or str(REPO / "runs" / f"fidelity-{args.preset}")
    return launch(args)


if __name__ == "__main__":
    raise SystemExit(main())

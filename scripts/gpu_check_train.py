#!/usr/bin/env python
"""GPU check of the trainer (run by the lead on a CUDA machine; CPU CI cannot cover it):
bf16, the Triton MSA kernels, Megatron's GPU code paths, MFU from the datasheet peak, GPU
memory, checkpoint save and resume.

    python scripts/gpu_check_train.py                 # 1 GPU: small_moe, ~2-4 min
    python scripts/gpu_check_train.py --nproc 2 --tp 2 # 2 GPUs: TP=2 + SP

It runs ``torchrun -m msa_megatron.train`` twice (a run, then a resume of its checkpoint)
and checks metrics.jsonl: the warmup->sparse switch at the configured step, finite
decreasing loss, finite KL, recall on sampled steps, 0 < MFU < 1, GPU memory > 0, exact
continuation after the resume. Exit 0 and "GPU CHECK OK" when everything holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(nproc: int, overrides) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "msa_megatron.train", *overrides]
    print("+", " ".join(cmd), flush=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.call(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=pythonpath))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--run-dir", default=None)
    a = p.parse_args()
    run = Path(a.run_dir or tempfile.mkdtemp(prefix="msa_gpu_check_"))
    common = ["model=small_moe", "train=gpu", f"parallel.tp={a.tp}", f"parallel.sp={'true' if a.tp > 1 else 'false'}",
              "train.global_batch_size=16", "train.micro_batch_size=2", f"attention.warmup.steps={a.warmup}",
              "attention.msa.recall_interval=5", "logging.log_interval=1", "train.eval_interval=0",
              "logging.wandb.mode=offline", f"run_dir={run}"]
    half = a.steps // 2
    failures = []
    if launch(a.nproc, common + [f"train.steps={a.steps}", f"checkpoint.interval={half}", "checkpoint.keep_last=3"]) != 0:
        print("GPU CHECK FAILED: the first run did not finish", file=sys.stderr)
        return 1
    first = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" not in r}
    modes = [first[s]["attention_mode"] for s in sorted(first)]
    if modes != ["msa_warmup"] * a.warmup + ["msa"] * (a.steps - a.warmup):
        failures.append(f"attention modes {modes}")
    for s, r in first.items():
        for key in ("lm_loss", "indexer_kl", "grad_norm"):
            if not (isinstance(r.get(key), float) and math.isfinite(r[key])):
                failures.append(f"step {s}: {key}={r.get(key)}")
        if not (0 < (r.get("mfu") or 0) < 1):
            failures.append(f"step {s}: mfu={r.get('mfu')}")
        if r.get("mem_kind") != "gpu_max_allocated" or not r.get("mem_gb", 0) > 0:
            failures.append(f"step {s}: memory {r.get('mem_kind')} {r.get('mem_gb')}")
        if (s % 5 == 0 or s == 1) != ("recall" in r):
            failures.append(f"step {s}: recall present={'recall' in r}")
    if not first[a.steps]["lm_loss"] < first[1]["lm_loss"]:
        failures.append("loss did not decrease")
    # resume from the mid-run checkpoint in a fresh directory: the same numbers (bf16 on GPU
    # is not guaranteed bitwise: atomics in some kernels) within a tight tolerance
    resumed_dir = run.with_name(run.name + "_resumed")
    if launch(a.nproc, [o for o in common if not o.startswith("run_dir=")] + [
            f"run_dir={resumed_dir}", f"train.steps={a.steps}", f"checkpoint.load={run}/checkpoints/step_{half:08d}"]) != 0:
        failures.append("the resumed run did not finish")
    else:
        second = {r["step"]: r for r in map(json.loads, (resumed_dir / "metrics.jsonl").read_text().splitlines())
                  if "event" not in r}
        for s in range(half + 1, a.steps + 1):
            x, y = first[s]["lm_loss"], second[s]["lm_loss"]
            if abs(x - y) > 1e-3 * abs(x):
                failures.append(f"resume: step {s} loss {y} vs {x}")
    mean_mfu = sum(first[s]["mfu"] for s in first if s > 2) / max(1, len(first) - 2)
    print(f"mean MFU (steps > 2): {mean_mfu:.1%}; peak GPU memory {max(r['mem_gb'] for r in first.values()):.1f} GB")
    if failures:
        print("GPU CHECK FAILED:\n  " + "\n  ".join(failures[:30]), file=sys.stderr)
        return 1
    print(f"GPU CHECK OK ({run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

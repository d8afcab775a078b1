"""Run trainer jobs for tests, cheaply: one helper process imports Megatron-Core once and
forks every rank of every requested run from that warm state (a 2-process run then costs
its set-up and steps, ~10-30 s, instead of ~70 s of two cold imports each time on a
2-core machine). The helper never computes with torch itself, so forking it is safe; each
rank uses one intra-op thread (as torchrun does) and runs in its own process group, which
is killed whole on a timeout.

The configuration is composed by Hydra from configs/ with the test's overrides, exactly
as ``msa-train`` does; ranks then call :func:`msa_megatron.training.loop.run`. One test
(test_cli.py) goes through the real ``torchrun ... -m msa_megatron.train`` instead.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    codes: List[int]
    timed_out: bool
    seconds: float
    run_dir: Path
    logs: str

    def ok(self) -> bool:
        return not self.timed_out and all(c == 0 for c in self.codes)

    def records(self) -> List[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def steps(self) -> Dict[int, dict]:
        return {r["step"]: r for r in self.records() if "event" not in r}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunServer:
    """Client side (in pytest): starts the helper, sends runs, reads replies."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        full_env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.training.launcher"], cwd=REPO, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"test launcher failed to start: {ready!r}")

    def run(self, run_dir: Path, overrides: List[str], world: int = 2, timeout: float = 240,
            sigterm_after_records: Optional[int] = None, env: Optional[Dict[str, str]] = None,
            cwd: Optional[Path] = None, signal_name: str = "SIGTERM") -> RunResult:
        """One run. ``run_dir=None``: the trainer picks a new directory under ``cwd``/runs (as
        ``msa-train`` without run_dir); logs then go to ``cwd``, the result names the new directory."""
        explicit = [f"run_dir={run_dir}"] if run_dir is not None else []
        log_dir = Path(run_dir) if run_dir is not None else Path(cwd)
        before = set((log_dir / "runs").glob("*")) if run_dir is None else set()
        if run_dir is None:  # the logs in cwd: this run's only
            for r in range(world):
                (log_dir / f"rank{r}.log").unlink(missing_ok=True)
        request = {"run_dir": str(log_dir), "overrides": explicit + list(overrides), "world": world,
                   "timeout": timeout, "sigterm_after_records": sigterm_after_records, "port": _free_port(),
                   "env": env or {}, "cwd": str(cwd) if cwd else None, "signal": signal_name}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("test launcher died")
        reply = json.loads(line)
        logs = "\n".join(f"--- rank {r} ---\n" + (log_dir / f"rank{r}.log").read_text(errors="replace")
                         for r in range(world) if (log_dir / f"rank{r}.log").exists())
        if run_dir is None:
            new = sorted(set((log_dir / "runs").glob("*")) - before)
            run_dir = new[-1] if new else log_dir / "runs" / "<none>"
        return RunResult(reply["codes"], reply["timed_out"], reply["seconds"], Path(run_dir), logs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------- helper side
def _compose(overrides: List[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from msa_megatron.training.config import load_config

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        composed = compose("config", overrides=overrides)
    values = OmegaConf.to_container(composed, resolve=True)
    values.pop("hydra", None)
    return load_config(values), OmegaConf.to_yaml(OmegaConf.create(values))


def _rank_main(rank: int, world: int, port: int, request: dict) -> int:
    os.setpgid(0, 0)
    if request.get("cwd"):
        os.chdir(request["cwd"])
    run_dir = Path(request["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / f"rank{rank}.log", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update(request["env"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from msa_megatron.training import loop
    from msa_megatron.training.config import ConfigError
    from msa_megatron.training.numerics import NonFiniteError

    try:
        cfg, yaml_text = _compose(request["overrides"])
        return loop.run(cfg, yaml_text)
    except ConfigError as e:
        print(f"msa-train: error: {e}", flush=True)
        return 2
    except NonFiniteError as e:
        print(f"msa-train: error: {e}", flush=True)
        return 1
    except BaseException:  # noqa: BLE001 - the log is the report
        import traceback

        traceback.print_exc()
        return 3


def _serve_one(request: dict) -> dict:
    world, port = request["world"], request["port"]
    t0 = time.time()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = _rank_main(rank, world, port, request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes: Dict[int, int] = {}
    timed_out = False
    signalled = False
    jsonl = Path(request["run_dir"]) / "metrics.jsonl"
    while len(codes) < world:
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        n = request.get("sigterm_after_records")
        if n and not signalled and jsonl.exists() and len(jsonl.read_text().splitlines()) >= n:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, getattr(signal, request.get("signal", "SIGTERM")))
            signalled = True
        if time.time() - t0 > request["timeout"]:
            timed_out = True
            for pid in pids:
                if pid not in codes:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        time.sleep(0.1)
    for pid in pids:  # whatever a rank left behind in its process group
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {"codes": [codes[p] for p in pids], "timed_out": timed_out, "seconds": time.time() - t0}


def serve() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    # The expensive part, once: everything a rank imports.
    import megatron.core.datasets.gpt_dataset  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import wandb  # noqa: F401

    import msa_megatron.megatron.model  # noqa: F401
    from msa_megatron.training import loop  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()

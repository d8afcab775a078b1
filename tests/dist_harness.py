"""Run a function in N CPU processes over gloo, the way torchrun would, and collect
each rank's return value. Failures re-raise in the test with the child's traceback."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _child(fn: Callable, rank: int, world: int, port: int, env: Dict[str, str], queue, args, kwargs) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, *args, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from msa_megatron.megatron.parallel import shutdown_distributed

            shutdown_distributed()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600, env: Optional[Dict[str, str]] = None,
                    **kwargs) -> List[Any]:
    """fn(rank, *args, **kwargs) in ``world_size`` spawned processes; returns results by rank.
    ``fn`` must be importable (a module-level function)."""
    env = dict(env or {})
    # Children unpickle ``fn`` by module name: make this checkout and tests/ importable.
    paths = [REPO_ROOT, TESTS_DIR] + [p for p in env.get("PYTHONPATH", os.environ.get("PYTHONPATH", "")).split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, env, queue, args, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: List[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]

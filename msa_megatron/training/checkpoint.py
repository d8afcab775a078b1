"""Atomic, resumable, reshardable checkpoints with megatron.core.dist_checkpointing.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/     a complete dist_checkpointing directory (+ train_state.json)
    step_00000200/
    latest             "step_00000200": written last, atomically

A save goes to ``.tmp-step_N`` (every rank writes its shards), then rank 0 renames it to
``step_N`` and only then replaces ``latest``. A crash at any point leaves either the old
``latest`` (pointing at a complete checkpoint) or the new one; leftover ``.tmp-*``
directories are never read and are swept at the next start. Old checkpoints beyond
``keep_last`` are renamed to ``.trash-*`` before deletion, so a half-deleted one never
carries a checkpoint name. A shared filesystem across nodes is assumed (as Megatron-LM).

Integrity: every step directory holds ``manifest.json`` (size and sha256 of each file),
written inside ``.tmp-step_N`` before the rename, and checked before any file of the
checkpoint is opened by torch: the distributed checkpoint's ``.metadata`` and shard
objects are pickles, which run code when loaded. The manifest detects damage (a torn
copy, a full disk, bit rot), not malice: whoever can write a checkpoint can write its
manifest, so load only checkpoints you trust. When the newest checkpoint of a run fails
its check or its load, the run says so in one line and resumes from the newest older
complete one, which then sets the failed one aside as ``damaged-step_N``
(``checkpoint.fallback=false`` refuses).

Contents: model (sharded tensors), distributed-optimizer state in Megatron's
'fully_reshardable' format (resharding across TP/PP/DP; see OPTIM_FORMAT), the LR scheduler, the train state (step,
consumed samples, tokens, skipped steps, wandb run id) and every rank's RNG states
(python, numpy, torch, CUDA and Megatron's tensor-parallel tracker). RNG states are
restored only when the parallel layout is unchanged; otherwise they are re-seeded (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .config import Config, ConfigError, UsageError
from .model import is_index_param, unwrap

log = logging.getLogger(__name__)

LATEST = "latest"
STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
DAMAGED_PREFIX = "damaged-"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: ``<field>=<path>: <what failed>`` (exit code 2)."""
#: Distributed-optimizer checkpoint format. 'fully_sharded_model_space' raises in
#: megatron-core 0.19 ("ShardedTensor.flattened_range is not supported"): 'fully_reshardable'
#: is its replacement (per-parameter canonical state, reshards across TP/PP/DP).
OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def resolve_checkpoint(path: str, field: str = "checkpoint.load") -> Path:
    """A step directory, or a checkpoints (or run) directory whose `latest` names one.
    Anything else is one :class:`CheckpointError` naming ``field`` and what is missing."""
    p = Path(path)
    for marker in (p / LATEST, p / "checkpoints" / LATEST):
        if marker.is_file():
            p = marker.parent / marker.read_text().strip()
            break
    if not p.is_dir():
        raise CheckpointError(field, path, f"not a checkpoint: {p} does not exist")
    if not (p / "metadata.json").is_file():
        raise CheckpointError(field, path, f"not a complete checkpoint (no metadata.json in {p}); expected a step "
                                           "directory, or a checkpoints/ or run directory whose `latest` names one")
    return p


def disk_full(error: BaseException, path: Path) -> Optional[str]:
    """'no space left on the device of <path>: N bytes free' if ``error`` is a full disk, else
    None. torch's writer reports it as 'inline_container.cc:... unexpected pos' (no errno),
    so that message counts when the device is (nearly) full."""
    import errno

    text = f"{type(error).__name__}: {error}"
    try:
        usage = shutil.disk_usage(path if path.exists() else path.parent)
    except OSError:
        return None
    nearly_full = usage.free < max(64 << 20, usage.total // 1000)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in text \
            or ("unexpected pos" in text and nearly_full):
        return f"no space left on the device of {path}: {usage.free:,} bytes free"
    return None


# --------------------------------------------------------------------------- manifest
def _files_of(path: Path) -> List[str]:
    """Every regular file under a checkpoint directory (relative, sorted), less the manifest."""
    out = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(path: Path, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """Size and sha256 of ``names``; with a process group the files are shared out over
    the ranks (a large checkpoint is hashed in parallel) and every rank gets the union."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    mine: Dict[str, Dict[str, Any]] = {}
    for name in names[rank::world]:
        f = path / name
        try:
            mine[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        except OSError as e:
            mine[name] = {"error": f"{type(e).__name__}: {e.strerror or e}"}
    if world == 1:
        return mine
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_manifest(path: Path) -> None:
    """manifest.json of a checkpoint directory (collective with a process group; rank 0 writes)."""
    files = _describe(path, _files_of(path))
    bad = {k: v["error"] for k, v in files.items() if "error" in v}
    if bad:
        raise OSError(f"cannot read back the checkpoint being saved in {path}: {bad}")
    if _rank() == 0:
        _write_atomic(path / MANIFEST, json.dumps({"version": 1, "files": files}, indent=0, sort_keys=True))


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if every file of ``path`` matches its manifest, else what does not (one line).
    Reads only file sizes, bytes and the manifest's JSON: nothing is unpickled. Same answer
    on every rank (collective with a process group)."""
    if not path.is_dir():
        return "the directory does not exist"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["files"]
        if not isinstance(expected, dict):
            raise ValueError("'files' is not a mapping")
    except FileNotFoundError:
        return (f"no {MANIFEST} (not saved by this version of msa-train); "
                "checkpoint.verify=false loads it unchecked, if you trust it")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    present = _files_of(path)
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
    if extra:
        return f"{extra[0]} is not in the manifest" + (f" (and {len(extra) - 1} more files)" if len(extra) > 1 else "")
    for name in present:  # cheap checks first: a truncated file needs no hashing
        size = (path / name).stat().st_size
        if size != expected[name].get("size"):
            return f"{name} is {size} bytes, the manifest says {expected[name].get('size')} (truncated or overwritten)"
    got = _describe(path, present)
    for name in present:
        if "error" in got[name]:
            return f"{name} cannot be read ({got[name]['error']})"
        if got[name]["sha256"] != expected[name].get("sha256"):
            return f"{name} does not match its sha256 in the manifest (damaged)"
    return None


def layout_signature() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True), "ep": ps.get_expert_model_parallel_world_size(),
        "world": dist.get_world_size() if dist.is_initialized() else 1,
    }


def prepare_writer_queue() -> None:
    """Before the process group starts: give megatron's checkpoint writer a results-queue
    manager process that survives SIGTERM. Megatron starts one lazily at the first save, in
    the trainer's process group, so the SIGTERM that a launcher (torchrun, Slurm) sends to
    the whole group kills it and the preemption save then fails (ConnectionRefused). Ours
    ignores SIGTERM/SIGINT and exits when the trainer does. On CPU it is forked (the spawned
    default imports torch at the first save: 5-15 s per process on a small machine); with
    CUDA it is spawned (no fork of a process that may touch CUDA)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _writer_manager
    if filesystem_async._results_queue is not None:
        return
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    _writer_manager = SyncManager(ctx=ctx)
    _writer_manager.start(initializer=_writer_manager_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = _writer_manager.Queue()


def _writer_manager_init(parent_pid: int) -> None:
    import signal
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


_writer_manager = None


def shutdown_writer_queue() -> None:
    """Stop the manager process of :func:`prepare_writer_queue` (end of a run)."""
    global _writer_manager
    if _writer_manager is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._results_queue = None
        _writer_manager.shutdown()
        _writer_manager = None


# --------------------------------------------------------------------------- RNG
def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[Dict[str, Any]]):
    """Every rank's RNG state, one shard per (pp, tp, dp) coordinate."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


# --------------------------------------------------------------------------- state dicts
def _model_sd(model_chunks) -> Dict[str, Any]:
    from megatron.core import parallel_state as ps

    meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict(metadata=meta)}
    return {f"model{i}": unwrap(c).sharded_state_dict(metadata=meta) for i, c in enumerate(model_chunks)}


def _merged_model_sd(sd: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in sd.items():
        if k.startswith("model"):
            out.update(v)
    return out


def materialize_optimizer_state(optimizer) -> None:
    """Megatron's distributed optimizer can only describe its state for loading once that
    state exists; torch's Adam creates it lazily at the first step (megatron-core 0.19
    asserts in DistributedOptimizer.state_dict() otherwise). Create it as zeros with step
    0 through the optimizer's own init_state_fn, without stepping (parameters untouched);
    the load then overwrites every value.

    Only torch's own optimizers keep a per-parameter 'step'; Transformer Engine's FusedAdam
    (megatron's Adam whenever TE is installed) keeps it in the param groups and refuses any
    state name it does not know (KeyError: 'step' in its state_dict)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts:
        inner = getattr(part, "optimizer", None)
        init = getattr(part, "init_state_fn", None)
        if inner is None or init is None or len(inner.state) > 0:
            continue
        init(inner, part.config)
        if not type(inner).__module__.startswith("torch.optim"):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) > 0 and "step" not in inner.state[p]:
                    inner.state[p]["step"] = torch.zeros((), dtype=torch.float32)


def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """optimizer.load_state_dict for the 'fully_reshardable' format, working around a
    megatron-core 0.19 bug with torch's AdamW (no TE/Apex, e.g. on CPU): its per-parameter
    state holds a 'step' tensor that load_parameter_state_from_fully_reshardable tries to
    copy from the checkpoint, where 'step' lives in the param groups instead (KeyError).
    So: load the param groups (which set 'step'), set the step tensors aside while the
    parameter state is copied in, then put them back -- one tensor per parameter: megatron
    assigns one shared tensor to all, and AdamW's in-place ``step += 1`` would then advance
    it once per parameter per step (wrong bias correction after a resume)."""
    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    states = [state] if len(parts) == 1 else [v for _, v in sorted(state.items())]
    if len(states) != len(parts):
        raise RuntimeError(f"checkpoint holds {len(states)} optimizer states, the model has {len(parts)} optimizers")
    for part, st in zip(parts, states):
        st = dict(st)
        param_state = st.pop("param_state")
        kind = st.pop("param_state_sharding_type")
        if kind != OPTIM_FORMAT["distrib_optim_sharding_type"]:
            raise RuntimeError(f"checkpoint optimizer format {kind!r}, expected {OPTIM_FORMAT['distrib_optim_sharding_type']!r}")
        part.load_state_dict(st)
        inner_state = part.optimizer.state
        steps = {p: s.pop("step") for p, s in inner_state.items() if "step" in s}
        try:
            part.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                inner_state[p]["step"] = step.clone()
    if len(parts) > 1:
        optimizer._synchronize_steps()


class CheckpointManager:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = Path(cfg.run_dir) / "checkpoints"
        self._rejected: List[Tuple[Path, str]] = []
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in list(self.root.glob(".tmp-*")) + list(self.root.glob(".trash-*")):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ queries
    def latest(self) -> Optional[Path]:
        """The complete checkpoint `latest` names, else None (no marker, or it names a step
        directory that is missing or incomplete)."""
        name = self._latest_name()
        path = self.root / name if name else None
        return path if path is not None and (path / "metadata.json").is_file() else None

    def _latest_name(self) -> Optional[str]:
        marker = self.root / LATEST
        try:
            return marker.read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def completed(self) -> List[Tuple[int, Path]]:
        out = []
        for p in self.root.glob(f"{STEP_PREFIX}*"):
            try:
                out.append((int(p.name[len(STEP_PREFIX):]), p))
            except ValueError:
                continue
        return sorted(out)

    def candidates(self) -> List[Tuple[Path, Optional[str]]]:
        """This run's checkpoints, most wanted first, each with a known problem or None:
        the one `latest` names, then older complete step directories, newest first."""
        out: List[Tuple[Path, Optional[str]]] = []
        name = self._latest_name()
        newest = None
        if name:
            path = self.root / name
            if not path.is_dir():
                out.append((path, f"`latest` names {name}, which does not exist"))
            elif not (path / "metadata.json").is_file():
                out.append((path, f"`latest` names {name}, which is incomplete (no metadata.json)"))
            else:
                out.append((path, None))
            try:
                newest = int(name[len(STEP_PREFIX):])
            except ValueError:
                newest = None
        for step, path in reversed(self.completed()):
            if any(path == p for p, _ in out) or (newest is not None and step > newest):
                continue  # a step directory newer than `latest` was never committed
            if (path / "metadata.json").is_file():
                out.append((path, None))
        return out

    def check(self, path: Path) -> Optional[str]:
        """What is wrong with a checkpoint before it is loaded (None: fine or not checked)."""
        return verify_checkpoint(path) if self.cfg.checkpoint.verify else None

    def reject(self, path: Path, problem: str) -> None:
        """The newest usable-looking checkpoint cannot be used: one line, then look further
        (fallback) or stop. Nothing is moved until an older one has loaded (:meth:`commit`):
        a failure that every checkpoint shares leaves the directory as it was."""
        if not self.cfg.checkpoint.fallback:
            raise CheckpointError("checkpoint (resume)", path, f"{problem}; checkpoint.fallback=false: not falling "
                                  "back to an older checkpoint (move it away, or set checkpoint.fallback=true)")
        if _rank() == 0:
            log.error("checkpoint %s: %s; trying the newest older complete checkpoint", path, problem)
        self._rejected.append((path, problem))

    def commit(self, used: Path) -> None:
        """``used`` has loaded: keep rejected newer checkpoints aside as ``damaged-step_N``
        (for inspection; never resumed again) and point `latest` at ``used``."""
        if not self._rejected:
            return
        if _rank() == 0:
            moved = []
            for path, _problem in self._rejected:
                if path.is_dir():
                    aside = self.root / f"{DAMAGED_PREFIX}{path.name}"
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(path, aside)
                    moved.append(aside.name)
            _write_atomic(self.root / LATEST, used.name + "\n")
            log.warning("resumed from the older checkpoint %s%s", used.name,
                        f"; set aside: {', '.join(moved)}" if moved else "")
        self._rejected = []
        _barrier()

    def resume_source(self) -> Tuple[str, Optional[Path]]:
        """('resume', path) | ('load', path) | ('init', path) | ('fresh', None); the path
        has passed :meth:`check`. A newest checkpoint of this run that fails it is named in
        one line and the next older one tried (:meth:`reject`); a damaged
        ``load``/``init_from`` is one CheckpointError."""
        ck = self.cfg.checkpoint
        own = self.candidates()
        if own:
            if ck.resume == "never":
                raise ConfigError("checkpoint.resume", "never",
                                  f"auto: {self.cfg.run_dir} already holds checkpoints (newest {own[0][0].name}); "
                                  "use a new run_dir to start fresh")
            rejected = {p for p, _ in self._rejected}
            for path, problem in own:
                if path in rejected:
                    continue
                problem = problem or self.check(path)
                if problem is None:
                    return "resume", path
                self.reject(path, problem)
            raise CheckpointError("checkpoint (resume)", self.root,
                                  "no usable checkpoint (each one failed, see above); nothing was changed: start a new "
                                  "run_dir, or checkpoint.load= a checkpoint you trust")
        for kind, field, value in (("load", "checkpoint.load", ck.load), ("init", "checkpoint.init_from", ck.init_from)):
            if value:
                path = resolve_checkpoint(value, field)
                problem = self.check(path)
                if problem is not None:
                    raise CheckpointError(field, value, f"{path.name}: {problem}")
                return kind, path
        return "fresh", None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_chunks, optimizer, scheduler, train_state: Dict[str, Any]) -> Path:
        """Save atomically; a full disk is one UsageError naming the directory and the bytes
        free (the previous checkpoint stays intact)."""
        try:
            return self._save(step, model_chunks, optimizer, scheduler, train_state)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - classified, re-raised unchanged unless the disk is full
            problem = disk_full(e, self.root)
            if problem is None:
                raise
            if _rank() == 0:
                shutil.rmtree(self.root / f".tmp-{step_dir_name(step)}", ignore_errors=True)
            latest = self.latest()
            raise UsageError("run_dir", self.cfg.run_dir, f"{problem} while saving checkpoint step {step} (not saved; "
                             f"{'the previous one, ' + latest.name + ', is intact' if latest else 'no earlier checkpoint'});"
                             " free space or use a run_dir on another disk") from None

    def _save(self, step: int, model_chunks, optimizer, scheduler, train_state: Dict[str, Any]) -> Path:
        from megatron.core import dist_checkpointing

        final = self.root / step_dir_name(step)
        latest = self.latest()
        if latest is not None and latest.name == final.name:
            return final  # already saved at this step (e.g. interval save, then SIGTERM)
        t0 = time.time()
        tmp = self.root / f".tmp-{final.name}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = dict(train_state, step=step, layout=layout_signature())
        sd = _model_sd(model_chunks)
        sd["optimizer"] = optimizer.sharded_state_dict(_merged_model_sd(sd), is_loading=False, metadata=OPTIM_FORMAT)
        sd["opt_param_scheduler"] = scheduler.state_dict()
        sd["train_state"] = state
        sd["rng_state"] = _rng_sharded_object(_rng_state())
        dist_checkpointing.save(sd, str(tmp))
        _barrier()
        if _rank() == 0:
            _write_atomic(tmp / "train_state.json", json.dumps(dict(state, saved_at=time.time()), indent=1, default=str))
        _barrier()
        write_manifest(tmp)
        if _rank() == 0:
            if final.exists():  # a stale, unreferenced directory of the same step
                trash = self.root / f".trash-{final.name}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
        _barrier()
        log.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _prune(self, keep: Path) -> None:
        done = self.completed()
        excess = [p for _, p in done if p != keep][: max(0, len(done) - self.cfg.checkpoint.keep_last)]
        for p in excess:
            trash = self.root / f".trash-{p.name}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model_chunks, optimizer, scheduler, load_optimizer: bool = True) -> Dict[str, Any]:
        """Full training state; returns the saved train state (step, consumed samples...)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict

        common = load_common_state_dict(str(path))
        saved_layout = common["train_state"].get("layout", {})
        same_layout = saved_layout == layout_signature()
        sd = _model_sd(model_chunks)
        if load_optimizer:
            materialize_optimizer_state(optimizer)
            sd["optimizer"] = optimizer.sharded_state_dict(_merged_model_sd(sd), is_loading=True, metadata=OPTIM_FORMAT)
        if same_layout:
            sd["rng_state"] = _rng_sharded_object(None)
        state = dist_checkpointing.load(sd, str(path))
        self._load_model(state, model_chunks)
        if load_optimizer:
            load_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["opt_param_scheduler"])
        if same_layout:
            _set_rng_state(state["rng_state"])
        else:
            log.warning("parallel layout changed since the checkpoint (%s -> %s): model and optimizer resharded, "
                        "RNG states re-seeded", saved_layout, layout_signature())
        return dict(state["train_state"])

    def load_weights(self, path: Path, model_chunks) -> None:
        """Model weights only (checkpoint.init_from). Parameters absent from the checkpoint
        are allowed only for the MSA index branch (dense -> MSA conversion) and for
        Transformer Engine's ``_extra_state`` (FP8 scaling metadata, no weights: a local-spec
        checkpoint has none, and TE starts it fresh)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling

        from ..megatron.checkpoint import alias_missing_keys, is_te_extra_state

        sd = _model_sd(model_chunks)
        renamed = alias_missing_keys(sd, str(path))
        if renamed:
            log.info("init_from %s: %d tensors found under their other checkpoint name (e.g. %s -> %s)",
                     path, len(renamed), *renamed[0])
        state, _missing, unexpected = dist_checkpointing.load(sd, str(path), strict=StrictHandling.RETURN_ALL)
        unexpected = [k for k in unexpected if not is_te_extra_state(k)]  # TE extra state: named by _load_model
        not_index = sorted(k for k in unexpected if not is_index_param(k))
        if dist.is_initialized():  # every rank decides alike (pipeline stages see different keys)
            parts: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, not_index)
            not_index = sorted({k for part in parts for k in part})
        if not_index:
            raise ConfigError("checkpoint.init_from", str(path),
                              f"checkpoints holding every non-index parameter of this model (missing: {not_index[:5]}; "
                              "a dense checkpoint with stacked layer keys or TE extra state: convert it with msa-convert)")
        self._load_model(state, model_chunks, allow_missing=bool(unexpected))  # names missing TE extra state
        if unexpected:
            from ..megatron import init_index_from_dense

            added = init_index_from_dense([unwrap(c) for c in model_chunks], self.cfg.checkpoint.index_init)
            how = sorted({a["init"] for a in added})
            log.warning("init_from %s: %d index-branch tensors were not in the checkpoint; initialised with %s",
                        path, len(unexpected), "; ".join(how))

    @staticmethod
    def _load_model(state: Dict[str, Any], model_chunks, allow_missing: bool = False) -> None:
        """Never torch's strict load (:func:`load_state_into_chunks`): TE's ``_extra_state``
        may be absent; ``allow_missing``: the MSA index branch too (dense -> MSA init)."""
        from ..megatron.checkpoint import load_state_into_chunks

        load_state_into_chunks(state, model_chunks, allow_missing=is_index_param if allow_missing else (lambda k: False))


__all__ = ["CheckpointError", "CheckpointManager", "LATEST", "MANIFEST", "layout_signature", "resolve_checkpoint",
           "step_dir_name", "verify_checkpoint", "write_manifest"]

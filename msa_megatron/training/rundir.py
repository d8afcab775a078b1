"""Run directories: one owner at a time (an advisory lock), fresh directories for new
runs, and the check that a resumed run is the run its checkpoint came from.

A launch without ``run_dir`` gets a new ``runs/<model>-<attention>-<YYYYmmdd-HHMMSS>``;
resuming is explicit: ``run_dir=<existing>``. The resumed run's configuration is compared
with the ``config.yaml`` it was started with: fields that define the run (model, data,
sequence length, batch, parallel sizes, the MSA schedule...) must match, or the launch
is one error listing the differences before anything is written; the fields of
:data:`RESUME_MAY_CHANGE` (length, learning rate, intervals, logging...) may change and
are applied deliberately (the log lists them; the LR schedule continues, see loop.py).

Lock: ``<run_dir>/.lock`` holds ``host pid start-time`` of the process (global rank 0)
that owns the directory, under ``fcntl.flock``. The kernel drops the flock when that
process dies however it dies, so a lock file nobody holds is stale: it is taken over and
the log says whose it was. On a network filesystem without working flock the lock may
not exclude a process on another host; the start-up line names the holder either way.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .config import UsageError

LOCK_NAME = ".lock"


class RunDirLock:
    """Held for the lifetime of a run (global rank 0 only)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None
        self.stale: Optional[str] = None

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise one UsageError naming the holder. Sets ``stale`` to the
        previous holder's line when a lock file nobody held was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd) or "another process (no holder recorded yet)"
            os.close(fd)
            raise UsageError("run_dir", str(self.path.parent),
                             f"in use by {holder}; wait for that run to end (or stop it), or choose another run_dir")
        previous = _read(fd)
        if previous:
            self.stale = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def holder_of(run_dir: str) -> Tuple[bool, str]:
    """(locked now, recorded holder) of a run directory, for tests and messages."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False, ""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, _read(fd)
    finally:
        os.close(fd)


#: Dotted config paths (or their prefixes) that may differ from the run's config.yaml when
#: it is resumed; any other difference is refused.
RESUME_MAY_CHANGE = (
    "run_dir", "train.steps", "train.tokens", "train.lr", "train.min_lr", "train.lr_warmup_steps",
    "train.lr_warmup_fraction", "train.lr_decay_style", "train.lr_decay_steps", "train.lr_wsd_decay_steps",
    "train.lr_wsd_decay_style", "train.weight_decay", "train.clip_grad", "train.eval_interval", "train.eval_iters",
    "train.nan_policy", "train.max_consecutive_skips", "train.debug", "logging", "checkpoint", "data.num_workers",
    "attention.msa.recall_interval", "attention.recall_sweep", "parallel.overlap_grad_reduce",
    "parallel.overlap_param_gather", "train.requires_gpu",
)
#: Fields added to the schema whose behaviour before they existed differs from their default:
#: a saved config.yaml without the field ran with this value, so resuming it under another one
#: is a change like any other (refused, naming the value to pass to resume exactly).
BEHAVIOUR_BEFORE_FIELD = {"attention.msa.index_grad_clip": "global"}
#: Allowed changes that the LR scheduler takes (the rest act by themselves).
LR_FIELDS = ("train.lr", "train.min_lr", "train.lr_warmup_steps", "train.lr_warmup_fraction", "train.lr_decay_style",
             "train.lr_decay_steps", "train.lr_wsd_decay_steps", "train.lr_wsd_decay_style", "train.weight_decay")


def new_run_dir(model: str, attention: str, suffix: str = "", root: str = "runs") -> str:
    """``runs/<model>-<attention>-<timestamp><suffix>``, never an existing directory."""
    base = os.path.join(root, f"{model}-{attention}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   defaults: Optional[Mapping[str, Any]] = None) -> Tuple[List[str], Dict[str, Tuple[Any, Any]]]:
    """(refused differences as 'key old -> new' lines, allowed {key: (old, new)}). A field
    missing from the saved config (added to the schema since) counts as unchanged when the
    current value is its default (``defaults``: flattened), unless the run behaved otherwise
    before the field existed (:data:`BEHAVIOUR_BEFORE_FIELD`)."""
    a, b = flatten(saved), flatten(current)
    defaults = defaults or {}
    refused: List[str] = []
    allowed: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        if key not in a and key in BEHAVIOUR_BEFORE_FIELD and key in b:
            old, new = BEHAVIOUR_BEFORE_FIELD[key], b[key]
            if old != new and not _may_change(key):
                refused.append(f"{key} {old!r} (the behaviour before the field existed) -> {new!r}")
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old == new or (key not in a and key in defaults and defaults[key] == new):
            continue
        if _may_change(key):
            allowed[key] = (old, new)
        else:
            refused.append(f"{key} {old!r} -> {new!r}")
    return refused, allowed


__all__ = ["BEHAVIOUR_BEFORE_FIELD", "LOCK_NAME", "LR_FIELDS", "RESUME_MAY_CHANGE", "RunDirLock", "config_changes", "flatten", "holder_of",
           "new_run_dir"]

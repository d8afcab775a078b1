"""Where a run's numbers go: a progress bar with ETA and one line per log interval on the
console (rank 0), one JSON object per logged step in ``<run_dir>/metrics.jsonl``, and the
same scalars in Weights & Biases (offline by default; ``logging.wandb.mode=online`` to
stream). Without wandb installed the run says so once and keeps the JSONL.

On resume, records past the resumed step (logged after the checkpoint by the interrupted
run) are dropped from metrics.jsonl, so the file is one clean series.
"""

from __future__ import annotations

import json
import logging as _logging
import math
import os
import secrets
import sys
import warnings
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .config import Config
from .metrics import public_scalars

log = _logging.getLogger("msa_megatron.training")

#: Console fields, in order: (key, label, format).
_CONSOLE = (
    ("lm_loss", "loss", "{:.4f}"),
    ("val_lm_loss", "val", "{:.4f}"),
    ("indexer_kl", "kl", "{:.4f}"),
    ("recall", "recall", "{:.3f}"),
    ("moe_aux_loss", "aux", "{:.3f}"),
    ("attention_mode", "mode", "{}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("mfu", "mfu", "{:.1%}"),
    ("mem_gb", "mem", "{:.2f}GB"),
)


class _BarAwareHandler(_logging.StreamHandler):
    """Log records printed above the progress bar (tqdm.write), not through it."""

    def emit(self, record: _logging.LogRecord) -> None:
        bar = _active_bar
        if bar is not None and not bar.disable:
            try:
                bar.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - logging must not raise
                self.handleError(record)
        else:
            super().emit(record)


#: The progress bar of the running RunLogger (rank 0), if any.
_active_bar = None

#: Expected every run on this kind of machine, said once: INFO, not WARNING (message prefix ->
#: shorter text or None to keep it).
_DEMOTED = {
    "MSA: no CUDA device; Megatron-Core runs on CPU": "MSA: no CUDA device: Megatron-Core runs on CPU (gloo) with the "
                                                       "compatibility layer (logging.level=DEBUG lists the patched calls)",
    "MSA: registered with Megatron-Core": None,
    "MSA: Triton kernels cannot run": None,
}


def _demote(rank_level: int):
    def keep(record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(m in message for m in _KNOWN_NOISE):
            return False
        for prefix, short in _DEMOTED.items():
            if message.startswith(prefix) and record.levelno == _logging.WARNING:
                if rank_level > _logging.INFO:
                    return False
                record.levelno, record.levelname = _logging.INFO, "INFO"
                if short is not None and rank_level > _logging.DEBUG:
                    record.msg, record.args = short, ()
        return True
    return keep


def setup_python_logging(rank: int, level: str) -> None:
    """Rank 0 logs at ``level``; other ranks only warnings. Megatron's INFO chatter is muted,
    lines that every run on a machine prints are INFO (:data:`_DEMOTED`), and records print
    above the progress bar."""
    root = _logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(_logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else "WARNING")
    for noisy in ("megatron.core", "megatron"):
        _logging.getLogger(noisy).setLevel("WARNING")
    handler.addFilter(_demote(root.level))


#: Megatron-Core start-up messages that are expected here and say nothing actionable.
_KNOWN_NOISE = (
    "GPTModel IS DEPRECATED",
    "full_param_layout not provided",
    "Building a BlendedDataset for a single MegatronDataset",
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "absl.logging is not installed",
    "full scope is deprecated",
    "MimoModelConfig is experimental",
    "is deprecated. Please use `torch.distributed",
    "Tensor that is not a leaf Tensor is being accessed",
    "async save is deprecated",
    "CUDA_DEVICE_MAX_CONNECTIONS",
)


def quiet_known_warnings() -> None:
    """Python warnings of the same kind (import-time notices of optional fused kernels), and
    torch's "No CUDA runtime is found" notice of torch.utils.cpp_extension on CPU machines."""
    for text in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    _logging.getLogger("torch.utils.cpp_extension").setLevel("ERROR")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite values become null (the event record says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class RunLogger:
    """All sinks of one run. Only rank 0 creates one with ``active=True``."""

    def __init__(self, cfg: Config, active: bool, start_step: int, total_steps: int, wandb_id: Optional[str]):
        self.cfg, self.active = cfg, active
        self.total, self.start_step = total_steps, start_step
        self.run_dir = Path(cfg.run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.wandb_dir: Optional[str] = None
        self._bar = None
        self._t0 = time.time()
        if not active:
            return
        if cfg.logging.jsonl:
            self._truncate_jsonl(start_step)
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        else:
            self._jsonl = None
        self._start_wandb()
        self._tb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard, or "
                            "logging.tensorboard=false)")
            else:  # purge_step: a resumed run drops the interrupted run's events past the checkpoint
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step else None)
        if cfg.logging.progress_bar:
            try:
                from tqdm import tqdm
            except ImportError:
                log.warning("tqdm is not installed: no progress bar (step lines still print)")
            else:
                self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                                 disable=None, file=sys.stderr)
                global _active_bar
                _active_bar = self._bar

    # ------------------------------------------------------------------ sinks
    def _truncate_jsonl(self, start_step: int) -> None:
        """Keep the records up to the resumed step; a torn line (a run killed mid-write, a
        full disk) is dropped with a warning instead of blocking every resume."""
        if not self.jsonl_path.exists():
            return
        text = self.jsonl_path.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        kept, torn = [], 0
        for ln in lines:
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:
                torn += 1
                continue
            if record.get("step", 0) <= start_step:
                kept.append(ln)
        if torn:
            log.warning("%s: dropped %d unreadable (torn) line%s", self.jsonl_path, torn, "s" if torn > 1 else "")
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.jsonl_path)

    def _start_wandb(self) -> None:
        w = self.cfg.logging.wandb
        if not w.enabled or w.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: logging to %s only (pip install wandb to get W&B runs)", self.jsonl_path)
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_id = self.wandb_id or secrets.token_hex(4)  # not `random`: its state is checkpointed
        self.wandb_run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or self.run_dir.name, group=w.group, tags=list(w.tags),
            dir=str(self.run_dir), mode=w.mode, id=self.wandb_id, resume="allow", config=self.cfg.to_dict(),
        )
        self.wandb_dir = getattr(self.wandb_run, "dir", None)
        if self.wandb_dir:
            self.wandb_dir = str(Path(self.wandb_dir).parent)

    # ------------------------------------------------------------------ events
    def info(self, message: str) -> None:
        if self.active:
            self._write(message)

    def _write(self, message: str) -> None:
        if self._bar is not None and not self._bar.disable:  # above the bar, on the bar's stream
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def advance(self, step: int, loss: Optional[float] = None) -> None:
        if self.active and self._bar is not None:
            self._bar.n = step
            if loss is not None and math.isfinite(loss):
                self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._bar.refresh()

    def log_step(self, step: int, scalars: Dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _clean(v) for k, v in scalars.items()}}
        if self._jsonl is not None:
            self._append(json.dumps(record) + "\n")
        public = public_scalars(scalars)
        if not self.cfg.logging.per_layer:  # per-layer panels are opt-in; metrics.jsonl keeps them
            public = {k: v for k, v in public.items() if "/layer_" not in k}
        if self.wandb_run is not None:
            self.wandb_run.log(public, step=step)
        if self._tb is not None:
            for name, value in public.items():
                self._tb.add_scalar(name, value, step)
        self._write(self._console_line(step, scalars))

    def event(self, step: int, kind: str, message: str) -> None:
        """A non-scalar event (non-finite step, SIGTERM, ...): console + JSONL + wandb summary."""
        if not self.active:
            return
        if self._jsonl is not None:
            self._append(json.dumps({"step": step, "event": kind, "message": message}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.summary[f"event/{kind}"] = f"step {step}: {message}"
        self._write(f"[{kind}] step {step}: {message}")

    def _append(self, line: str) -> None:
        """One metrics.jsonl line; a full disk is one error naming the directory."""
        try:
            self._jsonl.write(line)
        except OSError as e:
            from .checkpoint import disk_full
            from .config import UsageError

            problem = disk_full(e, self.run_dir)
            if problem is None:
                raise
            raise UsageError("run_dir", str(self.run_dir), f"{problem} while writing metrics.jsonl") from None

    def _console_line(self, step: int, s: Dict[str, Any]) -> str:
        parts = [f"step {step}/{self.total}"]
        for key, label, fmt in _CONSOLE:
            v = s.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v) and key == "mfu"):
                continue
            parts.append(f"{label} {fmt.format(v)}")
        done = step - self.start_step
        if done > 0:
            eta = (time.time() - self._t0) / done * (self.total - step)
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def close(self, summary: Optional[Dict[str, Any]] = None) -> None:
        if not self.active:
            return
        if self._bar is not None:
            global _active_bar
            _active_bar = None
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self.wandb_run is not None:
            if summary:
                for k, v in summary.items():
                    self.wandb_run.summary[k] = v
            self.wandb_run.finish()


def read_jsonl(path: Path) -> list:
    """Records of a metrics.jsonl; torn lines are skipped."""
    out = []
    for ln in Path(path).read_text(errors="replace").splitlines():
        if ln.strip():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
    return out


def summarize(path: Path) -> Dict[str, Any]:
    """Headline metrics from metrics.jsonl: first logged, last logged, and (MSA runs) the
    last value logged before the warmup -> sparse switch, since the KL is measured over
    all causal tokens before it and over the selected tokens after it."""
    records = [r for r in read_jsonl(path) if "event" not in r]
    out: Dict[str, Any] = {}
    modes = [(r["step"], r.get("attention_mode")) for r in records if r.get("attention_mode")]
    switches = [s for (s, m), (_, prev) in zip(modes[1:], modes[:-1]) if m != prev]
    for key in ("lm_loss", "val_lm_loss", "indexer_kl", "recall", "index_entropy", "main_entropy"):
        series = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not series:
            continue
        entry = {"first_step": series[0][0], "first": series[0][1], "last_step": series[-1][0], "last": series[-1][1]}
        before = [(s, v) for s, v in series if switches and s < switches[0]]
        if before and before[-1][0] != series[0][0]:
            entry["before_switch_step"], entry["before_switch"] = before[-1]
        out[key] = entry
    if modes:
        out["attention_mode"] = {"first": modes[0][1], "last": modes[-1][1], "switched_at_steps": switches}
    peaks = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    if peaks:  # CUDA runs: torch.cuda.max_memory_allocated over the whole run, GiB
        out["peak_mem_gib"] = max(peaks)
    return out


def format_summary(summary: Dict[str, Any]) -> str:
    rows = ["summary (first logged -> [before the switch to sparse ->] last logged):"]
    names = {"lm_loss": "LM loss", "val_lm_loss": "held-out LM loss", "indexer_kl": "indexer KL",
             "recall": "selection recall", "index_entropy": "index entropy", "main_entropy": "main entropy"}
    for key, label in names.items():
        if key in summary:
            s = summary[key]
            mid = f" -> {s['before_switch']:.4f} (step {s['before_switch_step']})" if "before_switch" in s else ""
            rows.append(f"  {label:<18} {s['first']:.4f} (step {s['first_step']}){mid} -> {s['last']:.4f} (step {s['last_step']})")
    if "attention_mode" in summary:
        m = summary["attention_mode"]
        where = f"from step {m['switched_at_steps'][0]}" if m["switched_at_steps"] else "no switch"
        rows.append(f"  attention mode     {m['first']} -> {m['last']} ({where})")
    if "peak_mem_gib" in summary:
        rows.append(f"  peak GPU memory    {summary['peak_mem_gib']:.2f} GiB (max allocated)")
    return "\n".join(rows)


#: The panels of :func:`write_plots`: file name -> (title, [(metrics.jsonl key, label)]).
PLOTS = {
    "loss.png": ("LM loss", [("lm_loss", "train"), ("val_lm_loss", "held-out")]),
    "kl.png": ("indexer KL", [("indexer_kl", "train"), ("val/indexer_kl", "held-out")]),
    "recall.png": ("selection recall", [("recall", "train (sampled)"), ("val/recall", "held-out")]),
    "entropy.png": ("attention entropy", [("index_entropy", "index"), ("main_entropy", "main")]),
}


def write_plots(jsonl_path: Path, out_dir: Path) -> list:
    """PNG plots of a run's metrics.jsonl (the panels of :data:`PLOTS` that have data; the
    switch to sparse attention is a dashed line). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    records = [r for r in read_jsonl(jsonl_path) if "event" not in r]
    modes = [(r["step"], r.get("attention_mode")) for r in records if r.get("attention_mode")]
    switch = next((s for (s, m), (_, prev) in zip(modes[1:], modes[:-1]) if m != prev), None)
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (title, series) in PLOTS.items():
        lines = [(label, [(r["step"], r[key]) for r in records if r.get(key) is not None]) for key, label in series]
        lines = [(label, pts) for label, pts in lines if pts]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, pts in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=label)
        if switch is not None:
            ax.axvline(switch, color="grey", linestyle="--", linewidth=1, label=f"sparse from step {switch}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written


__all__ = ["PLOTS", "write_plots", "RunLogger", "format_duration", "format_summary", "read_jsonl", "setup_python_logging", "summarize"]

"""Per-run results of the fidelity matrix, read back from each run's metrics.jsonl.

Everything here is derived from what the trainer logged, so a results.json can be rebuilt
from the run directories at any time (``scripts/fidelity.py --collect DIR``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

#: Steps of the main-branch entropy curves kept in results.json (the paper's point is the
#: collapse early in training).
ENTROPY_STEPS = 100


def _read(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _series(records, key: str, x: str = "step") -> List[List[float]]:
    return [[r[x], r[key]] for r in records if _finite(r.get(key)) and x in r]


def tail_records(records: List[Dict[str, Any]], fraction: float) -> List[Dict[str, Any]]:
    """The logged training steps (records with ``lm_loss``) after (1 - fraction) of the last
    one: the end of a run over which its training statistics are averaged."""
    train = [r for r in records if "lm_loss" in r and "step" in r]
    if not train:
        return []
    last = max(r["step"] for r in train)
    return [r for r in train if r["step"] > last * (1 - fraction)]


def run_results(run_dir: Path) -> Dict[str, Any]:
    """Curves and headline numbers of one run (empty curves when a metric was not logged)."""
    run_dir = Path(run_dir)
    records = [r for r in _read(run_dir / "metrics.jsonl") if "event" not in r]
    events = [r for r in _read(run_dir / "metrics.jsonl") if "event" in r]
    train = [r for r in records if "lm_loss" in r]
    out: Dict[str, Any] = {"run_dir": str(run_dir), "events": events}
    out["loss"] = _series(train, "lm_loss")
    out["tokens"] = _series(train, "tokens")
    out["val_loss"] = [[r["step"], r.get("tokens"), r["val_lm_loss"]] for r in train if _finite(r.get("val_lm_loss"))]
    out["assoc_recall"] = _series(train, "val_assoc_recall_acc")
    out["grad_norm"] = _series(train, "grad_norm")
    out["indexer_kl"] = _series(train, "indexer_kl")
    out["recall"] = _series(train, "recall")
    out["val_recall"] = _series(train, "val/recall")
    out["modes"] = [[r["step"], r["attention_mode"]] for r in train if r.get("attention_mode")]
    layers = sorted({k.split("/layer_")[1] for r in train for k in r if k.startswith("main_entropy/layer_")}, key=int)
    out["main_entropy"] = {f"layer_{i}": _series([r for r in train if r["step"] <= ENTROPY_STEPS],
                                                 f"main_entropy/layer_{i}") for i in layers}
    sweep = {}
    for r in records:
        sweep.update({k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("recall_sweep/") and _finite(v)})
    out["recall_sweep"] = sweep
    switch = next((s for s, m in out["modes"] if m == "msa"), None)
    out["switch_step"] = switch
    out["final"] = {
        "val_loss": out["val_loss"][-1][2] if out["val_loss"] else None,
        "assoc_recall": out["assoc_recall"][-1][1] if out["assoc_recall"] else None,
        "max_grad_norm": max((v for _, v in out["grad_norm"]), default=None),
        # spikes later in training, past the first 10% of steps (where every run starts high)
        "max_grad_norm_late": max((v for s, v in out["grad_norm"] if s > 0.1 * len(out["grad_norm"])), default=None),
        "kl": out["indexer_kl"][-1][1] if out["indexer_kl"] else None,
        # mean over the steps sampled in sparse mode (the selection actually used)
        "mean_recall": _mean([v for s, v in out["recall"] if switch is not None and s >= switch]),
        # the trained selection: held-out recall at the last evaluation
        "val_recall": out["val_recall"][-1][1] if out["val_recall"] else None,
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1].get("tokens") if train else 0,
    }
    cfg = run_dir / "config.yaml"
    out["config_yaml"] = cfg.read_text() if cfg.is_file() else ""
    return out


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def conversion_summary(dense: Dict[str, Any], converted: Dict[str, Any], tolerance: float = 0.01) -> Dict[str, Any]:
    """Did the converted model reach the dense model's final held-out loss, and after how many
    tokens of continued training (as a fraction of the dense run's tokens)? Only evaluations
    after the switch to sparse attention count (before it the main branch is dense).
    ``dense_last_drop``: dense's relative change over its last evaluation interval, which says how
    far its final loss still was from a plateau (None with fewer than two evaluations)."""
    target = dense["final"]["val_loss"]
    dense_tokens = dense["final"]["tokens"] or 0
    switch = converted.get("switch_step")
    evals = [v for _, _, v in dense.get("val_loss", [])]
    out: Dict[str, Any] = {"dense_final_val_loss": target, "dense_tokens": dense_tokens, "tolerance": tolerance,
                           "reached_at_tokens": None, "reached_fraction": None,
                           "dense_last_drop": evals[-1] / evals[-2] - 1 if len(evals) >= 2 and evals[-2] else None}
    if target is None or switch is None:
        return out
    sparse = [(s, t, v) for s, t, v in converted["val_loss"] if s >= switch]
    out["first_sparse_val_loss"] = sparse[0][2] if sparse else None
    for s, t, v in sparse:
        if v <= target * (1 + tolerance):
            out["reached_at_tokens"] = t
            out["reached_fraction"] = t / dense_tokens if dense_tokens else None
            break
    return out


def conversion_vs_continued(continued: Dict[str, Any], converted: Dict[str, Any],
                            tolerance: float = 0.01) -> Dict[str, Any]:
    """The conversion against dense continued from the same checkpoint for the same steps (both
    evaluated at the same steps): a dense run still improving makes its own final loss the
    wrong target (run 14: the conversion's first sparse evaluation was already 9% below it), so
    "within 1% of dense" is judged against dense trained as long. ``pairs``: [step, tokens,
    converted, continued, converted / continued - 1] at the sparse evaluations both made;
    ``within_at_tokens``: the conversion's tokens at the first of them within ``tolerance``
    (None if none), ``final_rel``: the last pair's ratio."""
    switch = converted.get("switch_step")
    ref = {s: v for s, _, v in continued.get("val_loss", [])}
    pairs = [[s, t, v, ref[s], v / ref[s] - 1] for s, t, v in converted.get("val_loss", [])
             if switch is not None and s >= switch and s in ref]
    hit = next((p for p in pairs if p[4] <= tolerance), None)
    return {"tolerance": tolerance, "pairs": pairs, "within_at_tokens": hit[1] if hit else None,
            "within_at_step": hit[0] if hit else None, "final_rel": pairs[-1][4] if pairs else None}


def collect(out_dir: Path, names) -> Dict[str, Dict[str, Any]]:
    root = Path(out_dir) / "runs"
    return {n: run_results(root / n) for n in names if (root / n / "metrics.jsonl").is_file()}


__all__ = ["ENTROPY_STEPS", "collect", "conversion_summary", "conversion_vs_continued", "run_results", "tail_records"]

"""Per-layer index statistics of the scale matrix's MSA runs (issue 19 asks for per-layer KL,
entropy and recall): does each layer's indexer follow its teacher, and where does the main
branch concentrate?

The trainer logs ``indexer_kl/layer_<i>``, ``index_entropy/layer_<i>`` and
``main_entropy/layer_<i>`` every logged step; they are averaged over the last fraction of a
run's steps (where every judged MSA arm trains sparse). Selection recall per layer comes from
the held-out evaluation (``val/recall/layer_<i>``), which the report already collects.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from .collect import tail_records
from .scale import parse_name

#: (logged key prefix, name in the table), trained-step statistics
TRAIN_STATS = (("indexer_kl", "indexer KL"), ("index_entropy", "index entropy (nats)"),
               ("main_entropy", "main-branch entropy (nats)"))


def layer_tail_means(records: Sequence[Dict[str, Any]], fraction: float) -> Dict[str, Dict[int, float]]:
    """{stat: {layer: mean over the logged training steps after (1 - fraction) of the last}}
    for the TRAIN_STATS a run logged; {} for a run without MSA layers."""
    tail = tail_records(records, fraction)
    out: Dict[str, Dict[int, float]] = {}
    for stat, _ in TRAIN_STATS:
        sums: Dict[int, List[float]] = {}
        for r in tail:
            for k, v in r.items():
                if k.startswith(f"{stat}/layer_") and isinstance(v, (int, float)):
                    sums.setdefault(int(k.rsplit("_", 1)[1]), []).append(float(v))
        if sums:
            out[stat] = {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}
    return out


def layer_table(col: Dict[str, Any], ctx: str, fraction: float) -> List[str]:
    """Markdown lines: per MSA run of ``ctx`` (ablations included: their pathologies show here),
    one row per statistic, one column per layer."""
    rows: List[Tuple[str, str, Dict[int, float]]] = []
    for name, r in col["runs"].items():
        if parse_name(name)[0] != ctx:
            continue
        stats = r["final"].get("layer_stats") or {}
        for stat, label in TRAIN_STATS:
            if stats.get(stat):
                rows.append((name, label, stats[stat]))
        held_out = {int(k.rsplit("_", 1)[1]): v for k, v in r["final"].get("val_recall_layers", {}).items()}
        if held_out:
            rows.append((name, "selection recall (held-out, end)", held_out))
    if not rows:
        return []
    layers = sorted({layer for _, _, v in rows for layer in v})
    lines = ["", f"Per-layer index statistics at {ctx} (MSA runs; KL and entropies: mean over the last "
             f"{100 * fraction:.0f}% of the logged training steps; recall: the last held-out evaluation):", "",
             "| run | statistic | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---|---|" + "---:|" * len(layers)]
    for name, label, values in rows:
        pct = label.startswith("selection recall")
        cells = ["-" if values.get(i) is None else (f"{100 * values[i]:.1f}%" if pct else f"{values[i]:.3f}")
                 for i in layers]
        lines.append(f"| `{name}` | {label} | " + " | ".join(cells) + " |")
    return lines


__all__ = ["TRAIN_STATS", "layer_table", "layer_tail_means"]

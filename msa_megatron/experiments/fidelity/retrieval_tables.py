"""Retrieval tables of the scale report (issue 19): when each run learned to copy at each
distance, whether MSA's index reached the record, and how far a run done twice moved.

Run 15 (one H100) showed why end-of-run accuracy alone misleads: copying at a distance
switches on within ~50 steps, at a step that moved by ~50 between two runs of one recipe,
and the 300-step arms end while the far buckets are still switching on. The step at which
each bucket first reaches 50% (per run, and for the earlier copy of a run done twice) says
how much of a gap is a lag and how much of it is timing noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .scale import LABELS, parse_name

#: accuracy at which a bucket counts as learned in the onset table
ONSET = 0.5
#: the MSA arms whose selection and retrieval are judged (ablations break them on purpose)
JUDGED_MSA = ("msa", "msa_long_warmup", "msa_sepclip")


def bucket_lo(bucket: str) -> int:
    """"d320_1024" -> 320: the order of distance buckets."""
    return int(bucket[1:].split("_")[0])


def bucket_label(bucket: str) -> str:
    return bucket[1:].replace("_", "-")


def arm_name(variant: str) -> str:
    """How claims name an arm: "MSA" for the recipe's own, the label otherwise."""
    return "MSA" if variant == "msa" else LABELS[variant]


def needle_finals(curves: Dict[str, List[List[float]]]) -> Dict[str, Any]:
    """The last evaluation of a run's needle diagnostic, from its ``val_passkey_needle/...``
    curves (scale_report.bucket_curves): ``needle`` {bucket: mean over layers},
    ``needle_layers`` {layer_i: overall}, ``needle_any`` {bucket: any layer} and
    ``needle_layer_buckets`` {layer_i: {bucket: value}} (the last two logged since run 15)."""
    out: Dict[str, Any] = {"needle": {}, "needle_layers": {}, "needle_any": {}, "needle_layer_buckets": {}}
    for key, curve in curves.items():
        if not curve:
            continue
        head, _, bucket = key.partition("/")
        if key.startswith("d"):
            out["needle"][key] = curve[-1][1]
        elif head == "any" and bucket:
            out["needle_any"][bucket] = curve[-1][1]
        elif head.startswith("layer_"):
            if bucket:
                out["needle_layer_buckets"].setdefault(head, {})[bucket] = curve[-1][1]
            else:
                out["needle_layers"][head] = curve[-1][1]
    return out


def onset_step(curve: Sequence[Sequence[float]], level: float = ONSET) -> Optional[int]:
    """The first evaluation step of ``[[step, accuracy], ...]`` at which accuracy >= level."""
    return next((int(step) for step, acc in curve if acc is not None and acc >= level), None)


def _ctx_runs(runs: Dict[str, Any], ctx: str) -> List[Tuple[str, Any]]:
    return [(n, r) for n, r in runs.items() if parse_name(n)[0] == ctx]


def onset_table(col: Dict[str, Any], ctx: str, bkey: str = "passkey_buckets") -> List[str]:
    """Markdown lines: per run of ``ctx`` (and each earlier copy of a run done twice), the step at
    which each distance bucket first reached ONSET accuracy; "-" where it never did."""
    rows: List[Tuple[str, Any]] = [(f"`{n}`", r[bkey]) for n, r in _ctx_runs(col["runs"], ctx) if r.get(bkey)]
    for n, others in col.get("reruns", {}).items():
        if parse_name(n)[0] == ctx:
            rows += [(f"`{n}` (earlier run)", o[bkey]) for o in others if o.get(bkey)]
    if not rows:
        return []
    buckets = sorted({b for _, curves in rows for b in curves}, key=bucket_lo)
    last = max((int(c[-1][0]) for _, curves in rows for c in curves.values() if c), default=0)
    lines = ["", f"Step at which accuracy first reached {100 * ONSET:.0f}% at {ctx}, per distance bucket (evaluations "
             f"every few steps; '-': not by the run's end, step {last}). A later step for MSA than for dense *from "
             "the same base* is a lag in learning to copy; the earlier copies of runs done twice show how much the "
             "step moves by itself:", "",
             "| run | " + " | ".join(bucket_label(b) for b in buckets) + " |", "|---|" + "---:|" * len(buckets)]
    steps = [[onset_step(curves.get(b, [])) for b in buckets] for _, curves in rows]
    if all(x is None for row in steps for x in row):
        return []  # nothing learned at this length (language-modelling runs): no table

    def cell(step: Optional[int], curve: Sequence[Sequence[float]]) -> str:
        if step is None:
            return "-"
        return f"{step} (lost: {100 * curve[-1][1]:.0f}% at the end)" if curve[-1][1] < ONSET else str(step)

    lines += [f"| {label} | " + " | ".join(cell(x, curves.get(b, [])) for x, b in zip(row, buckets)) + " |"
              for (label, curves), row in zip(rows, steps)]
    return lines


def needle_table(col: Dict[str, Any], ctx: str) -> List[str]:
    """Markdown lines: per MSA run of ``ctx`` that logged the needle diagnostic (training/needle.py),
    its last evaluation per distance bucket: the mean over MSA layers, any layer, and the layer
    that selected the needle most often overall, with the per-layer totals."""
    rows = [(n, r["final"]) for n, r in _ctx_runs(col["runs"], ctx) if r["final"].get("needle")]
    if not rows:
        return []
    buckets = sorted({b for _, f in rows for b in f["needle"]}, key=bucket_lo)
    lines = ["", f"Needle selection at {ctx} (MSA runs, last evaluation): how often the key block holding the "
             "passkey digit to copy was selected (by any KV group) at the answer position, per distance bucket; "
             "'mean' over the MSA layers, 'any' when at least one layer selected it, and the layer that selected it "
             "most often. Low where accuracy is low: the index missed the record; high: it was selected and not "
             "used:", "", "| run | layers | " + " | ".join(bucket_label(b) for b in buckets) + " | per layer |",
             "|---|---|" + "---:|" * len(buckets) + "---|"]

    def cells(values: Dict[str, float]) -> str:
        return " | ".join("-" if values.get(b) is None else f"{100 * values[b]:.1f}%" for b in buckets)

    for n, f in rows:
        per_layer = ", ".join(f"{k.split('_')[-1]}: {100 * v:.0f}%" for k, v in
                              sorted(f["needle_layers"].items(), key=lambda kv: int(kv[0].split("_")[-1])))
        lines.append(f"| `{n}` | mean | {cells(f['needle'])} | {per_layer} |")
        if f.get("needle_any"):
            lines.append(f"| `{n}` | any | {cells(f['needle_any'])} | |")
        by_layer = f.get("needle_layer_buckets") or {}
        if by_layer and f["needle_layers"]:
            best = max(f["needle_layers"], key=f["needle_layers"].get)
            if best in by_layer:
                lines.append(f"| `{n}` | {best.replace('_', ' ')} | {cells(by_layer[best])} | |")
    return lines


def rerun_accuracy(col: Dict[str, Any], ctx: str, buckets: Sequence[str],
                   bkey: str = "passkey_buckets") -> Dict[str, float]:
    """{variant: the largest accuracy difference (absolute, 0..1) in ``buckets`` between a run of
    ``ctx`` and an earlier complete copy of it}: the noise of one seed on the retrieval claim."""
    out: Dict[str, float] = {}
    for n, others in col.get("reruns", {}).items():
        c, variant, _ = parse_name(n)
        main = col["runs"].get(n, {}).get("final", {}).get(bkey) or {}
        if c != ctx:
            continue
        for o in others:
            earlier = {b: v[-1][1] for b, v in (o.get(bkey) or {}).items() if v}
            gaps = [abs(main[b] - earlier[b]) for b in buckets if b in main and b in earlier]
            if gaps:
                out[variant] = max(out.get(variant, 0.0), max(gaps))
    return out


def onset_plot(col: Dict[str, Any], ctxs: Sequence[str], path: Path, colors: Dict[str, str],
               bkey: str = "passkey_buckets") -> Optional[Path]:
    """Accuracy vs training step in the two farthest buckets of each context that some run learned
    (one panel per bucket; earlier copies of runs done twice dashed): where the end-of-run table
    hides a lag."""
    panels = []
    for ctx in ctxs:
        runs = [(n, r) for n, r in _ctx_runs(col["runs"], ctx) if r.get(bkey)]
        if len(runs) < 2:
            continue
        learned = {b for _, r in runs for b, curve in r[bkey].items() if onset_step(curve) is not None}
        panels += [(ctx, b) for b in sorted(learned, key=bucket_lo)[-2:]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (ctx, b) in zip(axes[0], panels):
        for n, r in _ctx_runs(col["runs"], ctx):
            curve = (r.get(bkey) or {}).get(b)
            if curve:
                v = parse_name(n)[1]
                ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", color=colors.get(v, "gray"),
                        label=LABELS[v])
                for o in col.get("reruns", {}).get(n, []):
                    old = (o.get(bkey) or {}).get(b)
                    if old:
                        ax.plot([s for s, _ in old], [a for _, a in old], ls="--", color=colors.get(v, "gray"),
                                alpha=0.6, label=f"{LABELS[v]}, earlier run")
        ax.axhline(ONSET, ls=":", color="gray")
        ax.set(title=f"{ctx}, distance {bucket_label(b)}", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["JUDGED_MSA", "ONSET", "arm_name", "bucket_label", "bucket_lo", "needle_finals", "needle_table", "onset_plot", "onset_step",
           "onset_table", "rerun_accuracy"]

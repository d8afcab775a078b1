"""The scale matrix's ablations (issue 19), each beside MSA of the same seed and judged against
every MSA seed: which of the paper's pathologies appear?

The paper names one pathology per part of its recipe (../shared/msa_notes.md):

* no stop-gradient: the KL's gradient reaches the backbone -> gradient spikes and a worse model;
* no warmup: the indexer learns from a main branch whose attention is still collapsing -> it
  chases a moving teacher (a higher indexer KL, a worse selection);
* no KL teacher (frozen indexer): selection from an untrained indexer -> less of the attention
  mass selected, a worse model.

Each signal is read from what the trainer logged (metrics.jsonl) and tabled beside the same
seed's MSA run. A pathology "appears" only beyond every MSA seed of that context by the margins
below (MSA's own seeds differ: run 16's held-out selection recall spans 92.1-94.0%), and a loss
difference counts only beyond the same-seed noise of the matrix (a run done more than once,
:func:`scale_report.rerun_spread`).
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Optional

from .scale import LABELS, parse_name, run_name

#: the ablation variants, in the order the issue lists them
ABLATIONS = ("msa_no_stopgrad", "msa_no_warmup", "msa_no_teacher")
#: a logged step past the first 10% of training is a gradient spike when its norm exceeds this
#: multiple of the run's median over those steps
SPIKE_FACTOR = 3.0
#: more spikes than any MSA seed and a late maximum this many times the largest: "gradient spikes appear"
SPIKE_MAX_RATIO = 1.5
#: the indexer KL (mean over the last 10% of steps) this many times the largest MSA seed's: "chases its teacher"
KL_RATIO = 1.10
#: held-out selection recall this many points below the lowest MSA seed's: "selects worse"
RECALL_POINTS = 1.0
#: the end of a run over which the indexer KL is averaged (as the report's train tail)
TAIL = 0.10


def grad_spikes(grad_norm: List[List[float]]) -> Dict[str, Optional[float]]:
    """Gradient spikes past the first 10% of the logged steps (where every run starts high):
    ``count`` of steps above SPIKE_FACTOR x their median, ``max`` and ``median`` of the norm."""
    if not grad_norm:
        return {"count": None, "max": None, "median": None}
    last = max(s for s, _ in grad_norm)
    late = [v for s, v in grad_norm if s > 0.1 * last and math.isfinite(v)]
    if not late:
        return {"count": None, "max": None, "median": None}
    med = median(late)
    return {"count": sum(v > SPIKE_FACTOR * med for v in late), "max": max(late), "median": med}


def kl_tail(run: Dict[str, Any]) -> Optional[float]:
    """Mean indexer KL (raw, before its coefficient) over the last 10% of the logged steps."""
    kl = run.get("indexer_kl") or []
    if not kl:
        return None
    last = max(s for s, _ in kl)
    tail = [v for s, v in kl if s > last * (1 - TAIL)]
    return sum(tail) / len(tail)


def ablation_rows(col: Dict[str, Any], mean_of: Callable[[str, str], Optional[float]]) -> List[Dict[str, Any]]:
    """One row per complete ablation run whose seed's MSA run is complete too. ``mean_of(name,
    metric)``: the run's ``val_loss`` / ``train_tail`` as the mean of its copies."""
    rows = []
    for name, run in col["runs"].items():
        ctx, variant, seed = parse_name(name)
        base = run_name(ctx, "msa", seed)
        if variant not in ABLATIONS or base not in col["runs"]:
            continue
        ref = col["runs"][base]
        row: Dict[str, Any] = {"name": name, "base": base, "variant": variant, "ctx": ctx, "seed": seed}
        for metric in ("val_loss", "train_tail"):
            a, b = mean_of(name, metric), mean_of(base, metric)
            row[metric] = a
            row[f"{metric}_vs_msa"] = a / b - 1 if a is not None and b else None
        row["recall"], row["recall_msa"] = run["final"].get("val_recall"), ref["final"].get("val_recall")
        row["kl"], row["kl_msa"] = kl_tail(run), kl_tail(ref)
        row["spikes"], row["spikes_msa"] = grad_spikes(run.get("grad_norm", [])), grad_spikes(ref.get("grad_norm", []))
        # every MSA seed of this context: the range a pathology must leave
        seeds = [r for n, r in col["runs"].items() if parse_name(n)[0] == ctx and parse_name(n)[1] == "msa"]
        row["seeds_msa"] = len(seeds)
        row["recall_msa_min"] = min((r["final"]["val_recall"] for r in seeds if r["final"].get("val_recall") is not None),
                                    default=None)
        row["kl_msa_max"] = max((k for k in map(kl_tail, seeds) if k is not None), default=None)
        spikes = [grad_spikes(r.get("grad_norm", [])) for r in seeds]
        row["spikes_msa_max"] = {k: max((x[k] for x in spikes if x[k] is not None), default=None)
                                 for k in ("count", "max")}
        rows.append(row)
    return sorted(rows, key=lambda r: (ABLATIONS.index(r["variant"]), r["seed"]))


def _pct(v: Optional[float], signed: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:+.2f}%" if signed else f"{100 * v:.1f}%")


def _num(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def ablation_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Markdown lines: each ablation beside its seed's MSA run."""
    if not rows:
        return []
    lines = ["", f"Ablations against MSA of the same seed (selection recall: held-out, last evaluation; indexer KL: "
             f"mean over the last {100 * TAIL:.0f}% of steps; gradient spikes: logged steps past the first 10% above "
             f"{SPIKE_FACTOR:g}x their median):", "",
             "| run | held-out loss | vs MSA | train loss, last 10%, vs MSA | selection recall (MSA) | "
             "indexer KL (MSA) | gradient spikes (MSA) | late max grad norm (MSA) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, m = r["spikes"], r["spikes_msa"]
        lines.append(f"| `{r['name']}` | {_num(r['val_loss'], '.4f')} | {_pct(r['val_loss_vs_msa'], True)} | "
                     f"{_pct(r['train_tail_vs_msa'], True)} | {_pct(r['recall'])} ({_pct(r['recall_msa'])}) | "
                     f"{_num(r['kl'])} ({_num(r['kl_msa'])}) | {_num(s['count'], 'd')} ({_num(m['count'], 'd')}) | "
                     f"{_num(s['max'], '.2f')} ({_num(m['max'], '.2f')}) |")
    return lines


def _loss_verdict(r: Dict[str, Any], noise: Optional[float]) -> str:
    d = r["val_loss_vs_msa"]
    if d is None:
        return "held-out loss not measured"
    tail = r["train_tail_vs_msa"]
    said = f"held-out loss {_pct(d, True)} vs MSA" + (f" (train tail {_pct(tail, True)})" if tail is not None else "")
    if noise is None:
        return said + ", one copy each and no same-seed noise measured, so not a verdict"
    if abs(d) <= noise:
        return said + f", within the same-seed noise ({_pct(noise)}): no loss effect resolved"
    return said + (", worse beyond the same-seed noise" if d > 0 else ", better beyond the same-seed noise") \
        + f" ({_pct(noise)})"


def ablation_claims(rows: List[Dict[str, Any]], noise: Optional[float]) -> List[str]:
    """One statement per ablation: the paper's pathology for that part of the recipe, appears or
    not (beyond every MSA seed, by the margins above), and the loss effect against the same-seed
    noise."""
    out = []
    for r in rows:
        label = LABELS[r["variant"]]
        s, m, n = r["spikes"], r["spikes_msa_max"], r["seeds_msa"]
        over = f"the {n} MSA seed{'s' if n > 1 else ''}"
        if r["variant"] == "msa_no_stopgrad":
            if s["count"] is None or m["count"] is None:
                sig = "gradient spikes: not measured"
            else:
                seen = s["count"] > m["count"] and s["max"] > SPIKE_MAX_RATIO * m["max"]
                sig = (f"gradient spikes **{'appear' if seen else 'do not appear'}** ({s['count']} logged steps "
                       f"above {SPIKE_FACTOR:g}x the median, at most {m['count']} in {over}; late maximum "
                       f"{s['max']:.2f}, at most {m['max']:.2f} in {over})")
        elif r["variant"] == "msa_no_warmup":
            if r["kl"] is None or r["kl_msa_max"] is None:
                sig = "a teacher-chasing indexer: not measured"
            else:
                worse_kl = r["kl"] > KL_RATIO * r["kl_msa_max"]
                worse_sel = (r["recall"] is not None and r["recall_msa_min"] is not None
                             and r["recall"] < r["recall_msa_min"] - RECALL_POINTS / 100)
                sig = (f"a teacher-chasing indexer **{'appears' if worse_kl or worse_sel else 'does not appear'}** "
                       f"(indexer KL {r['kl']:.3f}, at most {r['kl_msa_max']:.3f} in {over}; selection recall "
                       f"{_pct(r['recall'])}, at least {_pct(r['recall_msa_min'])} in {over})")
        else:
            if r["recall"] is None or r["recall_msa_min"] is None:
                sig = "worse selection: not measured"
            else:
                lost = r["recall_msa_min"] - r["recall"]
                sig = (f"a worse selection **{'appears' if lost > RECALL_POINTS / 100 else 'does not appear'}** "
                       f"(selection recall {_pct(r['recall'])}, at least {_pct(r['recall_msa_min'])} in {over}: "
                       f"{100 * lost:+.1f} points below)")
        out.append(f"Ablation {label} (`{r['name']}` vs `{r['base']}`, {r['ctx']}): {sig}; {_loss_verdict(r, noise)}.")
    return out


def ablation_plot(col: Dict[str, Any], rows: List[Dict[str, Any]], path: Path, colors: Dict[str, str]) -> Optional[Path]:
    """Gradient norm, indexer KL and held-out selection recall vs step of each ablation and its
    seed's MSA run (the three pathologies' signals side by side); None without ablation rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("grad_norm", "gradient norm (before clipping)", True), ("indexer_kl", "indexer KL (raw)", False),
              ("val_recall", "selection recall (held-out)", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    names = list(dict.fromkeys([r["base"] for r in rows] + [r["name"] for r in rows]))
    for ax, (key, title, log) in zip(axes[0], panels):
        for n in names:
            series = col["runs"][n].get(key) or []
            if series:
                ax.plot([s for s, _ in series], [v for _, v in series], color=colors[parse_name(n)[1]], alpha=0.8,
                        label=n)
        ax.set(title=title, xlabel="step", yscale="log" if log else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ABLATIONS", "ablation_claims", "ablation_plot", "ablation_rows", "ablation_table", "grad_spikes",
           "kl_tail"]

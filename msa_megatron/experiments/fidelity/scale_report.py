"""Report of the scale matrix (issue 19) from whatever runs exist.

Reads run directories (``<dir>/<run name>/metrics.jsonl`` + ``run.json``, as the piece driver
packs them), groups them by (context, variant), gives mean and spread over seeds, the
accuracy-vs-distance table and plot, the loss curves, and a plain statement of each claim:
confirmed / not confirmed / not measured (with the runs that are missing). Only complete runs
count; unfinished ones are listed. Rewrites only the block between SCALE markers of the doc.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..passkey import CHANCE as PASSKEY_CHANCE
from .ablations import ablation_claims, ablation_plot, ablation_rows, ablation_table
from .collect import conversion_summary, conversion_vs_continued, run_results, tail_records
from .layer_stats import layer_table, layer_tail_means
from .piece import read_run_json, recipe_of
from .retrieval_tables import (JUDGED_MSA, arm_name, bucket_label, bucket_lo, needle_finals, needle_table, onset_plot,
                               onset_table, rerun_accuracy)
from .scale import CONTINUATIONS, LABELS, ScalePreset, parse_name, run_name, run_names

BEGIN, END = "<!-- BEGIN SCALE (scripts/fidelity.py --scale-report) -->", "<!-- END SCALE -->"
CHANCE = 1 / 48  # values drawn from 48 bytes
#: the held-out retrieval probes: (metric prefix, group key, name in the report, chance)
PROBES = (("val_assoc_recall_acc", "buckets", "associative recall (trained on)", CHANCE),
          ("val_passkey_acc", "passkey_buckets", "passkey copy probe (scored, never trained on)", PASSKEY_CHANCE))
#: dense must reach this accuracy where the window fails for the retrieval comparison to count
SOLVED = 0.5
#: the training loss over this last fraction of a run's steps: the second language-modelling metric
TAIL = 0.1
#: one-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds); beyond 10, the
#: value at 10 (a little wide, never too narrow)
T95_ONE_SIDED = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
                 10: 1.812}


def train_tail(records: List[Dict[str, Any]], fraction: float = TAIL) -> Optional[float]:
    """Mean logged training loss over the last ``fraction`` of the steps. A run of the scale
    matrix sees each corpus token about once, so this is a loss on data the model had not
    trained on, averaged over ~10x the sequences of the held-out set (run 14: two runs of one
    seed ended 3.5% apart in held-out loss and 0.6% apart in this)."""
    finite = [r for r in records if isinstance(r.get("lm_loss"), (int, float)) and math.isfinite(r["lm_loss"])]
    tail = [r["lm_loss"] for r in tail_records(finite, fraction)]
    return sum(tail) / len(tail) if tail else None


def markers(report_name: str = "scale") -> Tuple[str, str]:
    """The doc markers around one preset family's generated block (``ScalePreset.report_name``)."""
    if report_name == "scale":
        return BEGIN, END
    tag = report_name.upper()
    return (f"<!-- BEGIN {tag} (scripts/fidelity.py --scale-report DIR --scale-preset {report_name}) -->",
            f"<!-- END {tag} -->")


def report_title(report_name: str) -> str:
    """A preset family's name in headings: "Scale matrix", "Retrieval", "Scale long", ..."""
    return "Scale matrix" if report_name == "scale" else report_name.replace("_", " ").capitalize()


def probes(preset: Optional[ScalePreset] = None) -> List[Tuple[str, str, str, float]]:
    """The held-out probes a preset scores (all, without a preset), named as it uses them."""
    out = []
    for prefix, bkey, label, chance in PROBES:
        if preset is not None and bkey == "buckets" and not preset.recall_eval_batches:
            continue
        if preset is not None and bkey == "passkey_buckets":
            if not preset.passkey_eval_batches:
                continue
            if preset.passkey_train_fraction > 0:
                label = "passkey copy task (trained on)"
        out.append((prefix, bkey, label, chance))
    return out


def ctx_tokens(tag: str) -> int:
    """"8k" -> 8192, "256" -> 256: the order of context tags in tables and plots."""
    return int(tag[:-1]) * 1024 if tag.endswith("k") else int(tag)


def contexts_of(preset: Optional[ScalePreset], g: Dict[Tuple[str, str], Any]) -> List[str]:
    """The preset's context tags (without a preset: 8k and 32k, plus any in ``g``), shortest first."""
    tags = set(preset.contexts) if preset is not None else {"8k", "32k"} | {c for c, _ in g}
    return sorted(tags, key=ctx_tokens)


def _read(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def bucket_curves(records: List[Dict[str, Any]], prefix: str = "val_assoc_recall_acc") -> Dict[str, List[List[float]]]:
    """{"d<lo>_<hi>": [[step, acc], ...]} from the <prefix>/<bucket> entries of a run's metrics records."""
    out: Dict[str, List[List[float]]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(prefix + "/") and isinstance(v, (int, float)):
                out.setdefault(k.split("/", 1)[1], []).append([r.get("step"), v])
    return out


def sibling_rerun_dirs(result_dir: Path) -> List[Path]:
    """Directories beside ``result_dir`` named ``<its name>_reruns`` or ``<its name>_reruns_<tag>``,
    oldest first (by the number in the tag): where earlier copies of rerun runs are moved, so the
    report finds every copy without a list to keep up to date."""
    result_dir = Path(result_dir)
    stem = result_dir.name + "_reruns"
    found = [d for d in result_dir.parent.glob(stem + "*") if d.is_dir()
             and (d.name == stem or d.name.startswith(stem + "_"))]

    def order(d: Path) -> Tuple[int, str]:
        digits = "".join(c for c in d.name[len(stem):] if c.isdigit())
        return (int(digits) if digits else -1, d.name)

    return sorted(found, key=order)


def collect_scale(dirs: List[Path], preset: ScalePreset, rerun_dirs: Sequence[Path] = ()) -> Dict[str, Any]:
    """{"runs": {name: results}, "unfinished": {name: step/total}, "missing": [names], "reruns":
    {name: [final held-out loss of each earlier complete run of that name]}}; the first directory
    holding a complete run of a name wins. ``rerun_dirs`` (oldest first) hold other complete runs
    of the same name and recipe (a run done twice): their spread is the run-to-run noise of one
    seed. A name with no complete run in ``dirs`` is reported from its newest rerun copy (its copy
    was moved aside for a rerun that has not landed yet): moving a copy never drops a seed."""
    runs, unfinished, missing, other, source = {}, {}, [], {}, {}
    for name in run_names(preset):
        found = None
        for d in dirs:
            rd = Path(d) / name
            info = read_run_json(rd)
            if info and recipe_of(info) != preset.recipe:
                other[name] = recipe_of(info)
                continue
            if info.get("complete"):
                found = rd
                break
            if info:
                unfinished[name] = f"{info.get('step')}/{info.get('total_steps')}"
        if found is None:  # the newest complete rerun copy of the preset's recipe stands in
            for d in reversed(list(rerun_dirs)):
                info = read_run_json(Path(d) / name)
                if info.get("complete") and recipe_of(info) == preset.recipe:
                    found = Path(d) / name
                    break
            if found is not None:
                other.pop(name, None)
        if found is None:
            if name not in unfinished:
                missing.append(name)
            continue
        unfinished.pop(name, None)
        source[name] = found.parent
        r = run_results(found)
        r["run"] = read_run_json(found)
        records = _read(found / "metrics.jsonl")
        last = next((x for x in reversed(records) if "val/recall" in x), {})
        r["final"]["val_recall_layers"] = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("val/recall/")}
        r["final"]["train_tail"] = train_tail(records)
        r["final"]["layer_stats"] = layer_tail_means(records, TAIL)
        for prefix, key, _, _ in PROBES:
            r[key] = bucket_curves(records, prefix)
            r["final"][key] = {k: v[-1][1] for k, v in r[key].items() if v}
        # MSA runs: how often the passkey's needle block was selected (training/needle.py)
        r["final"].update(needle_finals(bucket_curves(records, "val_passkey_needle")))
        r.pop("config_yaml", None)
        runs[name] = r
    reruns: Dict[str, List[Dict[str, Optional[float]]]] = {}
    for d in rerun_dirs:
        for name in runs:
            if Path(d) == source[name]:
                continue  # the reported copy
            info = read_run_json(Path(d) / name)
            if info.get("complete") and recipe_of(info) == preset.recipe:
                loss = run_results(Path(d) / name)["final"]["val_loss"]
                if loss is not None:
                    records = _read(Path(d) / name / "metrics.jsonl")
                    reruns.setdefault(name, []).append(
                        {"val_loss": loss, "train_tail": train_tail(records),
                         "passkey_buckets": bucket_curves(records, "val_passkey_acc")})
    stand_ins = {n: str(d) for n, d in source.items() if d not in [Path(x) for x in dirs]}
    return {"runs": runs, "unfinished": unfinished, "missing": missing, "other_recipe": other, "reruns": reruns,
            "from_reruns": stand_ins}


def rerun_spread(col: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per run done more than once (same name, seed, recipe and code path): its held-out losses
    and the largest relative difference to the reported run, the noise floor of any one-seed
    comparison (GPU kernels are not bitwise deterministic, and the loss at 50M tokens still
    falls steeply, so small drifts in the trajectory move the end point)."""
    out = []
    for name, others in col.get("reruns", {}).items():
        main = col["runs"][name]["final"]
        if main["val_loss"] is None:
            continue
        row = {"name": name, "losses": [main["val_loss"]] + [o["val_loss"] for o in others],
               "max_rel": max(abs(o["val_loss"] / main["val_loss"] - 1) for o in others)}
        tails = [o["train_tail"] for o in others if o["train_tail"] is not None]
        if main.get("train_tail") is not None and tails:
            row["tails"] = [main["train_tail"]] + tails
            row["max_rel_tail"] = max(abs(t / main["train_tail"] - 1) for t in tails)
        out.append(row)
    return out


def copies_mean(col: Dict[str, Any], name: str, metric: str = "val_loss") -> Optional[float]:
    """``metric`` of run ``name`` (``val_loss`` or ``train_tail``) as the mean over its copies: the
    reported run and the earlier complete runs of the same name in the rerun directories. One
    copy's end point moves with GPU nondeterminism (run 16: one seed's dense run ended at 1.19,
    1.23 and 1.40), so every copy measured counts. A continuation (the conversion, dense
    continued) is the reported copy alone: its copies start from different copies of the dense
    run (run 19's conversion ended 0.8456, run 17's 1.1190), so only the reported copies of the
    conversion and of its reference share a checkpoint."""
    if parse_name(name)[1] in CONTINUATIONS:
        v = col["runs"][name]["final"].get(metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None
    values = [col["runs"][name]["final"].get(metric)] + [o.get(metric) for o in col.get("reruns", {}).get(name, [])]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def mean_bounds(s: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """One-sided 95% bounds (lower, upper) of the mean over seeds, Student's t with n - 1 degrees
    of freedom; None below two values."""
    if s.get("n", 0) < 2 or s.get("std") is None:
        return None
    half = T95_ONE_SIDED[min(s["n"] - 1, max(T95_ONE_SIDED))] * s["std"] / math.sqrt(s["n"])
    return s["mean"] - half, s["mean"] + half


def _stats(xs: List[float]) -> Dict[str, Optional[float]]:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"n": len(xs), "mean": m, "std": sd, "min": min(xs), "max": max(xs)}


def groups(col: Dict[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(ctx, variant) -> stats over seeds of the final held-out loss (a run done more than once:
    the mean of its copies), recall accuracy, selection recall and each distance bucket's accuracy."""
    by: Dict[Tuple[str, str], List[str]] = {}
    for name in col["runs"]:
        ctx, variant, _ = parse_name(name)
        by.setdefault((ctx, variant), []).append(name)
    out = {}
    for key, names in by.items():
        rs = [col["runs"][n] for n in names]
        out[key] = {"seeds": len(rs), "val_loss": _stats([copies_mean(col, n, "val_loss") for n in names]),
                    "train_tail": _stats([copies_mean(col, n, "train_tail") for n in names]),
                    "assoc": _stats([r["final"]["assoc_recall"] for r in rs]),
                    "sel_recall": _stats([r["final"]["mean_recall"] for r in rs]),
                    "sel_recall_end": _stats([r["final"].get("val_recall") for r in rs])}
        for _, bkey, _, _ in PROBES:  # a run without a probe (older runs) adds nothing to its buckets
            buckets = sorted({b for r in rs for b in r["final"].get(bkey, {})}, key=bucket_lo)
            out[key][bkey] = {b: _stats([r["final"].get(bkey, {}).get(b) for r in rs]) for b in buckets}
    return out


def paired(col: Dict[str, Any], ctx: str, variant: str, base: str, metric: str = "val_loss") -> Dict[str, Any]:
    """Stats over seeds of ``variant``'s final held-out loss relative to ``base``'s of the *same*
    seed (variant / base - 1). A seed fixes the data order, the recall draws and which held-out
    samples are scored (GPTDataset shuffles the valid split by it), so the absolute loss moves
    with the seed far more than with the attention; the per-seed ratio cancels all of that. A run
    done more than once enters as the mean of its copies (:func:`copies_mean`)."""
    by = {}
    for name in col["runs"]:
        c, v, seed = parse_name(name)
        value = copies_mean(col, name, metric)
        if c == ctx and v in (variant, base) and value is not None:
            by.setdefault(seed, {})[v] = value
    seeds = sorted(s for s, d in by.items() if variant in d and base in d)
    out = _stats([by[s][variant] / by[s][base] - 1 for s in seeds])
    out["seeds"] = seeds
    return out


def _ms(s: Dict[str, Any], spec: str = ".4f", pct: bool = False, signed: bool = False) -> str:
    """"mean ± sd (n=k)"; pct: as percent (signed: with its sign and two decimals)."""
    if s["mean"] is None:
        return "-"

    def f(v: float) -> str:
        if not pct:
            return format(v, spec)
        return f"{100 * v:+.2f}%" if signed else f"{100 * v:.1f}%"

    return f(s["mean"]) + (f" ± {100 * s['std']:.2f}%" if signed and s["std"] is not None else
                           f" ± {f(s['std'])}" if s["std"] is not None else "") + f" (n={s['n']})"


def claims(g: Dict[Tuple[str, str], Dict[str, Any]], col: Dict[str, Any],
           preset: Optional[ScalePreset] = None) -> List[str]:
    """The issue's goals, each confirmed / not confirmed / not measured, with the numbers (a
    preset without ``lm_claims`` states only retrieval and selection recall)."""
    out: List[str] = []
    if preset is None or preset.lm_claims:
        out += _lm_claims(g, col)
        noise = rerun_spread(col)
        if noise:
            worst = max(noise, key=lambda x: x["max_rel"])
            tail = (f", and {100 * worst['max_rel_tail']:.2f}% apart in training loss over the last "
                    f"{100 * TAIL:.0f}% of steps") if "max_rel_tail" in worst else ""
            times = "twice" if len(worst["losses"]) == 2 else f"{len(worst['losses'])} times"
            out.append(f"Run-to-run noise of one seed: `{worst['name']}` run {times} (same seed, recipe and code path) "
                       f"ended {100 * worst['max_rel']:.2f}% apart in held-out loss "
                       f"({' vs '.join(format(x, '.4f') for x in worst['losses'])}){tail}. A one-seed difference "
                       "smaller than that is not evidence either way; a paired mean over seeds must beat it by its spread "
                       "(each run done more than once enters the paired ratios as the mean of its copies).")
        for variant, label in (("msa", "MSA / dense"), ("swa", "window / dense")):
            t = paired(col, "8k", variant, "dense", "train_tail")
            if t["n"]:
                out.append(f"Second metric, training loss over the last {100 * TAIL:.0f}% of steps (fresh data: a run "
                           f"sees each corpus token about once; ~10x the held-out set's sequences), {label} - 1 at "
                           f"8K, same seed: {_ms(t, pct=True, signed=True)}, seeds {t['seeds']}.")
    for ctx in contexts_of(preset, g):
        if preset is not None and ctx == preset.base_context:
            continue
        for _, bkey, label, chance in probes(preset):
            variants = [v for v in JUDGED_MSA if (ctx, v) in g] or ["msa"]
            out += [_retrieval_claim(g, ctx, bkey, label, chance, v, col) for v in variants]
    out += _selection_claims(col)
    return out


def _lm_claims(g: Dict[Tuple[str, str], Dict[str, Any]], col: Dict[str, Any]) -> List[str]:
    """With fewer than 3 seeds, a verdict is only a hint; where a same-seed rerun
    (:func:`rerun_spread`) differs by more than the difference judged, it is not even that."""
    out = []
    spread = max((x["max_rel"] for x in rerun_spread(col)), default=None)

    def noisy(diff: float) -> Optional[str]:
        if spread is not None and spread >= diff:
            return f"undecided: fewer than 3 seeds, and a same-seed rerun differs by {100 * spread:.2f}%"
        return None
    d, m, w = g.get(("8k", "dense")), g.get(("8k", "msa")), g.get(("8k", "swa"))
    vs_dense, vs_window = paired(col, "8k", "msa", "dense"), paired(col, "8k", "msa", "swa")
    if vs_dense["n"]:
        rel, n = vs_dense["mean"], vs_dense["n"]
        bounds = mean_bounds(vs_dense)
        if n >= 3 and bounds is not None:
            lo, hi = bounds
            verdict = "confirmed" if hi <= 0.01 else "not confirmed" if lo > 0.01 else \
                (f"undecided: the paired mean's one-sided 95% bounds, {100 * lo:+.2f}% to {100 * hi:+.2f}%, "
                 "enclose +1%")
        else:
            verdict = noisy(max(0.01, abs(rel - 0.01))) or \
                ("met, but with fewer than 3 seeds" if rel <= 0.01 else "not met, with fewer than 3 seeds")
        out.append(f"MSA held-out loss within 1% of dense at 8K: **{verdict}** (MSA / dense - 1, same seed: "
                   f"{_ms(vs_dense, pct=True, signed=True)}, seeds {vs_dense['seeds']}; MSA {_ms(m['val_loss'])}, "
                   f"dense {_ms(d['val_loss'])}; confirmed needs the upper bound at or below +1%, not confirmed "
                   "the lower bound above it).")
    else:
        out.append("MSA held-out loss within 1% of dense at 8K: **not measured** (no seed with both an 8K dense "
                   "and an 8K MSA run).")
    if vs_window["n"]:
        n, mean, sd = vs_window["n"], vs_window["mean"], vs_window["std"] or 0.0
        beyond = mean + sd < 0
        bounds = mean_bounds(vs_window)
        if n >= 3 and bounds is not None:
            verdict = "confirmed" if beyond and bounds[1] < 0 else "not confirmed"
            why = (f"; the paired mean's one-sided 95% upper bound {100 * bounds[1]:+.2f}%; confirmed needs mean + sd "
                   "and that bound below 0")
        else:
            verdict = noisy(abs(mean)) or ("indicated" if beyond else "not indicated") + " (fewer than 3 seeds)"
            why = ""
        out.append(f"MSA below the FLOP-matched window beyond the seed spread at 8K: **{verdict}** (MSA / window "
                   f"- 1, same seed: {_ms(vs_window, pct=True, signed=True)}, seeds {vs_window['seeds']}; MSA {_ms(m['val_loss'])}, "
                   f"window {_ms(w['val_loss'])}{why}).")
    else:
        out.append("MSA below the FLOP-matched window at 8K: **not measured** (no seed with both an 8K MSA and an "
                   "8K window run).")
    return out


def _selection_claims(col: Dict[str, Any]) -> List[str]:
    """Held-out selection recall of the judged MSA arms, one statement per context (recall falls
    with the number of blocks to choose from, so contexts are not pooled)."""
    by_ctx: Dict[str, Dict[str, Any]] = {}
    for n, r in col["runs"].items():
        ctx, variant, _ = parse_name(n)
        if variant in JUDGED_MSA and r["final"].get("val_recall") is not None:
            by_ctx.setdefault(ctx, {})[n] = r
    if not by_ctx:
        return ["Trained selection recall >= 95% at k=16: **not measured** (no complete MSA run)."]
    out = []
    for ctx in sorted(by_ctx, key=ctx_tokens):
        msa_runs = by_ctx[ctx]
        end = _stats([r["final"]["val_recall"] for r in msa_runs.values()])
        during = _stats([r["final"]["mean_recall"] for r in msa_runs.values()])
        layers: Dict[str, List[float]] = {}
        for r in msa_runs.values():
            for k, v in r["final"].get("val_recall_layers", {}).items():
                layers.setdefault(k, []).append(v)
        per_layer = ", ".join(f"{k.replace('layer_', 'layer ')} {100 * sum(v) / len(v):.1f}%"
                              for k, v in sorted(layers.items(), key=lambda kv: int(kv[0].split("_")[-1])))
        each = "; ".join(f"`{n}` {100 * r['final']['val_recall']:.1f}%" for n, r in msa_runs.items()) \
            if len(msa_runs) > 1 else ""
        out.append(f"Trained selection recall >= 95% at k=16 at {ctx} (MSA runs, held-out, last evaluation): "
                   f"**{'confirmed' if end['mean'] >= 0.95 else 'not confirmed'}** ({_ms(end, pct=True)}"
                   f"{'; ' + each if each else ''}; per layer {per_layer}; mean over the sparse training steps "
                   f"{_ms(during, pct=True)}).")
    return out


def _retrieval_claim(g, ctx: str, bkey: str, label: str, chance: float, variant: str = "msa",
                     col: Optional[Dict[str, Any]] = None) -> str:
    """One MSA arm within 5 points of dense where the window is near chance, on one probe;
    counted only where dense solved the probe there (>= SOLVED). Where a run was done twice
    (``col``'s reruns), how far its accuracy moved in those buckets is stated beside it."""
    dd, mm, ww = (g.get((ctx, v)) for v in ("dense", variant, "swa"))
    arm = arm_name(variant)
    what = f"Retrieval at {ctx}, {label}"
    if not (dd and mm and dd[bkey] and mm[bkey]):
        return f"{what}, {arm} within 5 points of dense: **not measured** (runs missing or without this probe)."
    if ww and ww[bkey]:
        far = [b for b in mm[bkey] if ww[bkey].get(b, {}).get("mean") is not None
               and ww[bkey][b]["mean"] <= chance + 0.05]
        where = "buckets where the window is near chance"
    else:
        far, where = list(mm[bkey]), "all buckets (no window run with this probe)"
    gaps = {b: dd[bkey][b]["mean"] - mm[bkey][b]["mean"] for b in far
            if dd[bkey].get(b, {}).get("mean") is not None and mm[bkey][b]["mean"] is not None}
    if not gaps:
        return f"{what}: **not measured** (no bucket where the window is near chance)."
    solved = sum(dd[bkey][b]["mean"] for b in gaps) / len(gaps)
    if solved < SOLVED:
        nearer = {b: dd[bkey][b]["mean"] - mm[bkey][b]["mean"] for b in mm[bkey] if b not in gaps
                  and (dd[bkey].get(b, {}).get("mean") or 0.0) >= SOLVED and mm[bkey][b]["mean"] is not None}
        where_solved = (f" Where dense did solve it ({', '.join(nearer)}), {arm} trails it by up to "
                        f"{100 * max(nearer.values()):.1f} points.") if nearer else ""
        return (f"{what}: **not measured**: dense did not solve it (mean accuracy {100 * solved:.1f}% in "
                f"{', '.join(gaps)}; needs >= {100 * SOLVED:.0f}%, chance {100 * chance:.1f}%).{where_solved}")
    worst = max(gaps.values())
    noise = rerun_accuracy(col, ctx, list(gaps), bkey) if col is not None else {}
    moved = ("; a same-seed rerun moved " + ", ".join(f"{arm_name(v)} by up to {100 * x:.1f} points"
                                                     for v, x in sorted(noise.items())) + " there") if noise else ""
    return (f"{what}, {arm} within 5 points of dense in {where} ({', '.join(gaps)}): "
            f"**{'confirmed' if worst <= 0.05 else 'not confirmed'}** (largest gap {100 * worst:.1f} points; dense "
            f"mean accuracy there {100 * solved:.1f}%, chance {100 * chance:.1f}%{moved}).")


def conversion_table(v: Dict[str, Any]) -> List[str]:
    """Markdown lines: the conversion against dense continued alike, at each sparse evaluation."""
    if not v["pairs"]:
        return ["", "Against dense continued alike (`c8k_dense_continued_s1`): no sparse evaluation in common."]
    tol = 100 * v["tolerance"]
    verdict = (f"within {tol:.0f}% of it after {v['within_at_tokens']:,} tokens of conversion (step "
               f"{v['within_at_step']})" if v["within_at_tokens"] is not None else f"not within {tol:.0f}% by the end")
    return ["", f"Against dense continued from the same checkpoint for the same steps (`c8k_dense_continued_s1`, the "
            f"target that moves as dense keeps improving): {verdict}.", "",
            "| step | tokens | conversion | dense continued | conversion / dense - 1 |", "|---:|---:|---:|---:|---:|"] + \
        [f"| {s} | {t:,} | {a:.4f} | {b:.4f} | {100 * r:+.2f}% |" for s, t, a, b, r in v["pairs"]]


def onset_contexts(col: Dict[str, Any], preset: Optional[ScalePreset], g: Dict[Tuple[str, str], Any]) -> List[str]:
    """The contexts (the curriculum's base excepted) where some run learned a retrieval bucket:
    those get an onset table and an onset plot."""
    return [c for c in contexts_of(preset, g) if (preset is None or c != preset.base_context) and onset_table(col, c)]


def scale_block(col: Dict[str, Any], preset_name: str, plot_rel: str, about: str = "",
                preset: Optional[ScalePreset] = None) -> str:
    g = groups(col)
    name = preset.report_name if preset is not None else "scale"
    begin, end = markers(name)
    lines = [begin, "", f"{report_title(name)}, preset `{preset_name}` (generated "
             f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
             f"{len(col['runs'])} complete runs). {about}", ""]
    lines += ["| context | run | seeds | held-out loss (mean ± sd) | vs dense, same seed (mean ± sd) | "
              f"train loss, last {100 * TAIL:.0f}% of steps, vs dense, same seed | "
              "recall acc. (all distances) | selection recall (held-out, end) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (ctx, v), s in sorted(g.items(), key=lambda kv: (ctx_tokens(kv[0][0]), list(LABELS).index(kv[0][1]))):
        # the conversion against its reference (dense continued from the same checkpoint for the
        # same steps); neither continuation against the dense run, which trained fewer tokens
        base = "dense_continued" if v == "dense_to_msa" else None if v in ("dense", "dense_continued") else "dense"
        rel = "-" if base is None else _ms(paired(col, ctx, v, base), pct=True, signed=True)
        tail = "-" if base is None else _ms(paired(col, ctx, v, base, "train_tail"), pct=True, signed=True)
        if base == "dense_continued" and rel != "-":
            rel, tail = rel + " vs dense continued", tail + " vs dense continued"
        lines.append(f"| {ctx} | {LABELS[v]} | {s['seeds']} | {_ms(s['val_loss'])} | {rel} | {tail} | "
                     f"{_ms(s['assoc'], pct=True)} | {_ms(s['sel_recall_end'], pct=True)} |")
    if preset is None or preset.lm_claims:
        lines += ["", "Seeds move the absolute held-out loss (each seed fixes the data order, the recall draws and "
                  "which held-out samples are scored), so MSA and the window are compared with dense *of the same "
                  "seed*; the claims below use these paired ratios. A run done more than once (table below) counts "
                  "as the mean of its copies, here and in the table above."]
        if any(parse_name(n)[1] == "dense_continued" for n in col["runs"]):
            lines[-1] += (" The conversion and dense continued count as their reported copies, which start from the "
                          "same dense checkpoint (earlier copies started from other copies of the dense run), and the "
                          "conversion is compared with dense continued, not with the dense run.")
    noise = rerun_spread(col)
    if noise:
        lines += ["", "Runs done more than once (same name, seed and recipe; the reported one first):", "",
                  f"| run | held-out losses | largest difference | train loss, last {100 * TAIL:.0f}% | largest difference |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| `{x['name']}` | {' / '.join(format(v, '.4f') for v in x['losses'])} | {100 * x['max_rel']:.2f}% | "
                  + (f"{' / '.join(format(v, '.4f') for v in x['tails'])} | {100 * x['max_rel_tail']:.2f}% |"
                     if "tails" in x else "- | - |") for x in noise]
    lines += ["", "Per run (tokens, wall time, device, commit; runs sharing the GPU: mean over the run's wall time / "
              "max, 1 = alone, so tokens/s of shared runs is per run, not per GPU):", "",
              "| run | steps | tokens | wall (s) | tokens/s (incl. start-up) | runs on the GPU | device | commit | "
              "final held-out loss |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for n, r in col["runs"].items():
        info = r["run"]
        tps = (info.get("tokens") or 0) / info["wall_s"] if info.get("wall_s") else None
        shared = "-" if info.get("shared_mean") is None else f"{info['shared_mean']:g} / {info.get('shared_max', '?')}"
        lines.append(f"| `{n}` | {info.get('step')} | {info.get('tokens') or 0:,} | {info.get('wall_s')} | "
                     f"{'-' if tps is None else f'{tps:,.0f}'} | {shared} | "
                     f"{', '.join(info.get('devices', []))} | {', '.join(info.get('commits', []))} | "
                     f"{r['final']['val_loss'] if r['final']['val_loss'] is None else format(r['final']['val_loss'], '.4f')} |")
    lines += software_lines(col)
    lines += held_out_lines(col)
    for _, bkey, label, chance in probes(preset):
        for ctx in contexts_of(preset, g):
            rows = [(v, st) for (c, v), st in g.items() if c == ctx and st[bkey]]
            if not rows:
                continue
            buckets = sorted({b for _, st in rows for b in st[bkey]}, key=bucket_lo)
            lines += ["", f"Accuracy vs distance at {ctx}, {label} (chance {100 * chance:.1f}%; mean over the runs "
                      "that scored it, n per row):", "",
                      "| run | n | " + " | ".join(bucket_label(b) for b in buckets) + " |",
                      "|---|---:|" + "---:|" * len(buckets)]
            for v, st in rows:
                n = max(x["n"] for x in st[bkey].values())
                lines.append(f"| {LABELS[v]} | {n} | " + " | ".join(
                    "-" if st[bkey].get(b, {}).get("mean") is None else f"{100 * st[bkey][b]['mean']:.1f}%"
                    for b in buckets) + " |")
    learned = onset_contexts(col, preset, g)
    for ctx in learned:
        lines += onset_table(col, ctx)
    for ctx in contexts_of(preset, g):
        lines += needle_table(col, ctx)
    for ctx in contexts_of(preset, g):
        lines += layer_table(col, ctx, TAIL)
    ablations = ablation_rows(col, lambda n, m: copies_mean(col, n, m))
    lines += ablation_table(ablations)
    if ablations:
        lines += ["", f"![ablations: gradient norm, indexer KL, selection recall]({plot_rel}/{name}_ablations.png)"]
    if "c8k_dense_s1" in col["runs"] and "c8k_dense_to_msa_s1" in col["runs"]:
        c = conversion_summary(col["runs"]["c8k_dense_s1"], col["runs"]["c8k_dense_to_msa_s1"])
        lines += ["", f"Dense -> MSA conversion (8K, seed 1): dense final held-out loss {c['dense_final_val_loss']:.4f}; "
                  + (f"within 1% after {c['reached_at_tokens']:,} tokens ({100 * c['reached_fraction']:.1f}% of the "
                     "dense run's)" if c["reached_at_tokens"] else "not within 1% by the end of the conversion run") + "."]
        if "c8k_dense_continued_s1" not in col["runs"]:
            lines[-1] += (" That target is dense's own end, too easy while dense still improves"
                          + (f" (its held-out loss moved {100 * c['dense_last_drop']:+.2f}% over its last evaluation "
                             "interval)" if c.get("dense_last_drop") is not None else "")
                          + "; the judged reference, `c8k_dense_continued_s1` (dense trained on from the same checkpoint "
                          "for the same steps), is not in the matrix yet.")
        else:
            lines += conversion_table(conversion_vs_continued(col["runs"]["c8k_dense_continued_s1"],
                                                              col["runs"]["c8k_dense_to_msa_s1"]))
    if col["runs"]:
        lines += ["", f"![held-out loss vs tokens]({plot_rel}/{name}_loss.png)",
                  f"![accuracy vs distance]({plot_rel}/{name}_accuracy_vs_distance.png)"]
        if learned:
            lines.append(f"![accuracy vs step in the farthest buckets]({plot_rel}/{name}_onset.png)")
    lines += ["", "### Statement (generated)", ""]
    spread = max((x["max_rel"] for x in noise), default=None)
    lines += [f"* {c}" for c in claims(g, col, preset) + ablation_claims(ablations, spread)]
    if col["unfinished"] or col["missing"]:
        lines += ["", "Not yet in the matrix: "
                  + ", ".join([f"`{n}` (unfinished, step {s})" for n, s in col["unfinished"].items()]
                              + [f"`{n}`" for n in col["missing"]]) + "."]
    if col.get("from_reruns"):
        lines += ["", "Reported from a reruns directory (the copy in the results was moved aside for a rerun that "
                  "has not landed yet): " + ", ".join(f"`{n}` (`{d}`)" for n, d in col["from_reruns"].items()) + "."]
    if col.get("other_recipe"):
        lines += ["", "Recorded under an earlier recipe of the preset (not counted): "
                  + ", ".join(f"`{n}` (recipe {r})" for n, r in col["other_recipe"].items()) + "."]
    lines += ["", end]
    return "\n".join(lines)


def held_out_lines(col: Dict[str, Any]) -> List[str]:
    """Markdown lines: what the runs' held-out loss is measured on, from their ``held_out`` events
    (logged since run 19; runs grouped by message); nothing when no run logged one."""
    sets: Dict[str, List[str]] = {}
    for n, r in col["runs"].items():
        for message in dict.fromkeys(e["message"] for e in r.get("events", []) if e.get("event") == "held_out"):
            sets.setdefault(message, []).append(f"`{n}`")
    if not sets:
        return []
    return ["", "Held-out set (each run's `held_out` event):", ""] + [f"* {m}: {', '.join(v)}" for m, v in sets.items()]


def software_lines(col: Dict[str, Any]) -> List[str]:
    """Markdown lines: the software stacks the runs trained on (run.json segments record torch,
    CUDA, cuDNN, Triton and the driver since run 18), runs grouped by stack; nothing when no run
    recorded one. Copies of one run from two lendings may differ by the machine image (run 17)."""
    stacks: Dict[str, List[str]] = {}
    for n, r in col["runs"].items():
        seen = {", ".join(f"{k} {v}" for k, v in seg["software"].items())
                for seg in r["run"].get("segments", []) if seg.get("software")}
        key = " + ".join(sorted(seen)) if seen else "not recorded (before run 18)"
        stacks.setdefault(key, []).append(f"`{n}`")
    if list(stacks) == ["not recorded (before run 18)"]:
        return []
    return ["", "Software per run (from run.json):", ""] + [f"* {k}: {', '.join(v)}" for k, v in stacks.items()]


def curve_tokens(col: Dict[str, Any], name: str) -> List[float]:
    """The tokens axis of a run's held-out loss curve: a continuation (conversion, dense
    continued) counts its tokens from 0 but starts where its seed's dense run ended, so it is
    drawn from there (the dense run's final tokens) to sit after that curve, not over its start."""
    ctx, variant, seed = parse_name(name)
    offset = 0
    if variant in CONTINUATIONS:
        base = col["runs"].get(run_name(ctx, "dense", seed))
        offset = (base["final"].get("tokens") or 0) if base else 0
    return [offset + (t or 0) for _, t, _ in col["runs"][name]["val_loss"]]


def plots(col: Dict[str, Any], plot_dir: Path, preset: Optional[ScalePreset] = None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    colors = {"dense": "k", "msa": "tab:blue", "swa": "tab:red", "msa_no_stopgrad": "tab:orange",
              "msa_no_warmup": "tab:green", "msa_no_teacher": "tab:purple", "dense_to_msa": "tab:brown",
              "msa_long_warmup": "tab:cyan", "msa_sepclip": "tab:olive", "dense_continued": "tab:gray"}
    written = []
    name = preset.report_name if preset is not None else "scale"
    g = groups(col)
    # a context without a run gets no empty panel
    ctxs = [c for c in contexts_of(preset, g) if any(k[0] == c for k in g)] or contexts_of(preset, g)[:1]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        seen = set()
        for n, r in col["runs"].items():
            c, v, _ = parse_name(n)
            if c != ctx or not r["val_loss"]:
                continue
            ax.plot([t / 1e6 for t in curve_tokens(col, n)], [x for _, _, x in r["val_loss"]], color=colors[v],
                    alpha=0.8, label=None if v in seen else LABELS[v])
            seen.add(v)
        ax.set(title=f"held-out loss, {ctx}", xlabel="tokens (M)", ylabel="loss")
        if seen:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_dir / f"{name}_loss.png", dpi=110)
    plt.close(fig)
    written.append(plot_dir / f"{name}_loss.png")
    active = probes(preset)
    fig, axes = plt.subplots(len(active), len(ctxs), figsize=(6 * len(ctxs), 4.5 * len(active)), squeeze=False)
    for row, (_, bkey, label, chance) in zip(axes, active):
        for ax, ctx in zip(row, ctxs):
            for (c, v), st in g.items():
                if c != ctx or not st[bkey] or v not in ("dense", "swa") + JUDGED_MSA:
                    continue
                bs = list(st[bkey])
                mid = [(bucket_lo(b) + int(b.split("_")[1])) / 2 for b in bs]
                ax.errorbar(mid, [st[bkey][b]["mean"] for b in bs], yerr=[st[bkey][b]["std"] or 0 for b in bs],
                            marker="o", color=colors[v], capsize=3,
                            label=f"{LABELS[v]} (n={max(st[bkey][b]['n'] for b in bs)})")
            ax.axhline(chance, ls=":", color="gray", label="chance")
            ax.set(title=f"{label}, {ctx}", xlabel="distance to the planted record (tokens)", ylabel="accuracy",
                   ylim=(-0.02, 1.02))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_dir / f"{name}_accuracy_vs_distance.png", dpi=110)
    plt.close(fig)
    written.append(plot_dir / f"{name}_accuracy_vs_distance.png")
    onset = onset_plot(col, onset_contexts(col, preset, g), plot_dir / f"{name}_onset.png", colors)
    abl = ablation_plot(col, ablation_rows(col, lambda n, m: copies_mean(col, n, m)), plot_dir / f"{name}_ablations.png",
                        colors)
    return written + [p for p in (onset, abl) if p]


def write_doc(block: str, doc: Path, report_name: str = "scale") -> None:
    """Replace the block between ``report_name``'s markers (append a section if none)."""
    begin, end = markers(report_name)
    text = doc.read_text() if doc.is_file() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {report_title(report_name)}: results (generated)\n\n" + block + "\n"
    doc.write_text(text)


def scale_report(dirs: List[Path], preset: ScalePreset, preset_name: str, doc: Path, plot_dir: Path,
                 make_plots: bool = True, rerun_dirs: Sequence[Path] = ()) -> Dict[str, Any]:
    col = collect_scale(dirs, preset, rerun_dirs)
    written = plots(col, plot_dir, preset) if make_plots and col["runs"] else []
    rel = str(plot_dir.resolve().relative_to(doc.resolve().parent)) \
        if plot_dir.resolve().is_relative_to(doc.resolve().parent) else str(plot_dir)
    write_doc(scale_block(col, preset_name, rel, preset.about, preset), doc, preset.report_name)
    if make_plots:
        plot_dir.mkdir(parents=True, exist_ok=True)
        (plot_dir / f"{preset.report_name}_results.json").write_text(json.dumps(
            {"missing": col["missing"], "unfinished": col["unfinished"], "other_recipe": col.get("other_recipe", {}),
             "from_reruns": col.get("from_reruns", {}),
             "groups": {f"{c}/{v}": s for (c, v), s in groups(col).items()}}, indent=1))
    return {"collected": col, "written": written}


__all__ = ["BEGIN", "CHANCE", "END", "PROBES", "TAIL", "train_tail", "bucket_curves", "claims", "collect_scale", "contexts_of", "ctx_tokens",
           "groups", "markers", "paired", "plots", "probes", "rerun_spread", "scale_block", "scale_report", "sibling_rerun_dirs",
           "write_doc"]

"""docs/fidelity_first_wave.md and its plots from a results.json (issue 10's small matrix).

Only the block between the GENERATED markers of the doc is rewritten, so the
hand-written discussion around it survives a new run. Goals are evaluated from the
numbers and printed as measured (met / not met), never asserted.
Plots need matplotlib (this step runs where the results are copied to, not on the GPU host).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .matrix import LABELS, RUN_NAMES

BEGIN, END = "<!-- BEGIN GENERATED (scripts/fidelity.py --report) -->", "<!-- END GENERATED -->"
MSA_RUNS = ("msa", "msa_no_stopgrad", "msa_no_warmup", "msa_no_teacher", "dense_to_msa")


def _fmt(v, spec: str = ".4f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(results: Dict[str, Any]) -> str:
    runs = results["runs"]
    rows = ["| run | steps | tokens | final held-out loss | assoc. recall acc. | max grad norm (all / after 10% of steps) | final indexer KL | "
            "mean selection recall (sparse steps) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RUN_NAMES:
        if name not in runs:
            continue
        f = runs[name]["final"]
        rows.append(f"| {LABELS[name]} | {f['steps']} | {f['tokens'] or 0:,} | {_fmt(f['val_loss'])} | "
                    f"{_pct(f['assoc_recall'])} | {_fmt(f['max_grad_norm'], '.3f')} / {_fmt(f.get('max_grad_norm_late'), '.3f')} | "
                    f"{_fmt(f['kl'])} | "
                    f"{_pct(f['mean_recall'])} |")
    return "\n".join(rows)


def sweep_table(results: Dict[str, Any]) -> str:
    runs = results["runs"]
    keys = sorted({k for n in MSA_RUNS if n in runs for k in runs[n]["recall_sweep"]},
                  key=lambda s: (int(s.split("_k")[0][1:]), int(s.split("_k")[1])))
    if not keys:
        return "(no recall sweep recorded)"
    head = "| run | " + " | ".join(f"B={k.split('_k')[0][1:]} k={k.split('_k')[1]}" for k in keys) + " |"
    rows = [head, "|---|" + "---:|" * len(keys)]
    for n in MSA_RUNS:
        if n in runs and runs[n]["recall_sweep"]:
            rows.append(f"| {LABELS[n]} | " + " | ".join(_pct(runs[n]["recall_sweep"].get(k)) for k in keys) + " |")
    return "\n".join(rows)


def goals(results: Dict[str, Any]) -> List[str]:
    """The issue's goals, each with the measured numbers and met / not met / not measured."""
    runs, out = results["runs"], []
    get = lambda n, k: runs.get(n, {}).get("final", {}).get(k)  # noqa: E731

    def verdict(ok: Optional[bool]) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**not met**")

    d, m, s = get("dense", "val_loss"), get("msa", "val_loss"), get("swa", "val_loss")
    ok = None if None in (d, m, s) else (m <= d * 1.01 and m < s)
    gap = "-" if None in (d, m) else f"{100 * (m - d) / d:+.2f}%"
    out.append(f"- MSA final held-out loss within 1% of dense and below the FLOP-matched window: MSA {_fmt(m)}, "
               f"dense {_fmt(d)} ({gap}), sliding window {_fmt(s)} -> {verdict(ok)}")
    d, m, s = get("dense", "assoc_recall"), get("msa", "assoc_recall"), get("swa", "assoc_recall")
    ok = None if None in (d, m) or not d else m >= 0.95 * d
    out.append(f"- Associative recall, MSA >= 95% of dense: MSA {_pct(m)}, dense {_pct(d)} -> {verdict(ok)}; "
               f"sliding window {_pct(s)} (every pair is ~a sequence length before its query, beyond the window "
               f"of {results.get('swa_window', '?')} tokens; chance 1/48 = 2.1%)")
    sweep = runs.get("msa", {}).get("recall_sweep", {})
    r = sweep.get("B128_k16")
    out.append(f"- Selection recall of the trained MSA model at k=16, block 128: {_pct(r)} at the training length "
               f"{results.get('seq_length', '?')} (the goal asks for 8K; not run at 8K here) -> "
               f"{verdict(None if r is None else r >= 0.95)}")
    conv = results.get("conversion") or {}
    frac = conv.get("reached_fraction")
    reached = conv.get("reached_at_tokens")
    text = ("not reached within the run" if reached is None and conv.get("first_sparse_val_loss") is not None
            else f"{reached:,} tokens = {_pct(frac)} of the dense run's tokens" if reached is not None else "-")
    ok = None if not conv or conv.get("first_sparse_val_loss") is None else (frac is not None and frac <= 0.05)
    out.append(f"- Dense -> MSA conversion reaches the dense final held-out loss ({_fmt(conv.get('dense_final_val_loss'))}, "
               f"tolerance {_pct(conv.get('tolerance'))}) within 5% of the original tokens: first sparse evaluation "
               f"{_fmt(conv.get('first_sparse_val_loss'))}; reached after {text} -> {verdict(ok)}")
    return out


def generated_block(results: Dict[str, Any], plot_dir_rel: str) -> str:
    meta = results["meta"]
    lines = [BEGIN, "", f"**{meta['label']}** — preset `{meta['preset']}`, device: {meta['device']}, date: {meta['date']}, "
             f"commit `{meta['commit']}`, torch {meta['torch']}; total wall time {meta.get('wall_s', 0) / 60:.1f} min.", "",
             f"Model `{results['model']}`, sequence {results['seq_length']}, MSA block {results['block_size']} x "
             f"top-{results['topk']} ({results['block_size'] * results['topk']} of {results['seq_length']} keys), "
             f"FLOP-matched window {results.get('swa_window')} tokens (Eq. 12).", "",
             "Command:", "", "```bash", meta["command"], f"python scripts/fidelity.py --report {meta['out_dir']}", "```", "",
             "### Results", "", table(results), "", *_status_lines(results), "### Goals (measured)", "", *goals(results), "",
             "### Selection recall vs k of the trained models (held-out, dense main branch)", "", sweep_table(results), "",
             "### Plots", ""]
    for name, what in (("loss", "training and held-out LM loss"), ("grad_norm", "gradient norm per step"),
                       ("entropy", "main-branch attention entropy per layer, first steps"),
                       ("kl_recall", "indexer KL and selection recall over training"),
                       ("assoc_recall", "associative-recall accuracy at each evaluation"),
                       ("recall_vs_k", "selection recall vs k of the trained models")):
        lines.append(f"![{what}]({plot_dir_rel}/{name}.png)")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _status_lines(results: Dict[str, Any]) -> List[str]:
    """Runs that did not finish (exit code, skipped), and per-run wall times."""
    st = results.get("status") or {}
    bad = [f"`{n}` ({'skipped: ' + s['skipped'] if s.get('skipped') else 'exit ' + str(s.get('rc'))})"
           for n, s in st.items() if s.get("rc") != 0]
    walls = ", ".join(f"{n} {s['wall_s']:.0f}s" for n, s in st.items() if s.get("wall_s") is not None)
    out = [f"**Runs that did not finish: {', '.join(bad)}** (their rows are partial or missing).", ""] if bad else []
    return out + ([f"Wall time per run: {walls}.", ""] if walls else [])


def write_doc(results: Dict[str, Any], doc: Path, plot_dir_rel: str) -> None:
    """Replace the generated block of ``doc`` (or create the doc around it)."""
    block = generated_block(results, plot_dir_rel)
    if doc.is_file() and BEGIN in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        doc.write_text(head + block + tail)
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text("# Fidelity report\n\n" + block + "\n")


# --------------------------------------------------------------------------- plots
def plots(results: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    written = []

    def save(fig, name):
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    dense_tokens = runs.get("dense", {}).get("final", {}).get("tokens") or 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in RUN_NAMES:
        if n not in runs:
            continue
        r = runs[n]
        offset = dense_tokens if n == "dense_to_msa" else 0
        tok = dict((s, t) for s, t in r["tokens"])
        xs = [tok.get(s, 0) + offset for s, _ in r["loss"]]
        a.plot(xs, _ema([v for _, v in r["loss"]]), label=LABELS[n], lw=1)
        b.plot([t + offset for _, t, _ in r["val_loss"]], [v for _, _, v in r["val_loss"]], marker="o", ms=3, label=LABELS[n])
    a.set(title="training LM loss (EMA 0.9)", xlabel="tokens", ylabel="loss")
    b.set(title="held-out LM loss", xlabel="tokens (conversion: after the dense run)", ylabel="loss")
    b.legend(fontsize=7)
    save(fig, "loss")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in RUN_NAMES:
        if n in runs and runs[n]["grad_norm"]:
            ax.plot(*zip(*runs[n]["grad_norm"]), label=LABELS[n], lw=0.8)
    ax.set(title="global gradient norm (before clipping)", xlabel="step", ylabel="grad norm", yscale="log")
    ax.legend(fontsize=7)
    save(fig, "grad_norm")

    ent = [n for n in MSA_RUNS if n in runs and runs[n]["main_entropy"]]
    fig, axes = plt.subplots(1, max(1, len(ent)), figsize=(4 * max(1, len(ent)), 3.8), squeeze=False)
    for ax, n in zip(axes[0], ent):
        for layer, series in runs[n]["main_entropy"].items():
            if series:
                ax.plot(*zip(*series), label=layer, lw=1)
        if runs[n].get("switch_step"):
            ax.axvline(runs[n]["switch_step"], color="grey", ls=":", lw=1)
        ax.set(title=LABELS[n], xlabel="step", ylabel="main-branch entropy (nats)")
        ax.legend(fontsize=7)
    save(fig, "entropy")

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in MSA_RUNS:
        if n in runs:
            if runs[n]["indexer_kl"]:
                a.plot(*zip(*runs[n]["indexer_kl"]), label=LABELS[n], lw=0.8)
            if runs[n]["recall"]:
                b.plot(*zip(*runs[n]["recall"]), marker="o", ms=3, label=LABELS[n])
    a.set(title="indexer KL (all causal tokens in warmup, selected tokens after)", xlabel="step", yscale="log")
    b.set(title="selection recall (attention mass of the selected blocks)", xlabel="step", ylim=(0, 1.02))
    b.legend(fontsize=7)
    save(fig, "kl_recall")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in RUN_NAMES:
        if n in runs and runs[n]["assoc_recall"]:
            ax.plot(*zip(*runs[n]["assoc_recall"]), marker="o", ms=3, label=LABELS[n])
    ax.axhline(1 / 48, color="grey", ls=":", lw=1, label="chance (1/48)")
    ax.set(title="held-out associative-recall accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    save(fig, "assoc_recall")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in MSA_RUNS:
        sweep = runs.get(n, {}).get("recall_sweep") or {}
        for block in sorted({int(k.split("_k")[0][1:]) for k in sweep}):
            pts = sorted((int(k.split("_k")[1]), v) for k, v in sweep.items() if int(k.split("_k")[0][1:]) == block)
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=f"{LABELS[n]}, block {block}")
    ax.set(title=f"selection recall vs k (held-out, seq {results['seq_length']})", xlabel="top-k blocks",
           ylabel="attention mass kept", xscale="log", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    save(fig, "recall_vs_k")
    return written


def _ema(xs: List[float], beta: float = 0.9) -> List[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def report(results_path: Path, doc: Path, plot_dir: Path) -> List[Path]:
    """Plots + doc from results.json; the per-run numbers are re-derived from the run
    directories next to it when they are there (so the current collector is used)."""
    from .collect import collect, conversion_summary

    results = json.loads(Path(results_path).read_text())
    if (Path(results_path).parent / "runs").is_dir():
        runs = collect(Path(results_path).parent, RUN_NAMES)
        if runs:
            results["runs"] = runs
            if "dense" in runs and "dense_to_msa" in runs:
                results["conversion"] = conversion_summary(runs["dense"], runs["dense_to_msa"])
    written = plots(results, plot_dir)
    rel = str(Path(plot_dir).resolve().relative_to(Path(doc).resolve().parent)) \
        if Path(plot_dir).resolve().is_relative_to(Path(doc).resolve().parent) else str(plot_dir)
    write_doc(results, doc, rel)
    return written + [doc]


__all__ = ["BEGIN", "END", "generated_block", "goals", "plots", "report", "table", "write_doc"]

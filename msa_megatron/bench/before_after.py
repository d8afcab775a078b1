"""Side-by-side table of two ``msa-bench`` runs of the same rows: an old tree and a new one,
on the same GPU in the same session (scripts/gpu_bench_before_after.sh runs both).

    python -m msa_megatron.bench.before_after --old OLD_DIR[,OLD_DIR2] --new NEW_DIR[,NEW_DIR2] --out OUT

Each DIR holds a ``bench.json`` of the harness. Several directories per side are rounds of
the same rows (old, new, old, new, ...): the table keeps each side's fastest time per row, so
one noisy round does not decide. ratio = new / old; a row is flagged "slower" when the ratio
exceeds 1 + ``--tolerance`` (default 3%, about the run-to-run spread of these medians).
Writes ``before_after.md`` and ``before_after.json``; exit status 1 when any row is slower.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

Key = Tuple[str, int, str]
METRICS = ("fwd_ms", "fwdbwd_ms")


def best_times(records: Iterable[Dict]) -> Dict[Key, Dict]:
    """(impl, L, selection) -> {metric: fastest ok time over the records, device, commit}."""
    out: Dict[Key, Dict] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        key = (r["impl"], int(r["L"]), str(r.get("selection", "-")))
        row = out.setdefault(key, {"device": r.get("device"), "commit": r.get("commit")})
        for m in METRICS:
            v = r.get(m)
            if v is not None and (row.get(m) is None or v < row[m]):
                row[m] = float(v)
    return out


def compare(old: Iterable[Dict], new: Iterable[Dict], tolerance: float = 0.03) -> List[Dict]:
    """One row per (impl, L, selection, metric) present in both runs, with ratio = new / old."""
    a, b = best_times(old), best_times(new)
    rows = []
    for key in sorted(set(a) & set(b), key=lambda k: (k[0], k[1], k[2])):
        for m in METRICS:
            x, y = a[key].get(m), b[key].get(m)
            if x is None or y is None:
                continue
            ratio = y / x
            rows.append(dict(impl=key[0], L=key[1], selection=key[2], metric=m, old_ms=x, new_ms=y, ratio=ratio,
                             slower=ratio > 1 + tolerance, device=b[key]["device"],
                             old_commit=a[key]["commit"], new_commit=b[key]["commit"]))
    return rows


def _length(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)


def markdown(rows: List[Dict], tolerance: float, missing: List[str]) -> str:
    dev = rows[0]["device"] if rows else "?"
    head = (f"# msa-bench before / after (one GPU, one session)\n\ndevice {dev}; old {rows[0]['old_commit'] if rows else '?'}"
            f", new {rows[0]['new_commit'] if rows else '?'}; fastest of the rounds per side; ratio = new / old, "
            f"'slower' above {1 + tolerance:.2f}\n\n| impl | L | selection | metric | old ms | new ms | ratio | |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['impl']} | {_length(r['L'])} | {r['selection']} | {r['metric'][:-3]} | {r['old_ms']:.3f} | "
                   f"{r['new_ms']:.3f} | {r['ratio']:.3f} | {'slower' if r['slower'] else ''} |\n" for r in rows)
    tail = "".join(f"\nnot compared: {m}" for m in missing)
    slow = [r for r in rows if r["slower"]]
    verdict = ("nothing compared" if not rows else "no row slower" if not slow else
               ", ".join(f"{r['impl']} {_length(r['L'])} {r['metric'][:-3]} x{r['ratio']:.3f}" for r in slow) + " slower")
    return head + body + tail + f"\n\nverdict: {verdict}\n"


def _load(dirs: str) -> List[Dict]:
    recs: List[Dict] = []
    for d in dirs.split(","):
        p = Path(d.strip()) / "bench.json"
        if p.exists():
            recs += json.loads(p.read_text())
    return recs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msa_megatron.bench.before_after", description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="comma-separated bench output dirs of the old tree")
    p.add_argument("--new", required=True, help="comma-separated bench output dirs of the new tree")
    p.add_argument("--out", required=True)
    p.add_argument("--tolerance", type=float, default=0.03)
    a = p.parse_args(argv)
    old, new = _load(a.old), _load(a.new)
    rows = compare(old, new, a.tolerance)
    ko, kn = set(best_times(old)), set(best_times(new))
    missing = [f"{k[0]} {_length(k[1])} ({'old only' if k in ko else 'new only'})" for k in sorted(ko ^ kn)]
    missing += [f"{r['impl']} {_length(r['L'])}: {r.get('status')} {r.get('reason', '')[:80]}"
                for r in old + new if r.get("status") != "ok"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, a.tolerance, missing)
    (out / "before_after.md").write_text(md)
    (out / "before_after.json").write_text(json.dumps(dict(rows=rows, missing=missing, tolerance=a.tolerance), indent=1))
    print(md)
    return 1 if any(r["slower"] for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

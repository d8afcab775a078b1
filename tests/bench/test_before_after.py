"""msa_megatron.bench.before_after (the table of scripts/gpu_bench_before_after.sh), on
made-up harness records: fastest round per side, ratio new / old, slower rows flagged,
rows missing on one side or not ok listed, exit status."""

import json

from msa_megatron.bench import before_after as BA


def rec(impl, L, fwd, fwdbwd=None, status="ok", commit="x"):
    return dict(impl=impl, L=L, selection="random", fwd_ms=fwd, fwdbwd_ms=fwdbwd, status=status, reason="",
                device="H100", commit=commit)


def test_compare_keeps_the_fastest_round_and_flags_slower_rows():
    old = [rec("msa-op", 32768, 10.0, 30.0), rec("msa-op", 32768, 9.0, 31.0), rec("index-fused", 32768, 2.0)]
    new = [rec("msa-op", 32768, 9.5, 29.0), rec("msa-op", 32768, 8.8, 35.0), rec("index-fused", 32768, 2.2)]
    rows = {(r["impl"], r["metric"]): r for r in BA.compare(old, new, tolerance=0.03)}
    assert rows["msa-op", "fwd_ms"]["old_ms"] == 9.0 and rows["msa-op", "fwd_ms"]["new_ms"] == 8.8
    assert abs(rows["msa-op", "fwdbwd_ms"]["ratio"] - 29.0 / 30.0) < 1e-12 and not rows["msa-op", "fwdbwd_ms"]["slower"]
    assert rows["index-fused", "fwd_ms"]["slower"]  # 2.2 / 2.0 = 1.10 > 1.03
    assert ("index-fused", "fwdbwd_ms") not in rows  # no fwd+bwd time on either side


def test_main_writes_the_table_and_fails_on_a_slower_row(tmp_path):
    for side, recs in (("old", [rec("msa-main", 131072, 5.0, 20.0), rec("kl-sparse-fused", 131072, None, status="error")]),
                       ("new", [rec("msa-main", 131072, 5.05, 19.0)])):
        (tmp_path / side).mkdir()
        (tmp_path / side / "bench.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    assert BA.main(["--old", str(tmp_path / "old"), "--new", str(tmp_path / "new"), "--out", str(out)]) == 0
    md = (out / "before_after.md").read_text()
    assert "| msa-main | 128K | random | fwd | 5.000 | 5.050 | 1.010 |" in md and "verdict: no row slower" in md
    assert "kl-sparse-fused 128K: error" in md
    assert BA.main(["--old", str(tmp_path / "old"), "--new", str(tmp_path / "new"), "--out", str(out),
                    "--tolerance", "0.005"]) == 1
    assert "msa-main 128K fwd x1.010 slower" in (out / "before_after.md").read_text()

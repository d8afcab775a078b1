#!/usr/bin/env bash
# Long-context training on one GPU: msa-train model=small_moe train=gpu at 32K and 64K tokens per
# sequence, attention=dense vs attention=msa (block 128, top-16, index dim 128), global batch 1,
# 12 steps each (the first 6 warm up: CUDA/Triton compilation, allocator; the last 6 are timed).
# MSA runs warm up the indexer for WARMUP=2 steps, so every timed step is sparse (checked).
# Dense layers (all of attention=dense, the first layer of MSA models) run torch SDPA
# (msa_megatron/megatron/dense_attention.py); before it, attention=dense at 32K died with CUDA OOM
# ("Tried to allocate 64.00 GiB": Megatron's unfused DotProductAttention, issue 15).
#
# Prerequisite on a bare GPU machine: megatron-core / hydra-core / omegaconf / antlr4 wheels in
# /tmp/site (wandb is not needed: it is disabled below). From the repository root:
#   export PYTHONPATH=/tmp/site; OUT=<dir> bash scripts/gpu_long_context.sh
# First (if pytest is importable) the GPU test of the SDPA core attention (tests/megatron/
# test_dense_attention.py -m gpu: fused kernel eligible, peak memory vs DotProductAttention at 8K).
# Writes $OUT/long_context.md (table), $OUT/long_context.json, $OUT/<attention>_<seq>.log,
# $OUT/sdpa_gpu_test.log and the runs' metrics.jsonl/summary.json. ~5 minutes on an H100; exit
# status 0 only if every run finished and the MSA runs' timed steps were sparse.
# Knobs (for a CPU check of the override names: see the end of docs/backend.md):
#   SEQS="32768 65536" ATTENTIONS="dense msa" STEPS=12 TIMED=6 WARMUP=2 MODEL=small_moe TRAIN=gpu
#   MSA_SHAPE="model.msa_block_size=128 model.msa_topk=16 model.msa_index_dim=128" EXTRA="" RUN_TIMEOUT=140 (per run: 4 runs stay under 10 minutes)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_long_context_$(date +%Y%m%d_%H%M%S)}
SEQS=${SEQS:-"32768 65536"}
ATTENTIONS=${ATTENTIONS:-"dense msa"}
STEPS=${STEPS:-12}
TIMED=${TIMED:-6}
WARMUP=${WARMUP:-2}
MODEL=${MODEL:-small_moe}
TRAIN=${TRAIN:-gpu}
MSA_SHAPE=${MSA_SHAPE:-"model.msa_block_size=128 model.msa_topk=16 model.msa_index_dim=128"}
EXTRA=${EXTRA:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-140}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
: > "$OUT/status.txt"

PYTHONWARNINGS=ignore "$PY" -W ignore - <<'EOF' 2>&1 | grep -v -i "warn" | tee "$OUT/prereq.txt"
import sys, torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
import megatron.core, hydra, msa_megatron
print(f"megatron-core {megatron.core.__version__} | hydra {hydra.__version__} | msa_megatron {msa_megatron.__file__}")
EOF

# 0. the SDPA core attention against Megatron's DotProductAttention on this GPU (8K tokens: fused
#    kernel eligible, no S x S memory, same output/gradients); ~20 s; needs pytest.
if [ "${SKIP_GPU_TEST:-0}" != 1 ] && "$PY" -c "import pytest, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/megatron/test_dense_attention.py -rA > "$OUT/sdpa_gpu_test.log" 2>&1
  echo "sdpa_gpu_test rc=$?" | tee -a "$OUT/status.txt"
  tail -n 3 "$OUT/sdpa_gpu_test.log"
else
  echo "sdpa_gpu_test skipped (no CUDA device or no pytest)" | tee -a "$OUT/status.txt"
fi

for seq in $SEQS; do
  for att in $ATTENTIONS; do
    name="${att}_${seq}"
    run_dir="$OUT/runs/$name"
    rm -rf "$run_dir"
    args=(model="$MODEL" train="$TRAIN" attention="$att" run_dir="$run_dir"
          train.seq_length="$seq" train.global_batch_size=1 train.micro_batch_size=1 train.steps="$STEPS"
          train.eval_interval=0 logging.log_interval=1 logging.progress_bar=false logging.wandb.enabled=false
          logging.per_layer=false checkpoint.interval=0 checkpoint.save_at_end=false checkpoint.save_on_sigterm=false
          checkpoint.resume=never)
    if [ "$att" = msa ]; then
      # shellcheck disable=SC2206
      args+=($MSA_SHAPE attention.warmup.steps="$WARMUP" attention.msa.recall_interval=0)
    fi
    # shellcheck disable=SC2206
    args+=($EXTRA)
    echo "== $name: $PY -m msa_megatron.train ${args[*]}"
    start=$(date +%s)
    timeout "$RUN_TIMEOUT" "$PY" -m msa_megatron.train "${args[@]}" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/status.txt"
    [ $rc -eq 0 ] || tail -n 5 "$OUT/$name.log"
  done
done

OUT="$OUT" STEPS="$STEPS" TIMED="$TIMED" SEQS="$SEQS" ATTENTIONS="$ATTENTIONS" "$PY" - <<'EOF'
import json, os, re
out, steps, timed = os.environ["OUT"], int(os.environ["STEPS"]), int(os.environ["TIMED"])
status = dict(re.match(r"(\S+) rc=(\d+)", l).groups() for l in open(f"{out}/status.txt") if " rc=" in l)
rows, ok = [], True
for seq in map(int, os.environ["SEQS"].split()):
    for att in os.environ["ATTENTIONS"].split():
        name = f"{att}_{seq}"
        path = f"{out}/runs/{name}/metrics.jsonl"
        recs = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
        recs = [r for r in recs if "event" not in r and "step_time_s" in r]
        last = [r for r in recs if r["step"] > steps - timed]
        row = {"attention": att, "seq": seq, "rc": int(status.get(name, -1)), "timed_steps": len(last)}
        if row["rc"] != 0 or len(last) != timed:
            log = open(f"{out}/{name}.log").read().strip().splitlines() if os.path.exists(f"{out}/{name}.log") else []
            err = [l for l in log if "Error" in l or "error" in l]
            row["error"] = (err or log or ["no log"])[-1][:300]
            ok = False
        else:
            row["step_time_s"] = sum(r["step_time_s"] for r in last) / len(last)
            row["tokens_per_s"] = sum(r["tokens_per_s"] for r in last) / len(last)
            row["modes"] = sorted({r.get("attention_mode") for r in last})
            row["lm_loss_last"] = last[-1]["lm_loss"]
            peaks = [r.get("peak_mem_gib", r.get("mem_gb", 0) * 1e9 / 2**30) for r in recs]
            row["peak_mem_gib"] = max(peaks)
            row["mem_kind"] = recs[-1].get("mem_kind")
            if att == "msa" and row["modes"] != ["msa"]:
                row["error"] = f"timed steps not all sparse: modes {row['modes']}"
                ok = False
        rows.append(row)
for row in rows:
    dense = next((r for r in rows if r["attention"] == "dense" and r["seq"] == row["seq"]), None)
    if row["attention"] != "dense" and dense and "step_time_s" in dense and "step_time_s" in row:
        row["speedup_vs_dense"] = dense["step_time_s"] / row["step_time_s"]
lines = ["| attention | seq | step time (s) | tokens/s | peak memory (GiB) | speed-up vs dense | last loss | note |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
for r in rows:
    if "step_time_s" in r:
        sp = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else ""
        lines.append(f"| {r['attention']} | {r['seq']:,} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mem_gib']:.2f} | {sp} | {r['lm_loss_last']:.3f} | {r.get('error', 'modes ' + ','.join(r['modes']))} |")
    else:
        lines.append(f"| {r['attention']} | {r['seq']:,} | | | | | | FAILED rc={r['rc']}: {r.get('error', '')} |")
table = "\n".join(lines)
gpu_test = status.get("sdpa_gpu_test")
if gpu_test not in (None, "0"):
    ok = False
table += "\n\nSDPA GPU test (tests/megatron/test_dense_attention.py -m gpu): " + (
    "skipped" if gpu_test is None else ("passed" if gpu_test == "0" else f"FAILED rc={gpu_test} (sdpa_gpu_test.log)"))
head = open(f"{out}/prereq.txt").read().strip()
text = (f"{head}\n\nmsa-train, global batch 1, mean of the last {timed} of {steps} steps; peak memory: "
        "torch.cuda.max_memory_allocated over the run (CPU: process RSS)\n\n" + table + "\n")
open(f"{out}/long_context.md", "w").write(text)
json.dump({"rows": rows, "ok": ok}, open(f"{out}/long_context.json", "w"), indent=1)
print(text)
print("ALL RUNS OK" if ok else "SOME RUNS FAILED (see the table and the logs)")
raise SystemExit(0 if ok else 1)
EOF

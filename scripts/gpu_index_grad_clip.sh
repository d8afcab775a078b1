#!/usr/bin/env bash
# msa.index_grad_clip on the real stack (bf16, Triton kernels, distributed optimizer): the scale
# preset's c8k_msa_s1 for STEPS steps (warmup 4, no evaluation, no checkpoint) once per mode, in one
# call on one GPU; prints per mode the logged grad norms, the index branch's norm (separate only) and
# the mean tokens/s of the sparse steps after the first third, so the two modes' throughput is a ratio
# measured side by side. CPU dry run: PRESET=scale_cpu STEPS=6 bash scripts/gpu_index_grad_clip.sh
set -u
cd "$(dirname "$0")/.."
echo "device: $(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")') | date: $(date -u '+%Y-%m-%d %H:%M UTC') | commit: ${MSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
echo "| index_grad_clip | steps | grad_norm (last 4 logged) | index_grad_norm | tokens/s (sparse, last 2/3) | finite |"
echo "|---|---:|---|---|---:|---|"
for mode in global separate; do
  overrides=$(python scripts/fidelity.py --scale-preset "${PRESET:-scale}" --overrides c8k_msa_s1 --work "/tmp/igc_$mode")
  eval "python -m msa_megatron.train $overrides train.steps=${STEPS:-40} attention.warmup.steps=4 train.eval_interval=0 \
    checkpoint.interval=0 checkpoint.save_at_end=false attention.msa.recall_interval=0 \
    attention.msa.index_grad_clip=$mode run_dir=/tmp/igc_$mode/run" > "/tmp/igc_$mode.log" 2>&1
  echo "$mode: exit $?"
  python - "$mode" <<'PY'
import json, math, sys
mode = sys.argv[1]
recs = [json.loads(line) for line in open(f"/tmp/igc_{mode}/run/metrics.jsonl")]
steps = [r for r in recs if "grad_norm" in r]
late = [r for r in steps if r["step"] > steps[-1]["step"] // 3 and r.get("attention_mode") == "msa" and "tokens_per_s" in r]
tps = sum(r["tokens_per_s"] for r in late) / max(len(late), 1)
print(f"| {mode} | {steps[-1]['step']} | {', '.join(f'{r['grad_norm']:.3f}' for r in steps[-4:])} | "
      f"{', '.join(f'{r['index_grad_norm']:.3f}' for r in steps[-4:] if 'index_grad_norm' in r) or '-'} | {tps:,.0f} | "
      f"{all(math.isfinite(r['grad_norm']) for r in steps)} |")
PY
done

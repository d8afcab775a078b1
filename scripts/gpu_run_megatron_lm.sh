#!/usr/bin/env bash
# GPU run of MSA through Megatron-LM's own pretrain loop (scripts/pretrain_gpt_msa.py), one GPU.
#
# Prerequisite (the GPU image has torch + triton + numpy/einops/pyyaml/psutil/tensorboard but not
# megatron-core, wandb, hydra): from the repository root, with the wheels in .whl/
# (../shared/device/wheels.sh --with-wandb), run first
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
# then:  bash scripts/gpu_run_megatron_lm.sh        (OUT=<dir> for the logs, default ./runs/...)
#
# What it does (~3 min on an H100; logs, TensorBoard events and offline wandb runs under $OUT):
#  0. prerequisites: CUDA device, versions, every module Megatron-LM's training loop imports at
#     start-up (megatron-core 0.19.x incl. megatron.training, wandb, tensorboard, ...); Apex and
#     Transformer Engine are NOT needed: --transformer-impl local, --no-gradient-accumulation-fusion
#     (apex), --no-rope-fusion (TE/apex), --no-masked-softmax-fusion, --no-persist-layer-norm;
#  1. `pretrain_gpt_msa.py --help` shows the --msa-* flags; the full launch line is parsed and
#     validated by Megatron-LM (no CUDA work) and the MSA model config built from it;
#  2. run 1: a 4-layer MoE GPT (hidden 512, 8 query heads / 2 KV groups, 8 experts top-2, layer 0
#     dense attention, layers 1-3 MSA), seq 4096, block 128, top-8 blocks (of 32: sparse), bf16,
#     micro batch 1, global batch 4, mock data; msa_warmup for iterations 1-20, msa from 21,
#     recall every 10, eval at 25; checkpoint at 30 and exit;
#  3. run 2: same line + --load: resumes at 30, trains 31-50 (eval at 50);
#  4. summary + checks (python -m msa_megatron.megatron_lm.run_summary): losses at start/end,
#     warmup->sparse switch at 21, MSA metrics on the iteration lines, in TensorBoard and in both
#     offline wandb runs, resume iteration. Exit status 0 only if every check passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_megatron_lm_$(date +%Y%m%d_%H%M%S)}
CKPT=${CKPT_DIR:-/tmp/msa_megatron_lm_ckpt}   # ~1 GB with optimizer state: kept out of $OUT
mkdir -p "$OUT"
rm -rf "$CKPT" "$OUT/tb" "$OUT/wandb"
export WANDB_MODE=offline WANDB_SILENT=true CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
echo "== logs under $OUT (checkpoint: $CKPT)"

step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "0. prerequisites"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/prereq.txt"
import importlib, sys, warnings
warnings.filterwarnings("ignore")
def version(name):
    try:
        m = importlib.import_module(name)
        return getattr(m, "__version__", "present")
    except Exception as exc:  # report every missing piece, then fail below
        return f"MISSING ({type(exc).__name__}: {exc})"
import torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
print(f"device {torch.cuda.get_device_name(0)} | bf16 {torch.cuda.is_bf16_supported()}")
need = ["triton", "megatron.core", "megatron.training.training", "wandb", "tensorboard", "numpy", "einops",
        "yaml", "psutil", "msa_megatron", "msa_megatron.patches"]
found = {n: version(n) for n in need}
for n, v in found.items():
    print(f"  {n:28s} {v}")
for n in ("apex", "transformer_engine"):
    print(f"  {n:28s} {version(n)}  (not needed: local backend, see flags)")
missing = [n for n, v in found.items() if str(v).startswith("MISSING")]
if missing:
    sys.exit(f"missing prerequisites: {missing}; install the wheels (see the top of this script) and "
             "export PYTHONPATH=$PWD:/tmp/site")
if not found["megatron.core"].startswith("0.19."):
    sys.exit(f"megatron-core {found['megatron.core']}: this integration is pinned to 0.19.x")
EOF

MODEL=(
  --num-layers 4 --hidden-size 512 --num-attention-heads 8 --group-query-attention --num-query-groups 2
  --kv-channels 64 --ffn-hidden-size 2048 --normalization RMSNorm --swiglu --disable-bias-linear
  --position-embedding-type rope --rotary-percent 0.5 --untie-embeddings-and-output-weights
  --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1024 --moe-token-dispatcher-type alltoall
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
  --seq-length 4096 --max-position-embeddings 4096
)
MSA=(
  --experimental-attention-variant msa --msa-block-size 128 --msa-topk 8 --msa-first-dense-layers 1
  --msa-warmup-iters 20 --msa-recall-interval 10 --msa-kl-coeff 1.0
)
NO_APEX_TE=(
  --transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-masked-softmax-fusion
  --no-persist-layer-norm
)
TRAIN=(
  --micro-batch-size 1 --global-batch-size 4 --train-iters 50 --bf16
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --clip-grad 1.0
  --adam-beta2 0.95 --seed 1234
  --mock-data --tokenizer-type NullTokenizer --vocab-size 8192 --split 99,1,0
  --no-create-attention-mask-in-dataloader --num-workers 1
  --eval-interval 25 --eval-iters 2
  --log-interval 1 --tensorboard-dir "$OUT/tb"
  --wandb-project msa-megatron-lm --wandb-exp-name gpu-smoke --wandb-save-dir "$OUT/wandb"
  --save "$CKPT" --save-interval 30
)
ARGS=("${MODEL[@]}" "${MSA[@]}" "${NO_APEX_TE[@]}" "${TRAIN[@]}")
printf '%s ' "${ARGS[@]}" > "$OUT/launch_args.txt"

step "1a. pretrain_gpt_msa.py --help"
"$PY" scripts/pretrain_gpt_msa.py --help > "$OUT/help.txt" 2>&1 || fail "--help failed (see $OUT/help.txt)"
for flag in --msa-block-size --msa-topk --msa-warmup-iters --msa-recall-interval --msa-layers; do
  grep -q -- "  $flag " "$OUT/help.txt" || fail "$flag missing from --help (see $OUT/help.txt)"
done
echo "--help lists the --msa-* flags: $(grep -c -- '^  --msa-' "$OUT/help.txt") options"
grep -q -- "--experimental-attention-variant {gated_delta_net,dsa,msa}" "$OUT/help.txt" \
  || fail "'msa' is not a choice of --experimental-attention-variant (see $OUT/help.txt)"

step "1b. dry check: Megatron-LM parses and validates the launch line, MSA config built (no training)"
"$PY" - "${ARGS[@]}" > "$OUT/dryrun.log" 2>&1 <<'EOF' || { tail -20 "$OUT/dryrun.log"; fail "dry check"; }
import sys
import msa_megatron.megatron_lm as msa_lm
msa_lm.install()
from megatron.training.arguments import parse_args, validate_args
sys.argv = ["pretrain_gpt_msa.py", *sys.argv[1:]]
args = validate_args(parse_args(), {})
config = msa_lm.transformer_config_from_args(args)
print(f"DRY OK: {type(config).__name__} msa layers {config.msa_layer_indices} {config.msa}")
print(f"DRY OK: warmup iters {args.msa_warmup_iters}, train iters {args.train_iters}, save interval {args.save_interval}")
EOF
grep "DRY OK" "$OUT/dryrun.log"

launch() {  # launch NAME EXTRA_ARGS...
  local name=$1; shift
  local t0=$SECONDS
  timeout 240 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 scripts/pretrain_gpt_msa.py \
    "${ARGS[@]}" "$@" > "$OUT/$name.log" 2>&1 || { tail -40 "$OUT/$name.log"; fail "$name (log: $OUT/$name.log)"; }
  echo "$name done in $((SECONDS - t0)) s"
  grep -E "\[MSA\]|saved checkpoint|loaded checkpoint|validation loss at" "$OUT/$name.log" | cut -c1-200 || true
  { grep -E "\] iteration +[0-9]+/" "$OUT/$name.log" || true; } | sed -n '1p;$p' | cut -c1-400
}

step "2. run 1: iterations 1-30 (warmup 1-20, sparse from 21), checkpoint at 30"
launch run1 --exit-interval 30

step "3. run 2: resume from the checkpoint, iterations 31-50"
launch run2 --load "$CKPT"

step "4. summary"
"$PY" -m msa_megatron.megatron_lm.run_summary --log "$OUT/run1.log" --log "$OUT/run2.log" \
  --tensorboard "$OUT/tb" --wandb "$OUT/wandb" --expect-switch 21 --expect-resume 30 --expect-last 50 \
  | tee "$OUT/summary.txt"

"""Megatron-LM's real ``pretrain`` loop with MSA, end to end on CPU (gloo, one rank): the launch
line of scripts/pretrain_gpt_msa.py parsed by Megatron-LM, the MoE + MSA model built by Megatron-LM's
GPTModelBuilder, mock data, warmup then sparse attention switched by the loop hook, MSA metrics on
the iteration line, in TensorBoard (a recording stand-in: tensorboard is not installed here) and in
an offline wandb run, a torch_dist checkpoint at iteration 4 and a second invocation resuming from
it. How CUDA is stood in for: tests/megatron_lm/cpu_pretrain_runner.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlm_helpers import ROOT

RUNNER = Path(__file__).resolve().parent / "cpu_pretrain_runner.py"

LAUNCH = (
    "--distributed-backend gloo --use-cpu-initialization --num-workers 0 "
    "--num-layers 3 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--ffn-hidden-size 128 --seq-length 128 --max-position-embeddings 128 --micro-batch-size 1 "
    "--global-batch-size 2 --train-iters 6 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine "
    "--transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-masked-softmax-fusion "
    "--no-persist-layer-norm --attention-dropout 0.0 --hidden-dropout 0.0 --position-embedding-type rope "
    "--rotary-percent 0.5 --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-token-dispatcher-type allgather "
    "--moe-aux-loss-coeff 1e-2 "
    "--experimental-attention-variant msa --msa-block-size 32 --msa-topk 2 --msa-index-dim 16 "
    "--msa-first-dense-layers 1 --msa-warmup-iters 2 --msa-recall-interval 3 --msa-backend reference "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 500 --split 99,1,0 --eval-iters 0 "
    "--eval-interval 1000 --log-interval 1 --seed 1"
).split()


def run(out: Path, name: str, extra, port: int) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               MSA_TB_RECORD=str(out / f"{name}.tb.jsonl"), WANDB_MODE="offline", WANDB_SILENT="true",
               CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(RUNNER), *LAUNCH, "--tensorboard-dir", str(out / "tb"), *extra],
                          env=env, cwd=str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    (out / f"{name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def recorded(path: Path):
    series = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        series.setdefault(r["tag"], []).append((r["step"], r["value"]))
    return series


@pytest.mark.slow
def test_pretrain_warmup_metrics_checkpoint_resume(tmp_path):
    from tests.dist_harness import free_port

    from msa_megatron.megatron_lm.run_summary import parse_log, read_wandb_offline, summarise

    ckpt = tmp_path / "ckpt"
    first = run(tmp_path, "run1", ["--save", str(ckpt), "--save-interval", "4", "--exit-interval", "4"], free_port())
    second = run(tmp_path, "run2", ["--load", str(ckpt), "--wandb-project", "msa-cpu-test", "--wandb-exp-name",
                                    "resume", "--wandb-save-dir", str(tmp_path / "wandb")], free_port())
    log1, log2 = parse_log(first), parse_log(second)

    assert log1.modes == [(1, "msa_warmup"), (3, "msa")] and log2.modes == [(5, "msa")]
    assert "[MSA] iteration 1: attention mode msa_warmup (2 MSA layers on rank 0)" in first  # layer 0 dense
    assert sorted(log1.iterations) == [1, 2, 3, 4] and log1.saved == [4]
    assert log2.loaded == 4 and sorted(log2.iterations) == [5, 6]
    assert sorted(log1.selection_recall) == [1, 3] and sorted(log2.selection_recall) == [6]  # 1: start value
    for it, values in {**log1.iterations, **log2.iterations}.items():
        assert {"lm loss", "msa indexer kl", "msa index entropy", "msa main entropy", "load_balancing_loss"} <= set(values)
        assert values["msa indexer kl"] > 0

    tb1, tb2 = recorded(tmp_path / "run1.tb.jsonl"), recorded(tmp_path / "run2.tb.jsonl")
    assert [s for s, _ in tb1["msa/indexer_kl"]] == [1, 2, 3, 4] and [s for s, _ in tb2["msa/indexer_kl"]] == [5, 6]
    assert [v for _, v in tb1["msa/sparse"]] == [0.0, 0.0, 1.0, 1.0]
    assert {"msa/indexer_kl/layer_1", "msa/indexer_kl/layer_2"} <= set(tb1) and "msa/indexer_kl/layer_0" not in tb1
    assert [s for s, _ in tb1["msa/recall"]] == [1, 3] and [s for s, _ in tb2["msa/recall/layer_2"]] == [6]
    assert "lm loss" in tb1 and "load_balancing_loss" in tb1  # Megatron's own scalars beside ours

    wandb_runs = read_wandb_offline(str(tmp_path / "wandb"))
    assert len(wandb_runs) == 1 and [s for s, _ in wandb_runs[0]["msa/main_entropy"]] == [5, 6]
    lines, failed = summarise([log1, log2], None, None, expect_switch=3, expect_resume=4, expect_last=6)
    assert not failed, "\n".join(lines)

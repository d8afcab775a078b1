"""msa-generate on a checkpoint saved by Megatron-LM's own loop (CPU): Megatron-LM's real
``pretrain`` (scripts/pretrain_gpt_msa.py through tests/megatron_lm's CPU runner) trains a
tiny MoE + MSA GPT for 2 iterations (1 warmup) and saves a torch_dist checkpoint, args in its
common state; msa-generate rebuilds the model from those args with Megatron-LM's builder,
loads the weights (strict) and generates with 3 blocks cached (block 32, top-2: sparse).

Checks: greedy generation with the cache equals the no-cache forward token by token (fp32,
reference backend), logits within LOGIT_TOL; dense mode the same; MSA and dense differ (the
selection drops blocks); the CLI prints ids; --prompt without a tokenizer is a clear error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_harness import free_port, run_distributed

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "megatron_lm" / "cpu_pretrain_runner.py"
LOGIT_TOL = 3e-5  # as tests/decode/test_decode_megatron.py: fp32, BLAS blocking of 1 row vs s rows
PROMPT, NEW = 70, 16  # 70-86 tokens = 3 blocks of 32 at top-2: every decode step sparse

LAUNCH = (
    "--distributed-backend gloo --use-cpu-initialization --num-workers 0 "
    "--num-layers 3 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--ffn-hidden-size 128 --seq-length 128 --max-position-embeddings 128 --micro-batch-size 1 "
    "--global-batch-size 2 --train-iters 2 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine "
    "--transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-masked-softmax-fusion "
    "--no-persist-layer-norm --attention-dropout 0.0 --hidden-dropout 0.0 --position-embedding-type rope "
    "--rotary-percent 0.5 --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-token-dispatcher-type allgather "
    "--experimental-attention-variant msa --msa-block-size 32 --msa-topk 2 --msa-index-dim 16 "
    "--msa-first-dense-layers 1 --msa-warmup-iters 1 --msa-backend reference "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 500 --split 99,1,0 --eval-iters 0 "
    "--eval-interval 1000 --log-interval 1 --seed 1 --save-interval 2"
).split()


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm")
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WANDB_MODE="disabled", CUDA_DEVICE_MAX_CONNECTIONS="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", TRITON_INTERPRET="0")
    env.pop("MSA_TB_RECORD", None)
    proc = subprocess.run([sys.executable, str(RUNNER), *LAUNCH, "--save", str(out / "ckpt")], env=env, cwd=str(out),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return out / "ckpt"


def generation_cases(rank: int, ckpt: str):
    """In a spawned single-process group: load, generate cached and uncached in two modes, CLI."""
    from msa_megatron.generate import generate, load_model, main
    from msa_megatron.megatron import set_attention_mode

    model, args, info = load_model(ckpt, "checkpoint", backend="reference")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 500, (2, PROMPT), generator=g)
    res = {"info": info, "weights_finite": all(torch.isfinite(p).all().item() for p in model.parameters())}
    tokens = {}
    for mode in ("msa", "dense"):
        set_attention_mode([model], mode)
        cached = generate(model, prompt, NEW, use_cache=True, return_logits=True)
        uncached = generate(model, prompt, NEW, use_cache=False, return_logits=True)
        same = torch.equal(cached.new_tokens, uncached.new_tokens)
        res[f"{mode}_equal"] = same
        res[f"{mode}_logit_diff"] = max((a - b).abs().max().item() for a, b in zip(cached.step_logits,
                                                                                  uncached.step_logits))
        tokens[mode] = cached.new_tokens
    res["msa_differs_from_dense"] = not torch.equal(tokens["msa"], tokens["dense"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        res["prompt_text_rc"] = main([ckpt, "--prompt", "hello", "--max-new-tokens", "2"])
    res["prompt_text_err"] = err.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res["cli_rc"] = main([str(Path(ckpt) / "iter_0000002"), "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                              "--max-new-tokens", "5", "--json", "--backend", "reference"])
    res["cli"] = json.loads(out.getvalue().strip().splitlines()[-1])
    res["cli_expected"] = tokens["msa"][0, :5].tolist()
    return res


@pytest.mark.slow
def test_generate_from_megatron_lm_checkpoint(mlm_checkpoint):
    r = run_distributed(generation_cases, 1, str(mlm_checkpoint), timeout=400,
                        env={"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"})[0]
    info = r["info"]
    assert info["format"] == "megatron-lm" and info["iteration"] == 2 and info["mode"] == "msa"
    assert info["checkpoint"].endswith("iter_0000002") and info["precision"] == "fp32"
    assert r["weights_finite"]
    for mode in ("msa", "dense"):
        assert r[f"{mode}_equal"], mode
        assert r[f"{mode}_logit_diff"] <= LOGIT_TOL, (mode, r[f"{mode}_logit_diff"])
    assert r["msa_differs_from_dense"]
    assert r["prompt_text_rc"] == 2 and "pass --prompt-ids" in r["prompt_text_err"]
    assert r["cli_rc"] == 0 and r["cli"]["ids"][0] == r["cli_expected"] and r["cli"]["mode"] == "msa"


def test_checkpoint_detection(tmp_path):
    from msa_megatron.generate import megatron_lm_checkpoint

    assert megatron_lm_checkpoint(str(tmp_path)) is None  # an msa-train run or nothing: not Megatron-LM's
    (tmp_path / "iter_0000007").mkdir()
    (tmp_path / "iter_0000007" / "metadata.json").write_text("{}")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert megatron_lm_checkpoint(str(tmp_path)) == tmp_path / "iter_0000007"
    assert megatron_lm_checkpoint(str(tmp_path / "iter_0000007")) == tmp_path / "iter_0000007"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("9")
    with pytest.raises(FileNotFoundError, match="iteration 9"):
        megatron_lm_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("last")
    with pytest.raises(ValueError, match="allowed values are an iteration number or 'release'"):
        megatron_lm_checkpoint(str(tmp_path))

"""msa-generate on a tiny msa-train run (CPU): the run is trained for 3 steps (1 warmup)
at 32 tokens with top-2 blocks of 16, then generated from past its training length
(prompt 19 + 24 new tokens: 3 blocks at top-2, so decoding is sparse) through the CLI.

Checks: the cached generation equals the no-cache one token by token (greedy, fp32,
reference backend); dense mode with nucleus sampling runs from the same checkpoint;
sampling rules (unit, in-process); a bad path / mode is one clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.launcher import RunServer

REPO = Path(__file__).resolve().parents[2]
QUIET = ["logging.progress_bar=false", "logging.log_interval=1", "logging.peak_tflops=0.05", "train.eval_interval=0",
         "logging.wandb.enabled=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("msa_cache")
    run = tmp_path_factory.mktemp("gen") / "tiny"
    srv = RunServer(env={"MSA_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": ""})  # a CPU test everywhere
    try:
        r = srv.run(run, QUIET + ["train.steps=3", "attention.warmup.steps=1", "train.seq_length=32", "attention.msa.topk=2",
                                  "train.global_batch_size=2", "train.micro_batch_size=2",
                                  "attention.msa.recall_interval=0"], world=1, timeout=240)
    finally:
        srv.close()
    assert r.ok(), r.logs[-3000:]
    return run


def generate(*args: str, expect_ok: bool = True):
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "msa_megatron.generate", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    if expect_ok:
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])
    return p


@pytest.mark.slow
def test_cached_equals_uncached_and_runs_past_training_length(run_dir):
    common = ["--prompt", "def main(argv):\n    ", "--max-new-tokens", "24", "--json", "--backend", "reference"]
    cached = generate(str(run_dir), *common)
    uncached = generate(str(run_dir / "checkpoints"), *common, "--no-cache")
    assert cached["mode"] == "msa" and cached["precision"] == "fp32" and cached["byte_tokens"]
    assert cached["checkpoint"].endswith("step_00000003")
    assert len(cached["ids"][0]) == cached["new_tokens"] and cached["new_tokens"] >= 1
    assert cached["ids"] == uncached["ids"]
    assert isinstance(cached["text"][0], str)


def test_dense_mode_with_sampling(run_dir):
    out = generate(str(run_dir), "--prompt", "import ", "--max-new-tokens", "20", "--mode", "dense",
                   "--temperature", "0.9", "--top-p", "0.8", "--seed", "3", "--num-samples", "2", "--json")
    assert out["mode"] == "dense" and len(out["ids"]) == 2 and out["prompt_tokens"] == 7
    assert all(0 <= t < 320 for row in out["ids"] for t in row)


def test_sampling_rules():
    import torch

    from msa_megatron.generate import decode_bytes, sample_next

    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]  # greedy: lowest id on ties
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = torch.stack([sample_next(logits, 1.0, 1.0, g1) for _ in range(50)])
    b = torch.stack([sample_next(logits, 1.0, 1.0, g2) for _ in range(50)])
    assert torch.equal(a, b) and len(set(a[:, 0].tolist())) > 1  # seeded, and really sampling
    # top_p = 0.5: only the smallest set reaching half the mass survives (ids 1 and 2 for row 0)
    c = torch.stack([sample_next(logits, 1.0, 0.5, g1) for _ in range(100)])
    assert set(c[:, 0].tolist()) <= {1, 2} and set(c[:, 1].tolist()) == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0)
    assert decode_bytes([104, 105, 256, 104]) == "hi"


def test_clear_errors(tmp_path, capsys):
    from msa_megatron.generate import main

    assert main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run"), "--prompt", "x"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--prompt", "x", "--mode", "sparse"])
    assert exc.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err

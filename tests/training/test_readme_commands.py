"""README's msa-train command lines, run in order in one directory, each do what its comment
says (issue 18.5: they shared runs/<model>-<attention>, so the second trained nothing or
crashed). Lengths are cut to 2 steps; a GPU line on a CPU machine must be refused clearly."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from msa_megatron.training.config import validate

from .conftest import QUIET
from .test_config import cfg_of

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SHORT = QUIET + ["train.steps=2", "checkpoint.interval=0"]


def readme_commands():
    """(args, processes, comment) of each msa-train / torchrun line of README's first command block."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "msa-train" in b)
    out = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        words = shlex.split(command)
        if not words:
            continue
        if words[0] == "msa-train":
            out.append((words[1:], 1, comment.strip()))
        elif words[0] == "torchrun":
            n = int(words[words.index("--nproc-per-node") + 1])
            out.append((words[words.index("msa_megatron.train") + 1:], n, comment.strip()))
    return out


def test_readme_lines_in_order_each_start_their_own_run(server, tmp_path):
    commands = readme_commands()
    assert [c[0][:1] for c in commands[:4]] == [[], ["attention=dense"], ["model=small_moe"], ["parallel=tp2"]]
    seen = set()
    for args, world, comment in commands[:4]:
        msa = not any(a.startswith("attention=") and a != "attention=msa" for a in args)
        r = server.run(None, args + SHORT + (["attention.warmup.steps=1"] if msa else []), world=world, cwd=tmp_path)
        if "train=gpu" in args and not torch.cuda.is_available():  # "one GPU": refused here, in one line
            assert r.codes == [2] and "train.requires_gpu=True is invalid" in r.logs, r.logs[-3000:]
            continue
        assert r.ok(), (args, r.logs[-3000:])
        assert r.run_dir not in seen and sorted(r.steps()) == [1, 2], (args, r.run_dir)  # its own run, trained
        seen.add(r.run_dir)
        modes = [r.steps()[s]["attention_mode"] for s in (1, 2)]
        if args == []:  # the default job: MSA, warmup then sparse
            assert r.run_dir.name.startswith("tiny-msa-") and modes == ["msa_warmup", "msa"]
        elif args == ["attention=dense"]:  # the dense baseline, same model and data
            assert r.run_dir.name.startswith("tiny-dense-") and modes == ["dense", "dense"]
        elif "parallel=tp2" in args:  # "TP=2 + SP"
            assert "tp 2 pp 1 cp 1 ep 1 sp True" in r.logs, comment
    # the remaining lines compose and fit their process counts (their data paths are placeholders)
    for args, world, _ in commands[4:6]:
        validate(cfg_of(*args), world)

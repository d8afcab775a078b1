"""msa_megatron/schedule.py: the one MSA schedule of both loops, as one table.

Each row: the schedule's settings, then (step, consumed_tokens) -> expected plan fields.
The Megatron-LM adapter (megatron_lm/schedule.py) is checked against the same rows: it must
give the same plan for iteration = step - 1 and consumed samples = tokens / seq_length."""

from __future__ import annotations

import pytest

from msa_megatron.config import ConfigError, MSAConfig
from msa_megatron.megatron_lm.schedule import MSASchedule
from msa_megatron.schedule import Schedule, StepPlan, kl_coeff_at, plan

SEQ = 512  # tokens per sample
TPS = 4 * SEQ  # tokens per step at a constant batch of 4 samples

# (name, Schedule kwargs, [(step, consumed_tokens, mode, recall, kl, indexer_only, lr_scale), ...])
TABLE = [
    ("no msa", dict(msa=None),
     [(1, 0, "dense", False, None, False, 1.0), (7, 6 * TPS, "dense", False, None, False, 1.0)]),
    ("warmup by steps", dict(msa=MSAConfig(), warmup_steps=3),
     [(1, 0, "msa_warmup", False, 1.0, False, 1.0), (3, 2 * TPS, "msa_warmup", False, 1.0, False, 1.0),
      (4, 3 * TPS, "msa", False, 1.0, False, 1.0)]),
    ("no warmup", dict(msa=MSAConfig(), warmup_steps=0), [(1, 0, "msa", False, 1.0, False, 1.0)]),
    # 5000 tokens at 2048 per step: ceil(5000 / 2048) = 3 warmup steps
    ("warmup by tokens", dict(msa=MSAConfig(), warmup_tokens=5000),
     [(1, 0, "msa_warmup", False, 1.0, False, 1.0), (3, 2 * TPS, "msa_warmup", False, 1.0, False, 1.0),
      (4, 3 * TPS, "msa", False, 1.0, False, 1.0),
      # batch-size ramp-up: the tokens decide, not the step count
      (11, 9 * SEQ, "msa_warmup", False, 1.0, False, 1.0), (11, 10 * SEQ, "msa", False, 1.0, False, 1.0)]),
    ("warmup exactly in tokens", dict(msa=MSAConfig(), warmup_tokens=2 * TPS),
     [(2, TPS, "msa_warmup", False, 1.0, False, 1.0), (3, 2 * TPS, "msa", False, 1.0, False, 1.0)]),
    ("final mode dense", dict(msa=MSAConfig(mode="dense", recall_interval=1), warmup_steps=1),
     [(1, 0, "msa_warmup", True, 1.0, False, 1.0), (2, TPS, "dense", False, 1.0, False, 1.0)]),
    # recall: step 1 (start value) and multiples of the interval, in warmup too
    ("recall", dict(msa=MSAConfig(recall_interval=3), warmup_steps=2),
     [(1, 0, "msa_warmup", True, 1.0, False, 1.0), (2, TPS, "msa_warmup", False, 1.0, False, 1.0),
      (3, 2 * TPS, "msa", True, 1.0, False, 1.0), (4, 3 * TPS, "msa", False, 1.0, False, 1.0),
      (9, 8 * TPS, "msa", True, 1.0, False, 1.0)]),
    ("recall off", dict(msa=MSAConfig(recall_interval=0)), [(1, 0, "msa", False, 1.0, False, 1.0)]),
    ("kl coeff", dict(msa=MSAConfig(kl_coeff=0.5)), [(5, 4 * TPS, "msa", False, 0.5, False, 1.0)]),
    ("kl schedule", dict(msa=MSAConfig(), kl_schedule=[[10, 1.0], [20, 0.0]]),
     [(1, 0, "msa", False, 1.0, False, 1.0), (15, 14 * TPS, "msa", False, 0.5, False, 1.0),
      (30, 29 * TPS, "msa", False, 0.0, False, 1.0)]),
    ("indexer only by steps", dict(msa=MSAConfig(), indexer_only_steps=2, backbone_lr_scale=0.0),
     [(2, TPS, "msa", False, 1.0, True, 0.0), (3, 2 * TPS, "msa", False, 1.0, False, 1.0)]),
    ("indexer only by tokens", dict(msa=MSAConfig(), indexer_only_tokens=TPS + 1, backbone_lr_scale=0.1),
     [(2, TPS, "msa", False, 1.0, True, 0.1), (3, 2 * TPS, "msa", False, 1.0, False, 1.0)]),
]

ROWS = [(name, kwargs, row) for name, kwargs, rows in TABLE for row in rows]


@pytest.mark.parametrize("name,kwargs,row", ROWS, ids=[f"{n}-step{r[0]}" for n, _, r in ROWS])
def test_plan_table(name, kwargs, row):
    step, tokens, mode, recall, kl, indexer_only, lr_scale = row
    got = Schedule(**kwargs).plan(step, tokens)
    assert got == StepPlan(mode, recall, kl, indexer_only, lr_scale), name
    assert plan(Schedule(**kwargs), step, tokens) == got and got.mode == got.attention_mode


@pytest.mark.parametrize("name,kwargs,row", [r for r in ROWS if r[1].get("msa") is not None
                                             and set(r[1]) <= {"msa", "warmup_steps", "warmup_tokens"}
                                             and r[2][1] % SEQ == 0],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_megatron_lm_loop_uses_the_same_plan(name, kwargs, row):
    step, tokens = row[:2]
    mlm = MSASchedule(kwargs["msa"], kwargs.get("warmup_steps"), kwargs.get("warmup_tokens"), SEQ)
    assert mlm.plan(step - 1, tokens // SEQ) == Schedule(**kwargs).plan(step, tokens)


def test_plan_is_pure_so_a_resume_re_derives_it():
    s = Schedule(MSAConfig(recall_interval=10), warmup_tokens=20 * TPS, kl_schedule=[[1, 2.0], [40, 0.5]])
    fresh = [s.plan(k, (k - 1) * TPS) for k in range(1, 51)]
    resumed = Schedule(MSAConfig(recall_interval=10), warmup_tokens=20 * TPS, kl_schedule=[[1, 2.0], [40, 0.5]])
    assert [resumed.plan(k, (k - 1) * TPS) for k in range(31, 51)] == fresh[30:]
    assert fresh[19].mode == "msa_warmup" and fresh[20].mode == "msa"


def test_kl_coeff_at():
    points = [[0, 1.0], [10, 0.0]]
    assert kl_coeff_at(points, -5) == 1.0 and kl_coeff_at(points, 5) == 0.5 and kl_coeff_at(points, 99) == 0.0


def test_bad_settings_name_the_field():
    # steps win over tokens (msa-train's Config.steps_from); the Megatron-LM flags refuse both
    assert Schedule(MSAConfig(), warmup_steps=1, warmup_tokens=10 * TPS).plan(2, TPS).mode == "msa"
    with pytest.raises(ValueError, match="not both"):
        MSASchedule(MSAConfig(), warmup_iters=1, warmup_tokens=5, seq_length=SEQ)
    with pytest.raises(ConfigError, match=r"indexer_only.steps=-1 is invalid"):
        Schedule(MSAConfig(), indexer_only_steps=-1)
    with pytest.raises(ConfigError, match=r"step=0 is invalid: allowed values are an integer >= 1"):
        Schedule(MSAConfig()).plan(0)
    with pytest.raises(ConfigError, match=r"msa=\{\} is invalid"):
        Schedule({})

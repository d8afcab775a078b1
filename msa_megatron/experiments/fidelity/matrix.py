"""The fidelity matrix (issue 10): seven trainer runs with identical data, tokens, seed and
model, differing only in attention and the MSA recipe.

=================  ==========================================================================
name               what
=================  ==========================================================================
dense              (1) dense causal GQA attention (the baseline)
msa                (2) MSA, full-attention warmup then sparse (the paper's recipe)
swa                (3) sliding window, FLOP-matched to (2) by Eq. 12, in the layers MSA uses
msa_no_stopgrad    (4) as (2), index input not detached: the KL reaches the backbone
msa_no_warmup      (5) as (2), sparse from step 1
msa_no_teacher     (6) as (2), index_* frozen at init (no KL teacher): untrained selection
dense_to_msa       (7) (1)'s final checkpoint converted to MSA, continued with warmup
=================  ==========================================================================

Each run is ``python -m msa_megatron.train`` with hydra overrides (a subprocess), so what
is measured is exactly what users run. :func:`plan` gives the overrides of a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

RUN_NAMES = ("dense", "msa", "swa", "msa_no_stopgrad", "msa_no_warmup", "msa_no_teacher", "dense_to_msa")
LABELS = {
    "dense": "(1) dense", "msa": "(2) MSA (warmup + sparse)", "swa": "(3) sliding window (FLOP-matched)",
    "msa_no_stopgrad": "(4) MSA, no stop-gradient", "msa_no_warmup": "(5) MSA, no warmup",
    "msa_no_teacher": "(6) MSA, no KL teacher", "dense_to_msa": "(7) dense -> MSA conversion",
}


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset; everything else is shared by the seven runs."""

    model: str
    train: str
    steps: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int           # MSA full-attention warmup (runs 2, 4, 6)
    eval_interval: int
    eval_iters: int
    recall_interval: int        # selection recall (indexer vs dense top-k) every N steps
    assoc_recall_eval_batches: int
    assoc_recall_train_fraction: float
    assoc_recall_pairs: int     # associative recall (MQAR task): key-value pairs per sequence
    convert_steps: int          # run 7: length of the continued training
    convert_warmup_steps: int
    convert_eval_interval: int
    convert_lr: float
    recall_sweep: List[List[int]] = field(default_factory=list)  # selection recall at other (block, top-k)
    extra: List[str] = field(default_factory=list)


PRESETS: Dict[str, Preset] = {
    # Tiny model on the CPU: a smoke run of the whole pipeline (numbers mean little).
    "cpu": Preset(model="tiny", train="cpu", steps=12, seq_length=256, global_batch_size=8, micro_batch_size=4,
                  lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_interval=6, eval_iters=1, recall_interval=3,
                  assoc_recall_eval_batches=1, assoc_recall_train_fraction=0.5, assoc_recall_pairs=8, convert_steps=4,
                  convert_warmup_steps=1, convert_eval_interval=2, convert_lr=3e-4,
                  recall_sweep=[[16, 1], [16, 2], [16, 4], [16, 8], [32, 2], [32, 4]]),
    # One H100: configs/model/fidelity_gpt.yaml (~17M params), seq 4096, block 64 x top-8
    # (512 of 4096 keys; FLOP-matched window 857), 150 steps x 8 sequences = 4.9M tokens per
    # run, MSA warmup 15 steps (10%); conversion: 16 steps (10.7% of the tokens), warmup 3.
    "gpu": Preset(model="fidelity_gpt", train="gpu", steps=150, seq_length=4096, global_batch_size=8,
                  micro_batch_size=4, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=15, eval_interval=25, eval_iters=2,
                  recall_interval=25, assoc_recall_eval_batches=4, assoc_recall_train_fraction=0.5,
                  assoc_recall_pairs=32,
                  convert_steps=16, convert_warmup_steps=3, convert_eval_interval=2, convert_lr=3e-4,
                  recall_sweep=[[64, 2], [64, 4], [64, 8], [64, 16], [128, 4], [128, 8], [128, 16]]),
}


@dataclass
class RunSpec:
    name: str
    overrides: List[str]
    depends_on: Optional[str] = None


def _common(p: Preset, run_dir: str, steps: int) -> List[str]:
    return [
        f"model={p.model}", f"train={p.train}", f"run_dir={run_dir}",
        f"train.steps={steps}", f"train.seq_length={p.seq_length}",
        f"train.global_batch_size={p.global_batch_size}", f"train.micro_batch_size={p.micro_batch_size}",
        f"train.lr={p.lr}", f"train.min_lr={p.min_lr}", f"train.eval_interval={p.eval_interval}",
        f"train.eval_iters={p.eval_iters}", "train.seed=1234",
        "logging.log_interval=1", "logging.progress_bar=false", "logging.wandb.enabled=false",
        "checkpoint.interval=0", "checkpoint.keep_last=1",
        f"data.assoc_recall.train_fraction={p.assoc_recall_train_fraction}",
        f"data.assoc_recall.eval_batches={p.assoc_recall_eval_batches}",
        f"data.assoc_recall.num_pairs={p.assoc_recall_pairs}", f"data.assoc_recall.num_queries={p.assoc_recall_pairs}",
        *p.extra,
    ]


def _msa(p: Preset, warmup: int, recall_interval: Optional[int] = None) -> List[str]:
    # index_grad_clip=global: the first wave's runs clipped all parameters by one norm
    out = ["attention=msa", f"attention.warmup.steps={warmup}",
           f"attention.msa.recall_interval={recall_interval or p.recall_interval}", "attention.msa.index_grad_clip=global"]
    if p.recall_sweep:
        out.append("attention.recall_sweep=[" + ",".join(f"[{b},{k}]" for b, k in p.recall_sweep) + "]")
    return out


def plan(preset: Preset, out_dir: str, steps: Optional[int] = None,
         recall_sweep: Optional[List[List[int]]] = None) -> List[RunSpec]:
    """The seven runs (in launch order) with their trainer overrides; ``steps`` and
    ``recall_sweep`` override the preset's (quick checks)."""
    steps = steps or preset.steps
    if recall_sweep is not None:
        preset = dataclasses.replace(preset, recall_sweep=recall_sweep)
    rd = lambda name: f"{out_dir}/runs/{name}"  # noqa: E731
    c = lambda name: _common(preset, rd(name), steps)  # noqa: E731
    p = preset
    conv_steps = max(2, min(p.convert_steps, steps))
    convert = _common(p, rd("dense_to_msa"), conv_steps) + [
        f"checkpoint.init_from={rd('dense')}/checkpoints", "checkpoint.index_init=mean",
        f"train.lr={p.convert_lr}", f"train.min_lr={p.convert_lr}", "train.lr_decay_style=constant",
        "train.lr_warmup_fraction=null", "train.lr_warmup_steps=1",
        f"train.eval_interval={p.convert_eval_interval}",
    ] + _msa(p, min(p.convert_warmup_steps, conv_steps - 1), recall_interval=p.convert_eval_interval)
    return [
        RunSpec("dense", c("dense") + ["attention=dense"]),
        RunSpec("msa", c("msa") + _msa(p, p.warmup_steps)),
        RunSpec("swa", c("swa") + ["attention=swa"]),
        RunSpec("msa_no_stopgrad", c("msa_no_stopgrad") + _msa(p, p.warmup_steps)
                + ["attention.msa.index_stop_gradient=false"]),
        RunSpec("msa_no_warmup", c("msa_no_warmup") + _msa(p, 0)),
        RunSpec("msa_no_teacher", c("msa_no_teacher") + _msa(p, p.warmup_steps) + ["attention.freeze_indexer=true"]),
        RunSpec("dense_to_msa", convert, depends_on="dense"),
    ]


__all__ = ["LABELS", "PRESETS", "Preset", "RUN_NAMES", "RunSpec", "plan"]

"""Summarise and check a Megatron-LM MSA run from what it left behind: the stdout logs of its
invocations, TensorBoard event files and offline wandb runs.

    python -m msa_megatron.megatron_lm.run_summary --log run1.log --log run2.log \
        --tensorboard TB_DIR --wandb WANDB_DIR --expect-switch 21 --expect-resume 30 --expect-last 50

Prints a compact summary and one line per check; exits 1 if a check fails. Used by
scripts/gpu_run_megatron_lm.sh and the CPU pretrain test.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

Series = Dict[str, List[Tuple[int, float]]]

_ITERATION = re.compile(r"\] iteration\s+(\d+)/\s*\d+ \|(.*)$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_MODE = re.compile(r"\[MSA\] iteration (\d+): attention mode (\S+)(?: -> (\S+))?")
_SELECTION_RECALL = re.compile(r"\[MSA\] iteration\s+(\d+) \| selection recall: ([0-9.]+)")
_LOADED = re.compile(r"successfully loaded checkpoint from .* at iteration\s+(\d+)")
_SAVED = re.compile(r"successfully saved checkpoint from iteration\s+(\d+)")

#: MSA keys on Megatron's iteration line (msa_megatron.megatron_lm.hooks.CONSOLE_KEYS).
CONSOLE_KEYS = ("msa indexer kl", "msa index entropy", "msa main entropy")
#: MSA scalars every logged step carries in TensorBoard / wandb.
WRITER_KEYS = ("msa/indexer_kl", "msa/index_entropy", "msa/main_entropy", "msa/sparse")


def is_interval_mean(key: str) -> bool:
    """Whether an iteration-line value is a mean over the log interval (Megatron's
    ``total_loss_dict``: the losses, MoE and DSA losses, the MSA metrics) rather than the
    iteration's own value (learning rate, grad norm, loss scale, timings, ...)."""
    return key in CONSOLE_KEYS or key.endswith("loss")


@dataclass
class LogSummary:
    #: iteration -> its line's values; interval means with the first iteration's carry undone
    #: (see :func:`undo_first_iteration_carry`)
    iterations: Dict[int, Dict[str, float]] = field(default_factory=dict)
    modes: List[Tuple[int, str]] = field(default_factory=list)  # (iteration, mode from then on)
    selection_recall: Dict[int, float] = field(default_factory=dict)  # iteration -> selection recall
    loaded: Optional[int] = None
    saved: List[int] = field(default_factory=list)


def parse_log(text: str) -> LogSummary:
    """The facts of one invocation's stdout (Megatron-LM's iteration lines + the MSA lines)."""
    out = LogSummary()
    for line in text.splitlines():
        if m := _ITERATION.search(line):
            values = {}
            for part in m.group(2).split("|"):
                key, _, value = part.partition(":")
                if _NUMBER.match(value.strip()):
                    values[key.strip()] = float(value)
            out.iterations[int(m.group(1))] = values
        elif m := _MODE.search(line):
            out.modes.append((int(m.group(1)), m.group(3) or m.group(2)))
        elif m := _SELECTION_RECALL.search(line):
            out.selection_recall[int(m.group(1))] = float(m.group(2))
        if m := _LOADED.search(line):
            out.loaded = int(m.group(1))
        if m := _SAVED.search(line):
            out.saved.append(int(m.group(1)))
    undo_first_iteration_carry(out.iterations)
    return out


def undo_first_iteration_carry(iterations: Dict[int, Dict[str, float]]) -> Optional[int]:
    """Make the second logged iteration of an invocation its own interval's mean, in place.

    Megatron-LM prints the first iteration of every invocation (a fresh start or a resume) but
    does not reset its accumulators then (``training_log``: ``should_reset = not
    is_first_iteration``; pinned by patches/mcore_019_training_loop), so the next printed
    interval mean covers the first iteration too: with ``--log-interval 1`` a resumed run's
    second line is the mean of its first two iterations, and differs from an uninterrupted
    run's line for that iteration although the training is the same. With first iteration f
    (value v_f) and next printed iteration p (value v_p, a mean over n = p - f + 1 iterations),
    the interval f+1..p has mean (n v_p - v_f) / (n - 1). Returns p (None with < 2 lines).
    Skipped iterations (not counted by Megatron) are not modelled."""
    its = sorted(iterations)
    if len(its) < 2:
        return None
    first, nxt = its[0], its[1]
    n = nxt - first + 1
    for key, value in list(iterations[nxt].items()):
        if is_interval_mean(key) and key in iterations[first]:
            iterations[nxt][key] = (n * value - iterations[first][key]) / (n - 1)
    return nxt


def read_tensorboard(logdir: str) -> Series:
    """Every scalar of the event files under ``logdir`` (needs the tensorboard package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise ImportError(f"reading TensorBoard events needs the tensorboard package: {exc}") from exc
    series: Series = {}
    for events in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in series.items()}


def _wandb_records(path: str):
    """Records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    framing (32 KiB blocks; 7-byte record headers: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            yield buf


def read_wandb_offline(root: str) -> List[Series]:
    """History of every offline wandb run under ``root`` (one Series per run, oldest first)."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    paths = {os.path.realpath(p) for p in glob.glob(os.path.join(root, "**", "run-*.wandb"), recursive=True)}
    for path in sorted(paths):  # realpath: wandb's latest-run link points at a run already listed
        series: Series = {}
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = items.get("_step")
            for key, value in items.items():
                if isinstance(value, (int, float)) and not key.startswith("_"):
                    series.setdefault(key, []).append((step, float(value)))
        runs.append(series)
    return runs


# ----------------------------------------------------------------------------- report
def _span(steps: Sequence[int]) -> str:
    return f"{min(steps)}..{max(steps)} ({len(steps)})" if steps else "none"


def _describe(name: str, series: Series) -> List[str]:
    msa = sorted(k for k in series if k.startswith("msa/"))
    lines = [f"{name}: {len(msa)} msa/* series, e.g. " + ", ".join(msa[:6])]
    for key in ("lm loss",) + WRITER_KEYS + ("msa/recall",):
        if key in series:
            lines.append(f"  {key:18s} steps {_span([s for s, _ in series[key]])}  "
                         f"first {series[key][0][1]:.4g} last {series[key][-1][1]:.4g}")
    return lines


def summarise(logs: List[LogSummary], tensorboard: Optional[Series], wandb_runs: Optional[List[Series]],
              expect_switch: Optional[int], expect_resume: Optional[int], expect_last: Optional[int]):
    """(report lines, failed checks)."""
    lines, failed = [], []

    def check(ok: bool, what: str) -> None:
        lines.append(f"CHECK {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failed.append(what)

    for i, log in enumerate(logs, 1):
        its = sorted(log.iterations)
        loss = [log.iterations[it].get("lm loss") for it in its]
        lines.append(f"run {i}: iterations {_span(its)}, resumed from {log.loaded}, saved at {log.saved}")
        if its:
            lines.append(f"  lm loss first {loss[0]} last {loss[-1]}; modes {log.modes}")
            keys = [k for k in CONSOLE_KEYS if all(k in log.iterations[it] for it in its)]
            lines.append(f"  iteration-line MSA keys on every iteration: {keys}")
            check(all(v is not None and math.isfinite(v) for v in loss), f"run {i}: finite lm loss on every iteration")
            check(keys == list(CONSOLE_KEYS), f"run {i}: {', '.join(CONSOLE_KEYS)} on every iteration line")
        if log.selection_recall:
            lines.append("  selection recall: " + ", ".join(f"{it}:{v:.3f}" for it, v in sorted(log.selection_recall.items())))
    all_its = sorted(it for log in logs for it in log.iterations)
    check(len(all_its) == len(set(all_its)), "no iteration ran twice across invocations")
    if expect_last is not None:
        check(all_its == list(range(1, expect_last + 1)), f"iterations 1..{expect_last} ran exactly once")
    if expect_switch is not None:
        modes = [m for log in logs for m in log.modes]
        check(bool(modes) and modes[0] == (1, "msa_warmup") and (expect_switch, "msa") in modes,
              f"msa_warmup from iteration 1, msa from iteration {expect_switch}")
    if expect_resume is not None:
        check(len(logs) > 1 and logs[1].loaded == expect_resume and min(logs[1].iterations, default=None)
              == expect_resume + 1, f"second invocation resumed at iteration {expect_resume}")
        check(expect_resume in logs[0].saved, f"first invocation saved iteration {expect_resume}")
    for name, series_list in (("tensorboard", [tensorboard] if tensorboard is not None else None),
                              ("wandb", wandb_runs)):
        if series_list is None:
            continue
        merged: Series = {}
        for series in series_list:
            for key, values in series.items():
                merged.setdefault(key, []).extend(values)
        merged = {k: sorted(v) for k, v in merged.items()}
        lines.extend(_describe(f"{name} ({len(series_list)} run{'s' if len(series_list) != 1 else ''})", merged))
        for key in WRITER_KEYS:
            steps = sorted({s for s, _ in merged.get(key, [])})
            check(steps == all_its and bool(steps), f"{name}: {key} at every iteration")
        recall_steps = sorted({s for s, _ in merged.get("msa/recall", [])})  # msa/recall: selection recall
        check(recall_steps == sorted(it for log in logs for it in log.selection_recall),
              f"{name}: msa/recall (selection recall) on the iterations that printed it")
    return lines, failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", action="append", required=True, help="stdout of one invocation (in order)")
    p.add_argument("--tensorboard", help="TensorBoard log dir (event files)")
    p.add_argument("--wandb", help="directory holding offline wandb runs")
    p.add_argument("--expect-switch", type=int, help="first iteration in mode msa")
    p.add_argument("--expect-resume", type=int, help="iteration the second invocation resumed from")
    p.add_argument("--expect-last", type=int, help="last iteration of the run")
    a = p.parse_args(argv)
    logs = [parse_log(open(path, errors="replace").read()) for path in a.log]
    tb = read_tensorboard(a.tensorboard) if a.tensorboard else None
    wb = read_wandb_offline(a.wandb) if a.wandb else None
    lines, failed = summarise(logs, tb, wb, a.expect_switch, a.expect_resume, a.expect_last)
    print("\n".join(lines))
    print(f"{'FAILED: ' + str(len(failed)) + ' check(s)' if failed else 'ALL CHECKS PASSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

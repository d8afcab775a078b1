#!/usr/bin/env python
"""Multi-GPU validation of the MSA Megatron-Core backend (issue 9), over NCCL with torchrun.

Three parts, each runnable alone (``--parts``), each launched as its own torchrun job by the
driver with its own time limit, so a hang or an out-of-memory in one part cannot take the
others down, and every result is appended to ``--out`` as soon as it is measured:

* ``equiv``      CP=2, TP=2 (+SP, required by MoE) and EP=2 against TP=CP=EP=1 on a small MoE
                 GPT at 32K tokens, MSA mode ``msa`` on the Triton kernels, bf16: per-token
                 losses, logits, every gradient (after Megatron's DDP reduction) and the
                 indexer KL agree within bf16 tolerances (relative error norms).
* ``throughput`` training steps (forward + backward + distributed-optimizer step) of the small
                 MoE at 32K / 64K / 128K tokens per sequence with CP=2: MSA vs dense attention
                 (the same model switched to ``dense`` mode), tokens/s, step time, peak memory,
                 MFU. All configurations in one process (one model, one optimizer) to keep
                 torchrun start-up and kernel compilation to one.
* ``long``       one forward + backward of the small MoE at 512K, then 1M tokens with
                 CP=2, MSA on, full activation recompute, in one job: each length that completes
                 is recorded before the next is tried, so the report states the longest that
                 fits (and why the next did not: out of memory or time).

The driver (no torchrun environment)::

    python scripts/multigpu_validate.py --out OUT [--parts equiv,throughput,long] [--nproc 2]

A worker (what the driver launches; run it directly to skip the driver)::

    torchrun --standalone --nproc-per-node 2 scripts/multigpu_validate.py --worker equiv --out OUT

``--smoke`` runs the same code on CPU over gloo at tiny sizes (fp32, the reference MSA op),
so the script's logic is checked before it touches a GPU (tests/test_multigpu_validate.py).

Outputs in ``--out``: ``<part>.jsonl`` (one record per result, flushed as it is measured),
``<part>.log`` (the job's console), ``results.json`` and ``report.md`` (tables for
docs/benchmarks.md with device, date and ``MSA_COMMIT``). Exit status non-zero if any
check fails or any part does not finish.

NVLink multicast stays off in every launch (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, set unless already set).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: import this checkout's package
    sys.path.insert(0, str(REPO))

PARTS = ("equiv", "throughput", "long")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: Default wall-clock limit per part (seconds, start-up and compilation included): 7 min in all.
DEFAULT_LIMITS = {"equiv": 150, "throughput": 220, "long": 150}
BYTE_VOCAB = 257  # the embedded corpus' vocabulary (bytes + EOD), padded to 384 as the trainer does


# ============================================================================ helpers
def parse_tokens(text: str) -> int:
    from msa_megatron.flops import parse_length

    return parse_length(text)


def fmt_tokens(n: int) -> str:
    from msa_megatron.flops import format_length

    return format_length(n)


def log(msg: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Recorder:
    """Appends one JSON record per result to OUT/<part>.jsonl on rank 0 (flushed at once)."""

    def __init__(self, out: Path, part: str):
        self.path = out / f"{part}.jsonl"
        self.rank0 = int(os.environ.get("RANK", "0")) == 0

    def write(self, record: Dict[str, Any]) -> None:
        if self.rank0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
                f.flush()


def load_model_yaml(name: str) -> Dict[str, Any]:
    """configs/model/<name>.yaml with its hydra ``defaults`` (same group) merged in."""
    import yaml

    path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"--model {name!r}: {path} not found (allowed: "
                         f"{', '.join(p.stem for p in sorted(path.parent.glob('*.yaml')))})")
    values = yaml.safe_load(path.read_text()) or {}
    out: Dict[str, Any] = {}
    for base in values.pop("defaults", []) or []:
        if isinstance(base, str) and base != "_self_":
            out.update(load_model_yaml(base))
    out.update(values)
    return out


# ============================================================================ configuration
def make_cfg(a, *, seq: int, tp: int = 1, cp: int = 1, ep: int = 1, layers: Optional[int] = None,
             dense_layers: Optional[int] = None, recompute: bool = False, global_batch: int = 1, mode: str = "msa",
             precision: Optional[str] = None):
    """The trainer's typed Config for one layout, so the model, optimizer and FLOPs
    accounting are exactly the trainer's (msa_megatron.training)."""
    from msa_megatron.training.config import load_config

    model = load_model_yaml(a.model)
    if layers is not None:
        model["num_layers"] = layers
    model["msa_block_size"], model["msa_topk"] = a.block_size, a.topk
    if a.smoke:
        model["moe_token_dispatcher_type"] = "allgather"  # gloo has no all_to_all
    if recompute:
        model.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    msa = dict(block_size=a.block_size, topk=a.topk, index_dim=model["msa_index_dim"],
               first_dense_layers=model["msa_dense_layers"] if dense_layers is None else dense_layers,
               mode=mode, track_entropy=True, recall_interval=0, backend="auto")
    values = dict(
        model=model,
        attention=dict(type="msa", msa=msa),
        parallel=dict(tp=tp, cp=cp, ep=ep, sp=tp > 1),
        train=dict(steps=1, seq_length=seq, global_batch_size=global_batch, micro_batch_size=1,
                   precision=precision or ("fp32" if a.smoke else "bf16"), clip_grad=1.0),
    )
    return load_config(values)


def start_layout(tp: int = 1, cp: int = 1, ep: int = 1, seed: int = 1234, timeout_s: int = 120):
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    destroy_moe_metrics_tracker()  # it sizes its per-layer buffers by the first model's layer count
    return init_distributed(ParallelLayout(tp=tp, cp=cp, ep=ep, sequence_parallel=tp > 1), seed=seed,
                            timeout_s=timeout_s)


def build(cfg, distributed_optimizer: bool):
    """(DDP-wrapped model, its TransformerConfig): the trainer's construction; without the
    distributed optimizer main_grad holds the fully reduced gradient (for comparisons)."""
    import torch
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from msa_megatron.megatron import build_gpt_model
    from msa_megatron.training.model import build_model, make_transformer_config, padded_vocab_size

    tf = make_transformer_config(cfg)
    if distributed_optimizer:
        model = build_model(cfg, tf, BYTE_VOCAB)[0]
    else:
        m = cfg.model
        gpt = build_gpt_model(
            tf, vocab_size=padded_vocab_size(BYTE_VOCAB, cfg), max_sequence_length=cfg.train.seq_length,
            use_te=False, position_embedding_type="rope", rotary_percent=m.rotary_percent,
            rotary_base=m.rotary_base, share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights)
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            gpt.cuda(torch.cuda.current_device())  # torch norms are created on the CPU
        if tf.bf16 or tf.fp16:
            gpt = Float16Module(tf, gpt)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                                   check_for_nan_in_grad=False, average_in_collective=False)
        model = DistributedDataParallel(config=tf, ddp_config=ddp_config, module=gpt)
    tf.finalize_model_grads_func = finalize_model_grads
    return model, tf


def gpt_of(model):
    from msa_megatron.training.model import unwrap

    return unwrap(model)


def make_batch(seq: int, seed: int, device) -> Dict[str, Any]:
    """Random byte tokens (the same on every rank): throughput and equivalence do not depend
    on the text, and no dataset is needed on the device."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, BYTE_VOCAB, (1, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous().to(device), "labels": tokens[:, 1:].contiguous().to(device),
            "loss_mask": torch.ones(1, seq, device=device),
            "position_ids": torch.arange(seq, device=device).unsqueeze(0)}


def step(model, tf, full_batch, capture: bool = False, forward_only: bool = False) -> Dict[str, Any]:
    """One forward + backward through Megatron's schedule (grads reduced by
    finalize_model_grads), with the trainer's forward step and loss (msa_megatron.training.step).
    Returns the mean LM loss over the job and, with ``capture``, this rank's per-token losses
    [b, s_local] and logits [b, s_local, v_local]."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler
    from msa_megatron.training.step import forward_step, global_mean_loss, local_batch

    MSAKLAutoScaler.reset()
    model.zero_grad_buffer()
    batch = local_batch(full_batch, clone=True)  # Megatron's own CP split (what the trainer calls)
    seen: Dict[str, Any] = {}
    hook = None
    if capture:
        def keep_logits(_mod, _inp, out):
            seen["logits"] = out[0].detach().transpose(0, 1).float().clone()  # [s, b, v] -> [b, s, v]
        hook = gpt_of(model).output_layer.register_forward_hook(keep_logits)

    def keep_losses(out):
        seen["losses"] = out.detach().float().clone()

    try:
        reports = get_forward_backward_func()(
            forward_step_func=lambda _it, mdl: forward_step(batch, mdl, on_output=keep_losses if capture else None),
            data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=full_batch["tokens"].shape[1], micro_batch_size=1, forward_only=forward_only)
    finally:
        if hook is not None:
            hook.remove()
    seen["loss"] = global_mean_loss(reports, batch["tokens"].device)
    return seen


def sync() -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


def reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> Tuple[float, str]:
    """(max over ranks of the peak allocated memory since the last reset, kind)."""
    import torch
    import torch.distributed as dist

    from msa_megatron.training.metrics import memory_gb

    value, kind = memory_gb()
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), kind


# ============================================================================ part 1: equivalence
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def layout_maps(model, num_experts: Optional[int], glu: bool):
    """For every local parameter: (global name, function full tensor -> this rank's piece).
    Expert indices are renumbered by EP rank; TP shards follow Megatron's partition_dim, and
    a gated (SwiGLU) fc1 is split as [gate; up] halves, each sharded. A wrong map fails the
    logits check, since the same map loads the weights."""
    from megatron.core import parallel_state as ps

    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    out = {}
    for name, p in gpt_of(model).named_parameters():
        expert = not getattr(p, "allreduce", True)
        gname = name
        m = _EXPERT.search(name)
        if expert and m and num_experts:
            gname = name[:m.start(1)] + str(int(m.group(1)) + ep_rank * (num_experts // ep)) + name[m.end(1):]
        size, rank = ((ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()) if expert
                      else (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()))
        sharded = bool(getattr(p, "tensor_model_parallel", False)) and size > 1
        dim = getattr(p, "partition_dim", 0)

        def piece(full, sharded=sharded, size=size, rank=rank, dim=dim, gated=glu and name.endswith("linear_fc1.weight")):
            import torch

            if not sharded:
                return full
            if gated and dim == 0:
                return torch.cat([h.chunk(size, 0)[rank] for h in full.chunk(2, 0)])
            return full.chunk(size, dim)[rank]

        out[name] = (gname, piece, sharded)
    return out


def load_full(model, full: Dict[str, Any], maps) -> None:
    import torch

    with torch.no_grad():
        for name, p in gpt_of(model).named_parameters():
            gname, piece, _ = maps[name]
            t = piece(full[gname])
            if t.shape != p.shape:
                raise RuntimeError(f"weight map: {name} (global {gname}) got {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t)


def perturb_one_shard(model, full: Dict[str, Any]) -> None:
    """A shard-order bug: every TP rank loads the next rank's shard of layer 0's attention
    output projection (the sort of mistake the equivalence check exists to catch)."""
    import torch
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    p = dict(gpt_of(model).named_parameters())[name]
    with torch.no_grad():
        p.copy_(full[name].chunk(tp, p.partition_dim)[(rank + 1) % tp])


def rel_sums(a, b) -> Tuple[float, float]:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).sum()), float(b.pow(2).sum())


def all_sum(values: List[float]) -> List[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def compare(res: Dict, ref: Dict, model, maps) -> Dict[str, Any]:
    """Relative error norms ||x - x_ref|| / ||x_ref|| of this layout against the reference,
    over the whole job (each rank compares its own slice of the sequence / vocabulary /
    parameters; replicated copies weigh the same in numerator and denominator)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from msa_megatron.megatron.context_parallel import zigzag_positions

    cp, tp = ps.get_context_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    losses, logits = res["losses"], res["logits"]
    ref_losses, ref_logits = ref["losses"], ref["logits"]
    if cp > 1:
        pos = zigzag_positions(losses.shape[1], cp, ps.get_context_parallel_rank(), device=losses.device)
        ref_losses, ref_logits = ref_losses[:, pos], ref_logits[:, pos]
    if logits.shape[1] != ref_logits.shape[1]:
        raise RuntimeError(f"logits cover {logits.shape[1]} positions, reference slice {ref_logits.shape[1]}")
    if tp > 1 and logits.shape[-1] != ref_logits.shape[-1]:  # vocabulary-parallel output layer
        ref_logits = ref_logits.chunk(tp, -1)[ps.get_tensor_model_parallel_rank()]
    ln, ld = rel_sums(losses, ref_losses)
    gn, gd = rel_sums(logits, ref_logits)
    ln, ld, gn, gd = all_sum([ln, ld, gn, gd])
    per_param = {}
    for name, p in gpt_of(model).named_parameters():
        gname, piece, sharded = maps[name]
        num, den = rel_sums(p.main_grad, piece(ref["grads"][gname]))
        per_param[gname] = (num, den, sharded)
    gathered: List[Dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, per_param)
    merged: Dict[str, List[float]] = {}
    for rank_params in gathered:
        for gname, (num, den, sharded) in rank_params.items():
            acc = merged.setdefault(gname, [0.0, 0.0, 0, sharded])
            acc[0] += num
            acc[1] += den
            acc[2] += 1
    # a replicated parameter is counted once (mean over its holders), a sharded one summed
    tot_n = tot_d = 0.0
    rel = {}
    for gname, (num, den, holders, sharded) in merged.items():
        if not sharded:
            num, den = num / holders, den / holders
        tot_n += num
        tot_d += den
        rel[gname] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))
    missing = sorted(set(ref["grads"]) - set(merged))
    if missing:
        raise RuntimeError(f"{len(missing)} reference parameters have no counterpart in the layout, e.g. {missing[:3]}")
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    kl, ref_kl = res.get("kl"), ref.get("kl")
    return dict(
        loss=res["loss"], ref_loss=ref["loss"], loss_rel=abs(res["loss"] - ref["loss"]) / abs(ref["loss"]),
        token_losses_rel=math.sqrt(ln / ld), logits_rel=math.sqrt(gn / gd),
        grads_rel=math.sqrt(tot_n / tot_d), worst_params=[[n, v] for n, v in worst], n_params=len(merged),
        kl=kl, ref_kl=ref_kl,
        kl_rel=(abs(kl - ref_kl) / abs(ref_kl)) if kl is not None and ref_kl else None,
    )


#: Fixed relative-error bounds: the fp32 smoke run (x --tol-scale, 1e-3 there), and the GPU run
#: when no noise floor is measured (--no-noise-floor).
TOLERANCES = dict(loss_rel=2e-3, token_losses_rel=3e-2, logits_rel=3e-2, grads_rel=5e-2, worst_param_rel=0.15,
                  kl_rel=2e-2)
#: bf16 runs with a measured noise floor (the bf16 reference against itself in fp32): a
#: quantity passes within NOISE_FACTOR x that floor (two bf16 runs that differ only in
#: summation order each carry about the floor's error), never below NOISE_MIN. The floor
#: itself must stay below NOISE_SANE, else the bf16 reference is off and the fixed bounds apply.
NOISE_KEYS = ("loss_rel", "token_losses_rel", "logits_rel", "grads_rel", "kl_rel")
NOISE_FACTOR = 3.0
NOISE_MIN = dict(loss_rel=1e-4, token_losses_rel=1e-3, logits_rel=1e-3, grads_rel=1e-3, kl_rel=1e-3)
NOISE_SANE = dict(loss_rel=1e-2, token_losses_rel=0.1, logits_rel=0.1, grads_rel=0.2, kl_rel=0.1)


def noise_is_sane(noise: Dict[str, Any]) -> List[str]:
    return [f"noise floor {k}={noise[k]:.3g} > {NOISE_SANE[k]:.3g}" for k in NOISE_KEYS
            if noise.get(k) is not None and not noise[k] <= NOISE_SANE[k]]


def tolerances(scale: float, noise: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """The bounds a layout is judged by (see TOLERANCES / NOISE_*)."""
    t = {k: v * scale for k, v in TOLERANCES.items()}
    if noise and not noise_is_sane(noise):
        for k in NOISE_KEYS:
            if noise.get(k) is not None:
                t[k] = max(NOISE_FACTOR * noise[k], NOISE_MIN[k] * scale)
        if noise.get("worst_params"):  # one parameter may carry more than the average error
            t["worst_param_rel"] = max(t["worst_param_rel"], NOISE_FACTOR * noise["worst_params"][0][1])
    return t


def noise_floor(a, common, world, full, batch, ref, model, maps) -> Dict[str, Any]:
    """Relative errors of the bf16 reference against the same model, weights and batch in
    fp32 (same layout, same kernels): the error bf16 itself makes, which a parallel layout
    should not exceed by much. (In the fp32 smoke run the other precision is bf16, which
    exercises the same code.)"""
    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode

    other = "bf16" if a.smoke else "fp32"
    cfg32 = make_cfg(a, global_batch=world, precision=other, **common)
    model32, tf32 = build(cfg32, distributed_optimizer=False)
    load_full(model32, full, layout_maps(model32, cfg32.model.num_moe_experts, cfg32.model.swiglu))
    set_attention_mode(model32, "msa")
    collect_msa_metrics()
    ref32 = step(model32, tf32, batch, capture=True)
    ref32["kl"] = collect_msa_metrics().get("indexer_kl")
    ref32["grads"] = {maps[n][0]: p.main_grad.detach().clone() for n, p in gpt_of(model32).named_parameters()}
    del model32
    reset_memory()
    row = compare(ref, ref32, model, maps)  # the bf16 model's main_grad still holds ref's gradients
    return {"precisions": [make_cfg(a, global_batch=world, **common).train.precision, other],
            **{k: row[k] for k in ("loss", "ref_loss", *NOISE_KEYS, "worst_params")}}


def judge(row: Dict[str, Any], t: Dict[str, float]) -> List[str]:
    bad = [f"{k}={row[k]:.3g} > {t[k]:.3g}" for k in ("loss_rel", "token_losses_rel", "logits_rel", "grads_rel", "kl_rel")
           if row.get(k) is not None and not row[k] <= t[k]]
    if row["worst_params"] and not row["worst_params"][0][1] <= t["worst_param_rel"]:
        bad.append(f"worst param {row['worst_params'][0][0]} rel={row['worst_params'][0][1]:.3g} > {t['worst_param_rel']:.3g}")
    if row.get("ref_kl") is None or not (math.isfinite(row["ref_kl"]) and row["ref_kl"] > 0):
        bad.append(f"reference KL {row['ref_kl']} is not a positive finite number (MSA not exercised)")
    return bad


def run_equiv(a, rec: Recorder) -> bool:
    """Reference TP=CP=EP=1 (both ranks: the same full model, the same batch; DDP averages
    identical gradients), then each parallel layout loaded from the reference weights."""
    import torch
    import torch.distributed as dist

    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode

    seq = a.equiv_tokens
    layers = a.equiv_layers
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every layer MSA: Megatron's local DotProductAttention (the dense layer at CP=1)
    # materialises S x S scores, which does not fit at 32K
    common = dict(seq=seq, layers=layers, dense_layers=0)
    t0 = time.perf_counter()
    device = start_layout(seed=a.seed, timeout_s=a.nccl_timeout)
    cfg = make_cfg(a, global_batch=world, **common)
    model, tf = build(cfg, distributed_optimizer=False)
    with torch.no_grad():  # identical replicas, whatever the initialisation's RNG did
        for p in gpt_of(model).parameters():
            dist.broadcast(p.data, src=0)
    glu, n_exp = cfg.model.swiglu, cfg.model.num_moe_experts
    maps = layout_maps(model, n_exp, glu)
    full = {maps[n][0]: p.detach().clone() for n, p in gpt_of(model).named_parameters()}
    batch = make_batch(seq, a.seed + 1, device)
    n_msa = set_attention_mode(model, "msa")
    collect_msa_metrics()
    ref = step(model, tf, batch, capture=True)
    ref["kl"] = collect_msa_metrics().get("indexer_kl")
    ref["grads"] = {maps[n][0]: p.main_grad.detach().clone() for n, p in gpt_of(model).named_parameters()}
    log(f"equiv: reference TP=CP=EP=1 ({layers} layers, {n_msa} MSA, {seq} tokens, {cfg.train.precision}): "
        f"loss {ref['loss']:.5f}, KL {ref['kl']}, {time.perf_counter() - t0:.1f}s")
    noise = None
    ok = True
    if a.noise_floor:
        try:
            noise = noise_floor(a, common, world, full, batch, ref, model, maps)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
            # e.g. a kernel refusing fp32 inputs (raised on every rank before any collective):
            # said loudly, recorded, and the fixed bounds apply
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            rec.write(dict(part="equiv", layout="noise_floor", error=msg, rank=0))
            log(f"equiv: NOISE FLOOR NOT MEASURED ({msg}); the fixed bounds apply")
            reset_memory()
    if noise is not None:
        insane = noise_is_sane(noise)
        ok &= not insane
        rec.write(dict(part="equiv", layout="noise_floor", failures=insane, **noise))
        log(f"equiv: noise floor (reference {noise['precisions'][0]} vs {noise['precisions'][1]}, same weights): "
            + ", ".join(f"{k} {noise[k]:.2e}" for k in NOISE_KEYS if noise.get(k) is not None)
            + (f"\n    FAIL: {'; '.join(insane)} (fixed bounds used)" if insane else ""))
        if a.smoke:  # fp32 run: its errors are far below bf16's, so the fixed (scaled) bounds apply
            noise = None
    del model
    reset_memory()
    layouts = [dict(name="cp2", cp=2), dict(name="tp2_sp", tp=2), dict(name="ep2", ep=2)]
    wanted = [x.strip() for x in a.equiv_layouts.split(",") if x.strip()]
    unknown = sorted(set(wanted) - {lay["name"] for lay in layouts})
    if unknown:
        raise SystemExit(f"--equiv-layouts: unknown {unknown}; allowed: cp2, tp2_sp, ep2")
    if a.check_detection:  # the checker must catch a swapped TP shard
        layouts.append(dict(name="tp2_sp_perturbed", tp=2, perturb=True))
        wanted.append("tp2_sp_perturbed")
    for lay in layouts:
        if lay["name"] not in wanted:
            continue
        t1 = time.perf_counter()
        tp, cp, ep = lay.get("tp", 1), lay.get("cp", 1), lay.get("ep", 1)
        start_layout(tp=tp, cp=cp, ep=ep, seed=a.seed + 7, timeout_s=a.nccl_timeout)
        dp = world // (tp * cp)
        lcfg = make_cfg(a, tp=tp, cp=cp, ep=ep, global_batch=dp, **common)
        model, tf = build(lcfg, distributed_optimizer=False)
        lmaps = layout_maps(model, n_exp, glu)
        load_full(model, full, lmaps)
        if lay.get("perturb"):
            perturb_one_shard(model, full)
        set_attention_mode(model, "msa")
        collect_msa_metrics()
        res = step(model, tf, batch, capture=True)
        res["kl"] = collect_msa_metrics().get("indexer_kl")
        row = compare(res, ref, model, lmaps)
        tol = tolerances(a.tol_scale, noise)
        bad = judge(row, tol)
        row.update(part="equiv", layout=lay["name"], tp=tp, cp=cp, ep=ep, dp=dp, tokens=seq, layers=layers,
                   precision=lcfg.train.precision, status="PASS" if not bad else "FAIL", failures=bad,
                   seconds=round(time.perf_counter() - t1, 1),
                   tolerances=tol, tolerance_rule="noise floor" if noise else "fixed",
                   x_noise={k: row[k] / noise[k] for k in NOISE_KEYS
                            if noise and row.get(k) is not None and noise.get(k)})
        if lay.get("perturb"):  # expected to fail: the check is only as good as its detection
            row.update(expected_fail=True, status="DETECTED" if bad else "MISSED")
            bad = [] if bad else ["swapped TP shards of one weight passed every tolerance"]
        rec.write(row)
        ok &= not bad
        log(f"equiv {lay['name']:7s} {row['status']}: loss {row['loss']:.5f} (ref {row['ref_loss']:.5f}), "
            f"rel errors: token losses {row['token_losses_rel']:.2e}, logits {row['logits_rel']:.2e}, "
            f"grads {row['grads_rel']:.2e}, worst {row['worst_params'][0][0]} {row['worst_params'][0][1]:.2e}, "
            f"KL {row['kl_rel'] if row['kl_rel'] is None else format(row['kl_rel'], '.2e')}; {row['seconds']}s"
            + (f"\n    FAIL: {'; '.join(bad)}" if bad else ""))
        del model
        reset_memory()
    return ok


# ============================================================================ part 2: throughput
def run_throughput(a, rec: Recorder) -> bool:
    """One model (built for the longest sequence), one distributed optimizer; per length,
    MSA then dense mode: ``--warmup-steps`` untimed steps (compilation), then
    ``--timed-steps`` timed ones. MFU uses the trainer's model-FLOPs formula."""
    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode
    from msa_megatron.training.metrics import measure_cpu_gemm_flops, peak_flops_per_device, step_flops
    from msa_megatron.training.model import count_parameters
    from msa_megatron.training.optim import build_optimizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = a.cp
    lengths = [parse_tokens(x) for x in a.lengths.split(",")]
    device = start_layout(cp=cp, seed=a.seed, timeout_s=a.nccl_timeout)
    dp = world // cp
    cfg = make_cfg(a, seq=max(lengths), cp=cp, global_batch=dp, recompute=a.throughput_recompute)
    model, tf = build(cfg, distributed_optimizer=True)
    optimizer = build_optimizer(cfg, [model])
    tf.grad_scale_func = optimizer.scale_loss
    counts = count_parameters(cfg, [model])
    peak, peak_src = peak_flops_per_device(cfg)
    import torch

    if not math.isfinite(peak) and not torch.cuda.is_available():  # the CPU smoke: MFU against this process's measured GEMM rate
        peak, peak_src = measure_cpu_gemm_flops(), "measured fp32 GEMM of this CPU process"
    log(f"throughput: {cfg.model.name} {cfg.model.num_layers} layers, {counts.total / 1e6:.1f}M params, "
        f"{counts.active_matmul / 1e6:.1f}M active (matmul); CP={cp} DP={dp}; MSA block {a.block_size} top-{a.topk}; "
        f"recompute {'full' if a.throughput_recompute else 'none'}; peak {peak / 1e12:.1f} TFLOP/s ({peak_src})")
    ok = True
    for seq in lengths:
        scfg = make_cfg(a, seq=seq, cp=cp, global_batch=dp, recompute=a.throughput_recompute)
        if hasattr(tf, "validate_sequence_length"):  # the CP split rule, before any batch is cut
            tf.validate_sequence_length(seq)
        batches = [make_batch(seq, a.seed + 10 + i, device) for i in range(2)]
        for mode in a.modes.split(","):
            set_attention_mode(model, mode)
            reset_memory()
            t_start = time.perf_counter()
            times, losses = [], []
            for i in range(a.warmup_steps + a.timed_steps):
                sync()
                t = time.perf_counter()
                optimizer.zero_grad()
                out = step(model, tf, batches[i % 2])
                _, grad_norm, _ = optimizer.step()
                sync()
                if i >= a.warmup_steps:
                    times.append(time.perf_counter() - t)
                losses.append(out["loss"])
            collect_msa_metrics()
            mem, mem_kind = peak_memory_gb()
            st = statistics.median(times)  # one slow step (a late compile) must not skew it
            flops = step_flops(scfg, counts.active_matmul, mode)
            row = dict(part="throughput", tokens=seq, mode=mode, cp=cp, dp=dp, world=world,
                       step_time_s=st, step_time_min_s=min(times), tokens_per_s=seq * dp / st,
                       tflops_per_device=flops / st / world / 1e12, mfu=flops / st / (world * peak),
                       peak_mem_gb=mem, mem_kind=mem_kind, loss_first=losses[0], loss_last=losses[-1],
                       finite=all(math.isfinite(x) for x in losses), grad_norm=float(grad_norm or float("nan")),
                       model_flops_per_step=flops, active_params=counts.active_matmul, total_params=counts.total,
                       block_size=a.block_size, topk=a.topk, recompute="full" if a.throughput_recompute else "none",
                       warmup_steps=a.warmup_steps, timed_steps=a.timed_steps,
                       wall_s=round(time.perf_counter() - t_start, 1))
            ok &= row["finite"]
            rec.write(row)
            log(f"throughput {fmt_tokens(seq):>5s} {mode:5s}: step {st * 1e3:8.1f} ms, {row['tokens_per_s']:10.0f} tok/s, "
                f"{row['tflops_per_device']:6.1f} TFLOP/s/dev, MFU {row['mfu'] * 100:5.1f}%, peak {mem:5.1f} GB "
                f"({mem_kind}), loss {losses[0]:.3f}->{losses[-1]:.3f}; {row['wall_s']}s")
    return ok


# ============================================================================ part 3: long sequence
def run_long(a, rec: Recorder) -> bool:
    """Forward + backward (no optimizer step) of the small MoE with CP, MSA mode ``msa``,
    full activation recompute (one layer per checkpoint), at each ``--long-tokens`` length
    in ascending order in one job: every length that completes is recorded before a longer
    one is tried, so an out-of-memory at 1M still leaves 512K and 256K (the failing length
    is recorded by the worker, which then exits)."""
    import torch

    from msa_megatron.megatron import collect_msa_metrics, set_attention_mode

    world = int(os.environ.get("WORLD_SIZE", "1"))
    lengths = sorted(parse_tokens(x) for x in a.long_tokens.split(",") if x.strip())
    cp = a.cp
    t0 = time.perf_counter()
    device = start_layout(cp=cp, seed=a.seed, timeout_s=a.nccl_timeout)
    dp = world // cp
    RUNNING["tokens"] = fmt_tokens(lengths[-1])  # the model is checked against the longest first
    cfg = make_cfg(a, seq=lengths[-1], cp=cp, global_batch=dp, recompute=True, dense_layers=a.long_dense_layers)
    model, tf = build(cfg, distributed_optimizer=False)
    for seq in lengths:  # every length's CP split, before any runs
        RUNNING["tokens"] = fmt_tokens(seq)
        if hasattr(tf, "validate_sequence_length"):
            tf.validate_sequence_length(seq)
    set_attention_mode(model, "msa")
    log(f"long: {', '.join(map(fmt_tokens, lengths))} tokens, CP={cp}, {cfg.model.num_layers} layers "
        f"({cfg.msa.first_dense_layers} dense attention), MSA block {a.block_size} top-{a.topk}, full recompute; "
        f"set-up {time.perf_counter() - t0:.1f}s")
    ok = True
    for seq in lengths:
        t1 = time.perf_counter()
        RUNNING["tokens"] = fmt_tokens(seq)
        batch = make_batch(seq, a.seed + 3, device)
        reset_memory()
        times = []
        for _ in range(a.long_steps):
            sync()
            t = time.perf_counter()
            out = step(model, tf, batch)
            sync()
            times.append(time.perf_counter() - t)
        metrics = collect_msa_metrics()
        mem, mem_kind = peak_memory_gb()
        grad_sq = sum(float(p.main_grad.float().pow(2).sum()) for p in gpt_of(model).parameters())
        finite = math.isfinite(out["loss"]) and math.isfinite(grad_sq) and grad_sq > 0
        row = dict(part="long", tokens=seq, cp=cp, dp=dp, mode="msa", recompute="full", block_size=a.block_size,
                   topk=a.topk, dense_attention_layers=cfg.msa.first_dense_layers, fwd_bwd_s=times[-1],
                   fwd_bwd_first_s=times[0], tokens_per_s=seq * dp / times[-1], peak_mem_gb=mem, mem_kind=mem_kind,
                   loss=out["loss"], kl=metrics.get("indexer_kl"), grad_sq_local=grad_sq, finite=finite,
                   status="OK" if finite else "NON-FINITE",
                   total_gb=(torch.cuda.get_device_properties(0).total_memory / 1e9) if torch.cuda.is_available() else None,
                   wall_s=round(time.perf_counter() - t1, 1))
        rec.write(row)
        ok &= finite
        log(f"long {fmt_tokens(seq)} {row['status']}: fwd+bwd {times[-1]:.2f}s (first {times[0]:.2f}s), "
            f"{row['tokens_per_s']:.0f} tok/s, peak {mem:.1f} GB ({mem_kind}), loss {out['loss']:.4f}, KL {row['kl']}; "
            f"{row['wall_s']}s")
        del batch, out
    RUNNING.pop("tokens", None)
    return ok


#: What the worker is doing, for its error record (the long part's current length).
RUNNING: Dict[str, Any] = {}


# ============================================================================ worker
def worker(a) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU/gloo check of this script")
    from msa_megatron.megatron.parallel import shutdown_distributed

    ok = True
    part = "-"
    try:
        for part in a.worker.split(","):
            t0 = time.perf_counter()
            log(f"=== part {part} (world {os.environ.get('WORLD_SIZE', '1')}, "
                f"{'CPU/gloo smoke' if a.smoke else torch.cuda.get_device_name()})")
            part_ok = {"equiv": run_equiv, "throughput": run_throughput, "long": run_long}[part](a, Recorder(out, part))
            log(f"=== part {part} {'OK' if part_ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
            ok &= part_ok
    except BaseException as exc:  # noqa: BLE001
        # Leave at once: the other ranks may sit in a collective this rank will never join;
        # torchrun stops them when this process exits, instead of after the NCCL timeout.
        import traceback

        traceback.print_exc()
        rank = int(os.environ.get("RANK", "0"))
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if part in PARTS:
            with open(out / f"{part}.jsonl", "a") as f:
                f.write(json.dumps({"part": part, "error": msg, "rank": rank, "tokens": RUNNING.get("tokens")}) + "\n")
        print(f"rank {rank}: part {part} failed: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    shutdown_distributed()
    return 0 if ok else 1


# ============================================================================ driver and report
def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: skip it, say so
            rows.append({"corrupt_line": line[:200]})
    return rows


def device_description() -> str:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        gpus = [x.strip() for x in q.stdout.splitlines() if x.strip()]
        if gpus:
            return f"{len(gpus)} x {gpus[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return "CPU (gloo smoke)"


def write_report(out: Path, meta: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    rows = {p: read_jsonl(out / f"{p}.jsonl") for p in PARTS}
    results = dict(meta=meta, **rows)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    lines = [f"Device: {meta['device']}; date {meta['date']}; commit {meta['commit']}; "
             f"torch {meta.get('torch')}; {meta['nproc']} processes (torchrun, {meta.get('backend', 'NCCL')}); "
             "NVLS/multicast off.", ""]
    checks = [r for r in rows["equiv"] if "status" in r]
    noise = next((r for r in rows["equiv"] if r.get("layout") == "noise_floor" and "precisions" in r), None)
    if checks:
        r0 = checks[0]
        lines += [f"**Equivalence** ({r0.get('layers')} layers of {meta['model']}, all MSA, {fmt_tokens(r0.get('tokens', 0))} "
                  f"tokens, {r0.get('precision')}, MSA block {meta['block_size']} top-{meta['topk']}, mode msa; "
                  "relative error norms against TP=CP=EP=1):", "",
                  "| layout | loss | ref loss | token losses | logits | all grads | worst param | KL | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            w = r["worst_params"][0] if r.get("worst_params") else ["-", float("nan")]
            kl = "-" if r.get("kl_rel") is None else f"{r['kl_rel']:.1e}"
            lines.append(f"| {r['layout']} | {r['loss']:.5f} | {r['ref_loss']:.5f} | {r['token_losses_rel']:.1e} | "
                         f"{r['logits_rel']:.1e} | {r['grads_rel']:.1e} | {w[1]:.1e} (`{w[0]}`) | {kl} | {r['status']} |")
        t = r0.get("tolerances", {})
        if noise:
            lines += ["", f"Noise floor ({noise['precisions'][0]} reference vs {noise['precisions'][1]}, same weights "
                      "and batch): " + ", ".join(f"{k} {noise[k]:.1e}" for k in NOISE_KEYS if noise.get(k) is not None)]
        rule = r0.get("tolerance_rule", "fixed")
        lines += ["", "Tolerances" + (f" (max({NOISE_FACTOR:g} x noise floor, a minimum))" if rule == "noise floor"
                                      else " (fixed bounds)") + ": "
                  + ", ".join(f"{k} {v:.1e}" for k, v in t.items()), ""]
    if rows["throughput"]:
        r0 = rows["throughput"][0]
        lines += [f"**Training throughput** ({meta['model']}, {r0.get('total_params', 0) / 1e6:.0f}M params, "
                  f"{r0.get('active_params', 0) / 1e6:.0f}M active; CP={r0.get('cp')}, 1 sequence per step; bf16; "
                  f"MSA block {r0.get('block_size')} top-{r0.get('topk')}; recompute {r0.get('recompute')}; "
                  f"median of {r0.get('timed_steps')} steps after {r0.get('warmup_steps')} warm-up; "
                  "step = forward + backward + distributed Adam):", "",
                  "| tokens/seq | attention | step time (s) | tokens/s | TFLOP/s/GPU | MFU | peak mem (GB) | MSA speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r.get("tokens"), r.get("mode")): r for r in rows["throughput"] if "mode" in r}
        for r in rows["throughput"]:
            if "mode" not in r:
                continue
            dense = by.get((r["tokens"], "dense"))
            speed = f"{dense['step_time_s'] / r['step_time_s']:.2f}x" if r["mode"] == "msa" and dense else ""
            lines.append(f"| {fmt_tokens(r['tokens'])} | {r['mode']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['tflops_per_device']:.1f} | {r['mfu'] * 100:.1f}% | {r['peak_mem_gb']:.1f} | {speed} |")
        lines += ["", "MFU = tokens x (6 N_active + 3 sum_layers F_attn) / step time / (GPUs x 989.4 TFLOP/s), the "
                  "trainer's formula (docs/training.md); F_attn from msa_megatron/flops.py (MSA: sparse count). "
                  "Recomputation is not counted.", ""]
    longs = [r for r in rows["long"] if "status" in r]
    long_errors = [r for r in rows["long"] if "error" in r]
    if longs or long_errors or meta.get("long_stopped"):
        dense_layers = longs[0].get("dense_attention_layers") if longs else None
        lines += [f"**Long sequence** ({meta['model']}, CP={meta['cp']}, MSA block {meta['block_size']} "
                  f"top-{meta['topk']}" + (f", first {dense_layers} layer(s) dense attention" if dense_layers else "")
                  + ", full recompute, one forward + backward; lengths tried in ascending order):", ""]
        for r in longs:
            lines.append(f"- {fmt_tokens(r['tokens'])} tokens: {r['status']}, fwd+bwd {r['fwd_bwd_s']:.2f} s "
                         f"({r['tokens_per_s']:.0f} tokens/s), peak {r['peak_mem_gb']:.1f} GB"
                         + (f" of {r['total_gb']:.0f} GB per GPU" if r.get("total_gb") else "")
                         + f", loss {r['loss']:.4f}")
        for r in {(r.get("tokens"), r["error"]): r for r in long_errors}.values():
            lines.append(f"- {r.get('tokens') or '?'} tokens: did not complete ({r['error']})")
        if meta.get("long_stopped") and not long_errors:
            lines.append(f"- the next length did not complete ({meta['long_stopped']})")
        lines.append("")
    errors = [r for p in PARTS for r in rows[p] if "error" in r]
    if errors:
        grouped: Dict[Tuple, List[int]] = {}
        for r in errors:
            grouped.setdefault((r["part"], r.get("tokens"), r["error"]), []).append(r["rank"])
        lines += ["Errors: " + "; ".join(f"{p}" + (f" {t}" if t else "") + f" (ranks {', '.join(map(str, sorted(rk)))}): {e}"
                                         for (p, t, e), rk in grouped.items()), ""]
    parts = meta.get("parts", {})
    if parts:
        lines += ["Parts: " + ", ".join(f"{p} {s['status']} ({s['seconds']:.0f} s)" for p, s in parts.items()), ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text, results


def launch(a, part: str, extra: List[str], limit: float, out: Path) -> Tuple[str, float]:
    """One torchrun job for ``part``; its console goes to stdout and OUT/<part>.log. Killed
    (whole process group) at ``limit`` seconds."""
    env = dict(os.environ)
    for k, v in NO_MULTICAST.items():
        env.setdefault(k, v)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if a.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
           str(Path(__file__).resolve()), "--worker", part] + extra
    print(f"+ {' '.join(cmd)}  (limit {limit:.0f}s)", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{part.replace(',', '+')}.log", "a") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        import threading

        def pump():
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                sys.stdout.flush()
                logf.write(line)
                logf.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {limit:.0f}s"
        th.join(timeout=5)
    return status, time.perf_counter() - t0


def driver(a, passthrough: List[str]) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; allowed: {', '.join(PARTS)}")
    limits = dict(DEFAULT_LIMITS)
    for item in a.time_limit or []:
        k, _, v = item.partition("=")
        if k not in PARTS or not v:
            raise SystemExit(f"--time-limit {item!r}: use PART=SECONDS with PART in {', '.join(PARTS)}")
        limits[k] = float(v)
    import torch

    meta = dict(device=device_description() if not a.smoke else "CPU (gloo smoke)",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=os.environ.get("MSA_COMMIT", "unknown (set MSA_COMMIT)"), torch=torch.__version__,
                nproc=a.nproc, backend="gloo, CPU" if a.smoke else "NCCL", model=a.model, block_size=a.block_size,
                topk=a.topk, cp=a.cp, parts={},
                env={k: os.environ.get(k, v) for k, v in NO_MULTICAST.items()})
    t_all = time.perf_counter()
    if a.single_job:
        limit = sum(limits[p] for p in parts)
        status, secs = launch(a, ",".join(parts), passthrough, limit, out)
        meta["parts"][",".join(parts)] = {"status": status, "seconds": secs}
        parts = []
    for part in parts:
        status, secs = launch(a, part, passthrough, limits[part], out)
        if part == "long" and status != "ok":
            # the lengths run in ascending order: the longest that completed is the answer,
            # the one that did not (out of memory, time) is stated in the report
            done = [r["tokens"] for r in read_jsonl(out / "long.jsonl") if r.get("status") == "OK"]
            if done:
                meta["long_stopped"] = status
                status = f"ok (up to {fmt_tokens(max(done))}; then {status})"
        meta["parts"][part] = {"status": status, "seconds": secs}
        write_report(out, meta)
    meta["total_seconds"] = time.perf_counter() - t_all
    text, _ = write_report(out, meta)
    print("\n" + text, flush=True)
    print(f"results: {out / 'results.json'}, table: {out / 'report.md'}; total {meta['total_seconds']:.0f}s", flush=True)
    failed = [p for p, s in meta["parts"].items() if not s["status"].startswith("ok")]
    fails = [r for r in read_jsonl(out / "equiv.jsonl") if r.get("status") in ("FAIL", "MISSED")]
    if failed or fails:
        print(f"MULTI-GPU VALIDATION FAILED: parts {failed or '-'}; equivalence failures "
              f"{[r['layout'] for r in fails] or '-'}", flush=True)
        return 1
    print("MULTI-GPU VALIDATION OK", flush=True)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="output directory (results appended as they come)")
    p.add_argument("--parts", default=",".join(PARTS), help="driver: parts to run, in order")
    p.add_argument("--worker", default=None, help="(under torchrun) run these parts in this process")
    p.add_argument("--nproc", type=int, default=2, help="driver: processes (GPUs) per job")
    p.add_argument("--time-limit", action="append", metavar="PART=SECONDS",
                   help=f"driver: wall-clock limit of a part (defaults {DEFAULT_LIMITS})")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny sizes, fp32, reference op")
    p.add_argument("--model", default=None, help="configs/model/<name>.yaml (default small_moe; smoke tiny_moe)")
    p.add_argument("--block-size", type=int, default=None, help="MSA block (default 128; smoke 16)")
    p.add_argument("--topk", type=int, default=None, help="MSA top-k blocks (default 16; smoke 4)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--nccl-timeout", type=int, default=120, help="process-group timeout (s)")
    p.add_argument("--equiv-tokens", type=parse_tokens, default=None, help="equivalence length (default 32K)")
    p.add_argument("--equiv-layers", type=int, default=None, help="equivalence layers (default 4; smoke 3)")
    p.add_argument("--equiv-layouts", default="cp2,tp2_sp,ep2")
    p.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                   help="skip the fp32 run of the reference that sets the bf16 noise floor of the tolerances")
    p.add_argument("--check-detection", action="store_true",
                   help="also run a TP=2 layout whose ranks load swapped shards of one weight (a shard-order bug), "
                        "which must be reported (DETECTED)")
    p.add_argument("--single-job", action="store_true",
                   help="driver: all parts in one torchrun job (less start-up, no isolation)")
    p.add_argument("--tol-scale", type=float, default=None, help="multiplies the tolerances (default 1; smoke 1e-3)")
    p.add_argument("--cp", type=int, default=2, help="CP size of the throughput and long parts")
    p.add_argument("--lengths", default=None, help="throughput lengths (default 32K,64K,128K)")
    p.add_argument("--modes", default="msa,dense", help="throughput attention modes")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--throughput-recompute", action="store_true", help="full activation recompute in throughput")
    p.add_argument("--long-tokens", default=None, help="long-part lengths, run in ascending order (default 512K,1M)")
    p.add_argument("--long-dense-layers", type=int, default=None,
                   help="leading dense-attention layers in the long part (default: the model's, 1 for small_moe)")
    p.add_argument("--long-steps", type=int, default=1, help="forward+backward steps in the long part")
    a, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unknown arguments {rest}")
    smoke = a.smoke
    defaults = dict(model="tiny_moe" if smoke else "small_moe", block_size=16 if smoke else 128, topk=4 if smoke else 16,
                    equiv_tokens=256 if smoke else 32768, equiv_layers=3 if smoke else 4,
                    tol_scale=1e-3 if smoke else 1.0, lengths="128,256" if smoke else "32K,64K,128K",
                    long_tokens="256,512" if smoke else "512K,1M")
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def passthrough_args(argv: List[str]) -> List[str]:
    """The command line minus the driver-only options (the worker gets the rest)."""
    out, skip = [], False
    driver_only = {"--parts", "--nproc", "--time-limit", "--single-job"}
    for x in argv:
        if skip:
            skip = False
            continue
        name = x.split("=", 1)[0]
        if name in driver_only:
            skip = "=" not in x and name != "--single-job"
            continue
        out.append(x)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    return driver(a, passthrough_args(argv))


if __name__ == "__main__":
    sys.exit(main())

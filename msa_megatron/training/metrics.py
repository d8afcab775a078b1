"""Throughput accounting: model FLOPs per step, MFU, memory.

FLOPs per training step (documented in docs/training.md)::

    tokens_per_step x (6 x N_active + 3 x sum over layers of F_attn(layer, mode))

* ``6 N_active``: forward + backward matmuls of every parameter a token passes through
  (MoE: routed experts weighted by top-k / experts; the embedding lookup excluded, the
  output layer included).
* ``F_attn``: attention score/value FLOPs per token of one layer's forward, from
  :mod:`msa_megatron.flops` (the paper's Eq. 12): dense ``2 n_h d_h N``; MSA in ``msa``
  mode ``n_I d_I N + 4 n_h d_h k B``; in ``msa_warmup`` the dense main branch plus the index
  scores over every causal key. Training counts 3x the forward (forward + 2x backward).

MFU = achieved FLOP/s per device / peak. Peak: logging.peak_tflops, else a table of known
GPUs (dense BF16/FP16 tensor-core peak; TF32 for fp32), else (CPU) a GEMM measured on this
process at start-up, so CPU "MFU" is relative to an achievable rate, not a datasheet.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import torch

from ..flops import AttentionShape, dense_flops_per_token, index_flops_per_token, msa_flops_per_token
from .config import Config

#: Dense tensor-core peak TFLOP/s by device-name fragment: (bf16/fp16, tf32).
GPU_PEAK_TFLOPS = (
    ("H200", (989.4, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),
    ("H800", (989.4, 494.7)),
    ("GH200", (989.4, 494.7)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
)


def attention_flops_per_token(cfg: Config, mode: str) -> float:
    """Forward attention FLOPs per token, summed over the layers, in attention ``mode``."""
    m, n = cfg.model, cfg.train.seq_length
    msa = cfg.msa
    shape = AttentionShape(m.num_attention_heads, m.kv_channels, m.num_query_groups,
                           msa.index_dim if msa else 0, msa.block_size if msa else 1, msa.topk if msa else 1)
    if cfg.attention.type == "swa":  # the window's FLOPs in its layers (Eq. 12 accounting)
        from ..flops import sliding_window_flops_per_token

        window, swa = cfg.swa_window(), set(cfg.swa_layers())
        return sum(sliding_window_flops_per_token(shape, window, n) if i in swa else dense_flops_per_token(shape, n)
                   for i in range(m.num_layers))
    total = 0.0
    for layer in range(m.num_layers):
        if msa is None or not msa.is_msa_layer(layer) or mode == "dense":
            total += dense_flops_per_token(shape, n)
        elif mode == "msa_warmup":
            total += dense_flops_per_token(shape, n) + index_flops_per_token(shape, n)
        else:
            total += msa_flops_per_token(shape, n)
    return total


def step_flops(cfg: Config, active_params: int, mode: str) -> float:
    return cfg.tokens_per_step() * (6.0 * active_params + 3.0 * attention_flops_per_token(cfg, mode))


def peak_flops_per_device(cfg: Config) -> Tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12, "logging.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for frag, (half, tf32) in GPU_PEAK_TFLOPS:
            if frag in name:
                peak = tf32 if cfg.train.precision == "fp32" else half
                return peak * 1e12, f"{name} datasheet ({'tf32' if cfg.train.precision == 'fp32' else 'bf16/fp16'})"
        return float("nan"), f"unknown GPU {name!r}: set logging.peak_tflops"
    return float("nan"), "no MFU on CPU: set logging.peak_tflops to report one"


def measure_cpu_gemm_flops(sizes=(256, 512), seconds: float = 0.4) -> float:
    """Best fp32 GEMM rate of this process (its thread budget) over ~``seconds``; the best
    of several sizes and repeats, since a shared CPU's single measurements are noisy."""
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        torch.mm(a, b)
        deadline = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * size ** 3 / max(time.perf_counter() - t0, 1e-9))
    return best


def memory_gb() -> Tuple[float, str]:
    """(GB, what): GPU max allocated since the last call, else this process's RSS."""
    if torch.cuda.is_available():
        value = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
        return value, "gpu_max_allocated"
    import psutil

    return psutil.Process().memory_info().rss / 1e9, "cpu_rss"


class Throughput:
    """Tokens/s and MFU over a logging interval."""

    def __init__(self, cfg: Config, active_params: int, world_size: int, peak: float):
        self.cfg, self.active, self.world, self.peak = cfg, active_params, world_size, peak
        self._flops: Dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.flops = 0.0

    def add(self, seconds: float, mode: str) -> None:
        if mode not in self._flops:
            self._flops[mode] = step_flops(self.cfg, self.active, mode)
        self.steps += 1
        self.seconds += seconds
        self.flops += self._flops[mode]

    def scalars(self) -> Dict[str, float]:
        if self.steps == 0 or self.seconds <= 0:
            return {}
        tokens = self.steps * self.cfg.tokens_per_step()
        achieved = self.flops / self.seconds
        out = {"tokens_per_s": tokens / self.seconds, "step_time_s": self.seconds / self.steps,
               "tflops_per_device": achieved / self.world / 1e12}
        if self.peak == self.peak and self.peak > 0:  # no peak (CPU, unknown GPU): no MFU at all
            out["mfu"] = achieved / (self.peak * self.world)
        return out


# --------------------------------------------------------------------------- names
#: metrics.jsonl key -> the name in wandb / TensorBoard: Megatron-LM's own names for what it
#: logs too, MSA statistics under ``msa/`` (as msa_megatron/megatron_lm/hooks.py writes them),
#: so msa-train runs and Megatron-LM runs overlay in one wandb project or TensorBoard.
PUBLIC_NAMES = {
    "lm_loss": "lm loss",
    "val_lm_loss": "lm loss validation",
    "val_ppl": "lm loss validation ppl",
    "lr": "learning-rate",
    "lr_backbone": "learning-rate backbone",
    "grad_norm": "grad-norm",
    "index_grad_norm": "msa/index_grad_norm",  # msa.index_grad_clip=separate: grad-norm is then the backbone's
    "tflops_per_device": "throughput",  # Megatron-LM: TFLOP/s per GPU
    "step_time_s": "iteration-time",
    "tokens_per_s": "tokens-per-second",
    "consumed_samples": "consumed-samples",
    "tokens": "consumed-tokens",
    "skipped_steps": "skipped-iterations",
    "mem_gb": "mem-max-gigabytes",
    "mfu": "mfu",
    "moe_aux_loss": "load_balancing_loss",
    "kl_coeff": "msa/kl_coeff",
    "indexer_only": "msa/indexer_only",
    "val_assoc_recall_acc": "msa/val/assoc_recall_acc",
    "val_passkey_acc": "msa/val/passkey_acc",
    "val_passkey_needle": "msa/val/passkey_needle",  # its /d.., /layer_<i>[/d..], /any[/d..] keys, as val_passkey_acc's: unrenamed
}
#: MSA statistics (and their /layer_i variants), written as msa/<name>.
MSA_STATS = ("indexer_kl", "index_entropy", "main_entropy", "recall")


def public_scalars(scalars: Dict[str, object]) -> Dict[str, float]:
    """The numeric scalars of one step under their public names (strings dropped; the
    attention mode becomes ``msa/sparse``: 1 sparse, 0 otherwise, as in Megatron-LM)."""
    out: Dict[str, float] = {}
    for key, value in scalars.items():
        if key == "attention_mode":
            out["msa/sparse"] = 1.0 if value == "msa" else 0.0
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            continue
        if key in PUBLIC_NAMES:
            name = PUBLIC_NAMES[key]
        elif key.split("/")[0] in MSA_STATS or key.startswith("recall_sweep/"):
            name = "msa/" + key
        elif key.startswith("val/") and key.split("/")[1] in MSA_STATS:
            name = "msa/val/" + key[4:]
        else:
            name = key
        out[name] = float(value)
    return out


__all__ = ["MSA_STATS", "PUBLIC_NAMES", "public_scalars", "Throughput", "attention_flops_per_token", "measure_cpu_gemm_flops", "memory_gb",
           "peak_flops_per_device", "step_flops"]

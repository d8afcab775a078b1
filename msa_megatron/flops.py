"""Attention FLOPs per token: dense GQA vs MSA (the paper's Eq. 12, reconstructed).

Per token per layer, averaged over a causal sequence of N tokens, 2 FLOPs per MAC,
counting QK and PV:

    F_dense = 2 n_h d_h N                     (each token sees N/2 keys on average)
    F_MSA   = n_I d_I N + 4 n_h d_h k B       (index scores over N/2 keys + main over k*B)

Layers and hidden size cancel in the ratio. With the paper's 109B-MoE heads
(n_h=64, d_h=128, n_I=4, d_I=128, k=16, B=128) the ratio is 32 N / (N + 131072):
~1x at 4K, 10.7x at 64K, 28.4x at 1M (2^20), tending to 32x.

Run ``msa-flops`` for the table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from .config import MSAConfig


@dataclass(frozen=True)
class AttentionShape:
    """The head layout that attention FLOPs depend on."""

    num_heads: int = 64
    head_dim: int = 128
    num_index_heads: int = 4
    index_dim: int = 128
    block_size: int = 128
    topk: int = 16

    @classmethod
    def from_msa(cls, num_heads: int, head_dim: int, num_kv_heads: int, cfg: MSAConfig) -> "AttentionShape":
        return cls(num_heads, head_dim, cfg.num_index_heads or num_kv_heads, cfg.index_dim, cfg.block_size, cfg.topk)


#: The paper's 109B MoE (41 layers, hidden 3072, 64 q / 4 KV heads, head dim 128).
PAPER_109B = AttentionShape()


def dense_flops_per_token(shape: AttentionShape, n: int) -> float:
    """Eq. 12 dense term: 2 n_h d_h N."""
    return 2.0 * shape.num_heads * shape.head_dim * n


def index_flops_per_token(shape: AttentionShape, n: int) -> float:
    """Index branch: n_I d_I N (raw scores against N/2 causal keys on average)."""
    return float(shape.num_index_heads * shape.index_dim * n)


def main_flops_per_token(shape: AttentionShape) -> float:
    """Main branch over the fixed budget: 4 n_h d_h k B."""
    return 4.0 * shape.num_heads * shape.head_dim * shape.topk * shape.block_size


def msa_flops_per_token(shape: AttentionShape, n: int) -> float:
    return index_flops_per_token(shape, n) + main_flops_per_token(shape)


def reduction(shape: AttentionShape, n: int) -> float:
    """F_dense / F_MSA at context length n."""
    return dense_flops_per_token(shape, n) / msa_flops_per_token(shape, n)


def reduction_ceiling(shape: AttentionShape) -> float:
    """Limit of the reduction as N -> infinity: 2 n_h d_h / (n_I d_I)."""
    return 2.0 * shape.num_heads * shape.head_dim / (shape.num_index_heads * shape.index_dim)


def sliding_window_flops_per_token(shape: AttentionShape, window: int, n: int) -> float:
    """Sliding-window attention (each token sees min(window, its position) keys),
    averaged over a causal sequence of n tokens: 4 n_h d_h * mean(min(w, t))."""
    w = min(window, n)
    mean_keys = (w * (w + 1) / 2 + (n - w) * w) / n
    return 4.0 * shape.num_heads * shape.head_dim * mean_keys


def flop_matched_window(shape: AttentionShape, n: int) -> int:
    """The sliding window whose attention FLOPs per token equal MSA's at length n
    (the paper's fair baseline). Monotone in the window, so a bisection finds it."""
    target = msa_flops_per_token(shape, n)
    lo, hi = 1, n
    if sliding_window_flops_per_token(shape, n, n) <= target:
        return n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sliding_window_flops_per_token(shape, mid, n) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def flop_matched_window_for(msa: MSAConfig, num_heads: int, head_dim: int, num_kv_heads: int, seq_len: int) -> int:
    """FLOP-matched sliding window for a model's MSA settings (index heads = KV heads unless
    ``msa.num_index_heads`` says otherwise) at training length ``seq_len``."""
    return flop_matched_window(AttentionShape.from_msa(num_heads, head_dim, num_kv_heads, msa), seq_len)


def parse_length(text: str) -> int:
    """'4K' -> 4096, '1M' -> 2**20, '131072' -> 131072."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    digits = t[:-1] if mult != 1 else t
    try:
        value = int(float(digits) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"context length {text!r} is invalid: use an integer or a K/M suffix (e.g. 64K, 1M)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"context length {text!r} is invalid: it must be >= 1")
    return value


def format_length(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


DEFAULT_LENGTHS = ("4K", "8K", "32K", "64K", "128K", "256K", "512K", "1M")


def table(shape: AttentionShape, lengths: Iterable[int]) -> str:
    """Markdown table of per-token attention FLOPs and the reduction factor."""
    rows = [
        "| context | dense GFLOP/token | MSA index GFLOP/token | MSA main GFLOP/token | reduction |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        rows.append(
            f"| {format_length(n)} | {dense_flops_per_token(shape, n) / 1e9:.3f} | "
            f"{index_flops_per_token(shape, n) / 1e9:.3f} | {main_flops_per_token(shape) / 1e9:.3f} | "
            f"{reduction(shape, n):.2f}x |"
        )
    rows.append(f"| ceiling | | | | {reduction_ceiling(shape):.2f}x |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="msa-flops", description="Attention FLOPs per token, dense GQA vs MSA (Eq. 12).")
    p.add_argument("--lengths", nargs="+", type=parse_length, default=[parse_length(x) for x in DEFAULT_LENGTHS])
    p.add_argument("--heads", type=int, default=PAPER_109B.num_heads, help="query heads n_h")
    p.add_argument("--head-dim", type=int, default=PAPER_109B.head_dim)
    p.add_argument("--index-heads", type=int, default=PAPER_109B.num_index_heads, help="n_I (= KV heads)")
    p.add_argument("--index-dim", type=int, default=PAPER_109B.index_dim)
    p.add_argument("--block-size", type=int, default=PAPER_109B.block_size)
    p.add_argument("--topk", type=int, default=PAPER_109B.topk)
    a = p.parse_args(argv)
    for name in ("heads", "head_dim", "index_heads", "index_dim", "block_size", "topk"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    shape = AttentionShape(a.heads, a.head_dim, a.index_heads, a.index_dim, a.block_size, a.topk)
    print(f"Attention FLOPs per token per layer (Eq. 12): n_h={shape.num_heads} d_h={shape.head_dim} "
          f"n_I={shape.num_index_heads} d_I={shape.index_dim} k={shape.topk} B={shape.block_size}")
    print(table(shape, a.lengths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

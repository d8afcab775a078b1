#!/usr/bin/env python
"""Recall vs k of MSA's block selector on concentrated vs white-noise attention.

    python scripts/selector_recall.py [--seq-len 16384] [--topk 8 16 32] [--queries 256]
"""
import argparse
import time

from msa_megatron.recall import format_recall_table, recall_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.time()
    table = recall_table(topks=a.topk, seq_len=a.seq_len, block_size=a.block_size, n_queries=a.queries, seed=a.seed)
    print(format_recall_table(table, a.seq_len, a.block_size))
    print(f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()

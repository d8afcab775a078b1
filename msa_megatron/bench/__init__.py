"""Benchmarks of the MSA kernels (``msa-bench`` = :func:`msa_megatron.bench.harness.main`).

Implementations register themselves in :mod:`msa_megatron.bench.registry`; the harness
imports the impl modules (``impls_index``, ``impls_main``), times every registered impl at
every length and writes markdown + JSON."""

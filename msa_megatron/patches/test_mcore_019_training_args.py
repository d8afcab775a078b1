"""The Megatron-LM argument patch: pinned to the upstream sources it wraps and relies on,
version-guarded, idempotent, reversible; without MSA it changes nothing but the help text repair.
(Flag behaviour: tests/megatron_lm/test_mlm_args.py.) Its pins, version guard and reversibility are tested in test_mcore_019_training_pins.py."""

from __future__ import annotations

import argparse
import sys

import pytest

from msa_megatron.patches import mcore_019_training_args as patch

ARGV = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
        "--max-position-embeddings", "128", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-4",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--mock-data"]


def _parse(module, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(sys, "argv", ["x", *ARGV])
    return vars(module.validate_args(module.parse_args(), {}))


def test_without_msa_the_parsed_args_are_upstreams(unpatched, monkeypatch):
    upstream = _parse(unpatched, monkeypatch)
    patch.apply()
    patched = _parse(unpatched, monkeypatch)
    added = {k for k in patched if k.startswith("msa")}
    assert added and all(patched[k] is None for k in added) and not any(k.startswith("msa") for k in upstream)
    assert {k: v for k, v in patched.items() if k not in added}.keys() == upstream.keys()
    assert all(repr(patched[k]) == repr(upstream[k]) for k in upstream if k not in ("timers",))


def test_upstream_help_crashes_and_the_patch_repairs_it(unpatched):
    parser = unpatched.add_megatron_arguments(argparse.ArgumentParser())
    # When this fails, upstream fixed its help text: drop repair_help_strings.
    with pytest.raises(ValueError, match="unsupported format character"):
        parser.format_help()
    patch.apply()
    parser = unpatched.add_megatron_arguments(argparse.ArgumentParser())
    text = parser.format_help()
    assert "--moe-paged-stash-buffer-size-factor-cuda" in text and "(e.g. 1.10 = 10%)" in text

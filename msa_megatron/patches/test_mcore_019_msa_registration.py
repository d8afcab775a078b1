"""The MSA registration patch: pinned to the upstream source it wraps, version-guarded,
idempotent, reversible, and transparent for every variant other than 'msa'.
(Registration through the stock builder with a real model: tests/megatron/test_backend_gpt_moe.py.)"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from msa_megatron.patches import mcore_019_msa_registration as patch
from msa_megatron.patches import source_sha256


@pytest.fixture
def unpatched():
    patch.remove()
    yield importlib.import_module(patch.TARGET)
    patch.remove()


def test_upstream_functions_are_the_pinned_ones(unpatched):
    for name, fn in patch.upstream_functions().items():
        assert source_sha256(fn) == patch.PINNED[name], f"upstream {name} changed: re-check the patch"
    assert patch.REPLACED_ASSERTION in inspect.getsource(unpatched._get_backend_spec_provider)
    # The block builder reaches the patched functions through module globals.
    block_src = inspect.getsource(unpatched.get_transformer_block_with_experimental_attention_variant_spec)
    assert "_get_backend_spec_provider(config=config)" in block_src
    assert "get_transformer_layer_with_experimental_attention_variant_spec(" in block_src


def test_apply_is_idempotent_and_reversible(unpatched):
    originals = {name: getattr(unpatched, name) for name in patch.PINNED}
    assert patch.apply() is True and patch.is_applied()
    wrapped = {name: getattr(unpatched, name) for name in patch.PINNED}
    assert patch.apply() is False
    assert all(getattr(unpatched, name) is wrapped[name] for name in patch.PINNED)
    assert unpatched.get_transformer_block_with_experimental_attention_variant_spec is originals[
        "get_transformer_block_with_experimental_attention_variant_spec"]  # relied on, not patched
    patch.remove()
    assert all(getattr(unpatched, name) is originals[name] for name in patch.PINNED)


def test_other_variants_reach_the_originals(unpatched):
    from megatron.core.transformer.transformer_config import TransformerConfig

    patch.apply()
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, transformer_impl="local",
                            params_dtype=torch.float32)
    with pytest.raises(AssertionError, match="transformer engine"):
        unpatched._get_backend_spec_provider(config=cfg)
    with pytest.raises(ValueError, match="Invalid experimental attention variant: None"):
        unpatched.get_experimental_attention_variant_module_spec(config=cfg, backend=object())


def test_msa_backend_without_te_is_local(unpatched):
    from msa_megatron.megatron.model import make_transformer_config
    from msa_megatron.megatron.specs import MSALocalSpecProvider

    patch.apply()
    cfg = make_transformer_config({"block_size": 16, "topk": 2, "index_dim": 16}, num_layers=2, hidden_size=64,
                                  num_attention_heads=4, params_dtype=torch.float32)
    assert isinstance(unpatched._get_backend_spec_provider(config=cfg), MSALocalSpecProvider)
    cfg.transformer_impl = "transformer_engine"  # TE is not installed here: local, announced once
    assert isinstance(unpatched._get_backend_spec_provider(config=cfg), MSALocalSpecProvider)


def test_refuses_other_versions_and_changed_sources(unpatched, monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match="targets megatron-core 0.19.x; found 0.20.0"):
        patch.apply()
    monkeypatch.undo()
    monkeypatch.setitem(patch.PINNED, "_get_backend_spec_provider", "0" * 64)
    with pytest.raises(RuntimeError, match="upstream source of .*_get_backend_spec_provider changed"):
        patch.apply()
    assert not patch.is_applied()

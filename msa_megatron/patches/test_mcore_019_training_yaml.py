"""The Megatron-LM YAML patch: pinned, version-guarded, idempotent, reversible; other variants
reach the upstream config builder unchanged. (YAML behaviour: tests/megatron_lm/test_mlm_yaml.py.) Its pins, version guard and reversibility are tested in test_mcore_019_training_pins.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from msa_megatron.patches import mcore_019_training_yaml as patch


def test_other_variants_reach_upstream_unchanged(unpatched, monkeypatch):
    calls = []

    def upstream_builder(args, transfomer_key="language_model"):
        calls.append(transfomer_key)
        return "upstream config"

    wrapper = patch._config_from_yaml(upstream_builder)
    for variant in (None, "dsa", "gated_delta_net"):
        args = SimpleNamespace(language_model=SimpleNamespace(experimental_attention_variant=variant))
        assert wrapper(args) == "upstream config"
    assert calls == ["language_model"] * 3
    unvalidated = SimpleNamespace(language_model=SimpleNamespace(experimental_attention_variant="msa", msa=None))
    with pytest.raises(RuntimeError, match="language_model.msa is not validated"):
        wrapper(unvalidated)

"""The Megatron-LM YAML patch: pinned, version-guarded, idempotent, reversible; other variants
reach the upstream config builder unchanged. (YAML behaviour: tests/megatron_lm/test_mlm_yaml.py.)"""

from __future__ import annotations

import importlib
import inspect
from types import SimpleNamespace

import pytest

from patches import mcore_019_training_yaml as patch
from patches import source_sha256


@pytest.fixture
def unpatched():
    was_applied = patch.is_applied()
    patch.remove()
    yield importlib.import_module(patch.TARGET)
    patch.remove()
    if was_applied:
        patch.apply()


def test_upstream_sources_are_the_pinned_ones(unpatched):
    for qualified, sha in patch.PINNED.items():
        assert source_sha256(patch.upstream(qualified)) == sha, f"upstream {qualified} changed: re-check the patch"
    for qualified, text in patch.SOURCE_CHECKS:
        assert text in inspect.getsource(patch.upstream(qualified))


def test_apply_is_idempotent_and_reversible(unpatched):
    originals = {n: getattr(unpatched, n) for n in patch.PATCH.wrappers}
    assert patch.apply() is True and patch.apply() is False and patch.is_applied()
    assert all(getattr(unpatched, n).__wrapped__ is originals[n] for n in originals)
    patch.remove()
    assert all(getattr(unpatched, n) is originals[n] for n in originals)


def test_refuses_other_versions_and_changed_sources(unpatched, monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.18.1")
    with pytest.raises(RuntimeError, match="targets megatron-core 0.19.x; found 0.18.1"):
        patch.apply()
    monkeypatch.undo()
    monkeypatch.setitem(patch.PINNED, f"{patch.TARGET}:load_yaml", "0" * 64)
    with pytest.raises(RuntimeError, match=r"upstream source of megatron.training.yaml_arguments.load_yaml changed"):
        patch.apply()
    assert not patch.is_applied()


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

"""The contract every Megatron-LM loop patch keeps (their behaviour is tested in their own
files): the upstream functions it wraps are byte-for-byte the pinned 0.19.2 sources, it
refuses any other megatron-core version or a changed source, and applying is idempotent and
reversible. These are the tests that fail loudly when upstream moves."""

from __future__ import annotations

import inspect

import pytest

from msa_megatron.patches import mcore_019_training_args, mcore_019_training_helpers, mcore_019_training_loop
from msa_megatron.patches import mcore_019_training_yaml, source_sha256

PATCHES = [mcore_019_training_args, mcore_019_training_helpers, mcore_019_training_loop, mcore_019_training_yaml]
by_patch = pytest.mark.parametrize("unpatched", PATCHES, ids=lambda p: p.__name__.rsplit("_", 1)[-1], indirect=True)


def _patch_of(module):
    return next(p for p in PATCHES if p.TARGET == module.__name__)


@by_patch
def test_upstream_sources_are_the_pinned_ones(unpatched):
    patch = _patch_of(unpatched)
    for qualified, sha in patch.PINNED.items():
        assert source_sha256(patch.upstream(qualified)) == sha, f"upstream {qualified} changed: re-check the patch"
    for qualified, text in patch.SOURCE_CHECKS:
        assert text in inspect.getsource(patch.upstream(qualified))


@by_patch
def test_apply_is_idempotent_and_reversible(unpatched):
    patch = _patch_of(unpatched)
    originals = {n: getattr(unpatched, n) for n in patch.PATCH.wrappers}
    assert patch.apply() is True and patch.is_applied()
    wrapped = {n: getattr(unpatched, n) for n in originals}
    assert all(wrapped[n] is not originals[n] and wrapped[n].__wrapped__ is originals[n] for n in wrapped)
    assert patch.apply() is False and all(getattr(unpatched, n) is wrapped[n] for n in wrapped)
    patch.remove()
    assert all(getattr(unpatched, n) is originals[n] for n in originals)


@by_patch
@pytest.mark.parametrize("version", ["0.18.1", "0.20.0rc0"])
def test_refuses_other_megatron_core_versions(unpatched, monkeypatch, version):
    import megatron.core

    patch = _patch_of(unpatched)
    monkeypatch.setattr(megatron.core, "__version__", version)
    with pytest.raises(RuntimeError, match=f"targets megatron-core 0.19.x; found {version}"):
        patch.apply()
    assert not patch.is_applied()


@by_patch
def test_refuses_any_changed_pinned_source(unpatched, monkeypatch):
    patch = _patch_of(unpatched)
    for qualified in patch.PINNED:
        monkeypatch.setitem(patch.PINNED, qualified, "0" * 64)
        dotted = qualified.replace(":", ".")
        with pytest.raises(RuntimeError, match=f"upstream source of {dotted} changed"):
            patch.apply()
        assert not patch.is_applied()
        monkeypatch.undo()

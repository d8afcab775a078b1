"""The dataset-helpers patch: upstream ``_compile_dependencies`` exits the process when run from
the megatron-core wheel (no Makefile; reproduced here); the wrapper uses the prebuilt helpers
then, and defers to upstream whenever there is something to build."""

from __future__ import annotations

import importlib
import inspect
import os

import pytest
import torch

from patches import mcore_019_training_helpers as patch
from patches import source_sha256


@pytest.fixture
def unpatched():
    was_applied = patch.is_applied()
    patch.remove()
    yield importlib.import_module(patch.TARGET)
    patch.remove()
    if was_applied:
        patch.apply()


@pytest.fixture
def one_rank(monkeypatch):
    from types import SimpleNamespace

    from megatron.training import global_vars

    barriers = []
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", SimpleNamespace())
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: barriers.append(1))
    return barriers


def test_upstream_sources_are_the_pinned_ones(unpatched):
    for qualified, sha in patch.PINNED.items():
        assert source_sha256(patch.upstream(qualified)) == sha, f"upstream {qualified} changed: re-check the patch"
    for qualified, text in patch.SOURCE_CHECKS:
        assert text in inspect.getsource(patch.upstream(qualified))


def test_upstream_exits_from_the_wheel(unpatched, one_rank):
    """When this fails, the wheel can build (or skip) its helpers: re-check the patch."""
    assert patch.prebuilt_helpers_usable()
    with pytest.raises(SystemExit) as exc:
        unpatched._compile_dependencies()
    assert exc.value.code == 1


def test_wrapper_uses_the_prebuilt_helpers(unpatched, one_rank, capsys):
    patch.apply()
    assert patch.apply() is False and patch.is_applied()
    unpatched._compile_dependencies()
    assert one_rank == [1] and "using the prebuilt megatron.core.datasets.helpers_cpp" in capsys.readouterr().out
    patch.remove()
    assert not patch.is_applied()


def test_wrapper_defers_to_upstream_when_a_makefile_exists(monkeypatch):
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p.endswith("Makefile") or real_exists(p))
    calls = []
    assert not patch.prebuilt_helpers_usable()
    patch._compile_dependencies(lambda: calls.append("upstream"))()
    assert calls == ["upstream"]


def test_refuses_changed_sources(unpatched, monkeypatch):
    monkeypatch.setitem(patch.PINNED, f"{patch.TARGET}:initialize_megatron", "0" * 64)
    with pytest.raises(RuntimeError, match=r"upstream source of megatron.training.initialize.initialize_megatron changed"):
        patch.apply()
    assert not patch.is_applied()

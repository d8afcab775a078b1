"""The dataset-helpers patch: upstream ``_compile_dependencies`` exits the process when run from
the megatron-core wheel (no Makefile; reproduced here); the wrapper uses the prebuilt helpers
then, and defers to upstream whenever there is something to build. Its pins, version guard and reversibility are tested in test_mcore_019_training_pins.py."""

from __future__ import annotations

import os

import pytest
import torch

from msa_megatron.patches import mcore_019_training_helpers as patch


@pytest.fixture
def one_rank(monkeypatch):
    from types import SimpleNamespace

    from megatron.training import global_vars

    barriers = []
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", SimpleNamespace())
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: barriers.append(1))
    return barriers


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


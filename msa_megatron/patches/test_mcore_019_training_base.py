"""FunctionWrapPatch mechanics on a throw-away module: wraps only after every pin and source
check passed (all-or-nothing), idempotent, reversible, refuses other megatron-core versions."""

from __future__ import annotations

import sys
import types

import pytest

from msa_megatron.patches import source_sha256
from msa_megatron.patches.mcore_019_training_base import FunctionWrapPatch

SOURCE = '''
def double(x):
    return 2 * x


def caller(x):
    return double(x) + 1
'''


@pytest.fixture
def toy(monkeypatch, tmp_path):
    path = tmp_path / "msa_toy_upstream.py"
    path.write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import msa_toy_upstream

    yield msa_toy_upstream
    sys.modules.pop("msa_toy_upstream", None)


def make_patch(module, **overrides):
    pinned = {f"{module.__name__}:double": source_sha256(module.double),
              f"{module.__name__}:caller": source_sha256(module.caller)}
    pinned.update(overrides.pop("pinned", {}))

    def wrap(original):
        def wrapper(x):
            return original(x) * 10
        return wrapper

    return FunctionWrapPatch("toy", module.__name__, {"double": wrap}, pinned,
                             overrides.pop("checks", [(f"{module.__name__}:caller", "double(x)")]))


def test_wraps_after_checks_idempotent_reversible(toy):
    patch = make_patch(toy)
    assert toy.caller(1) == 3
    assert patch.apply() is True and patch.is_applied()
    assert toy.caller(1) == 21  # the caller reaches the wrapper through module globals
    assert patch.apply() is False and toy.caller(1) == 21  # not wrapped twice
    assert patch.upstream(f"{toy.__name__}:double")(1) == 2 and toy.double.__wrapped__(1) == 2
    patch.remove()
    assert not patch.is_applied() and toy.caller(1) == 3


def test_refuses_changed_source_or_missing_text_without_touching_anything(toy):
    bad = make_patch(toy, pinned={f"{toy.__name__}:caller": "0" * 64})
    with pytest.raises(RuntimeError, match=r"upstream source of msa_toy_upstream.caller changed"):
        bad.apply()
    assert not bad.is_applied() and toy.caller(1) == 3
    missing = make_patch(toy, checks=[(f"{toy.__name__}:caller", "triple(x)")])
    with pytest.raises(RuntimeError, match=r"no longer contains 'triple\(x\)'"):
        missing.apply()
    assert toy.caller(1) == 3


def test_refuses_other_megatron_core_versions(toy, monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match="toy targets megatron-core 0.19.x; found 0.20.0"):
        make_patch(toy).apply()
    assert toy.caller(1) == 3


def test_every_wrapped_function_needs_a_pin():
    module = types.ModuleType("msa_toy_unpinned")
    with pytest.raises(ValueError, match=r"wrapped functions without a pin: \['f'\]"):
        FunctionWrapPatch("toy", module.__name__, {"f": lambda o: o}, {})

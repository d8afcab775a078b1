"""Shared fixture of the patch tests: the patch named by the test module's ``patch`` global,
removed for the test (the upstream module as shipped), restored afterwards as it was."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def unpatched(request):
    patch = getattr(request, "param", None) or request.module.patch
    was_applied = patch.is_applied()
    patch.remove()
    yield importlib.import_module(patch.TARGET)
    patch.remove()
    if was_applied:
        patch.apply()

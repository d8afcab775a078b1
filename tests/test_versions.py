"""Dependency drift fails here, loudly: the installed torch / triton / megatron-core must be in
the ranges this project was tested with (msa_megatron/versions.py), and setup.cfg must pin
exactly those ranges."""

from __future__ import annotations

import configparser
import warnings
from pathlib import Path

import pytest

from msa_megatron import versions

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(versions.TESTED))
def test_installed_version_is_in_the_tested_range(name):
    rng = versions.TESTED[name]
    version = versions.installed_version(name)
    if version is None and rng.optional:
        pytest.skip(f"{name} is not installed (optional: {rng.evidence})")
    assert version is not None, f"{name} is not installed; tested range {rng.spec()}"
    assert versions.in_range(version, rng), (
        f"{name} {version} is installed, outside the tested range {rng.spec()} ({rng.evidence}). Run the GPU and "
        "CPU checks with it, then widen msa_megatron/versions.py and setup.cfg together")


def test_setup_cfg_pins_the_tested_ranges():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    pins = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        req = line.split(";")[0].strip()
        name = req.split(">")[0].split("<")[0].split("=")[0].strip()
        pins[name] = req[len(name):].strip()
    for name, rng in versions.TESTED.items():
        assert pins.get(name) == rng.spec(), f"setup.cfg pins {name}{pins.get(name)!r}; versions.py says {rng.spec()}"


@pytest.mark.parametrize("version, ok", [("2.11.0+cu130", True), ("2.13.0", True), ("2.10.2", False),
                                         ("2.14.0", False), ("2.14.0rc1", False), ("2.11.0a0+git12", True)])
def test_range_check(version, ok):
    assert versions.in_range(version, versions.TESTED["torch"]) is ok


def test_outside_the_range_warns_once_at_import_and_names_the_package(monkeypatch):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda n: "3.9.0" if n == "triton" else real(n))
    monkeypatch.setattr(versions, "_warned", False)
    with pytest.warns(versions.UntestedVersionWarning, match=r"triton 3\.9\.0 is outside the tested range >=3\.6,<3\.8"):
        assert len(versions.warn_if_untested()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.warn_if_untested() == []  # once per process
    tested = {"torch": "2.13.0", "triton": None, "megatron-core": None}  # triton is optional, megatron-core not
    assert versions.untested(tested) == ["megatron-core is not installed (tested range >=0.19,<0.20)"]
    assert versions.untested(tested, missing_ok=True) == []

"""The dependency versions this project was tested with: the one list that setup.cfg's pins
and tests/test_versions.py are checked against.

Outside these ranges things may still work, but nothing was proven there (e.g. triton 3.9's
interpreter rejects a scalar mask in the KL kernel's ``tl.atomic_add``), so importing
msa_megatron warns once (:func:`warn_if_untested`) and the test suite fails loudly.
Uses only ``importlib.metadata``: importing msa_megatron stays light (no torch import).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class TestedRange:
    """``lower <= version < upper`` on the release part (local tags such as +cu130 ignored)."""

    lower: str
    upper: str
    evidence: str
    #: Not needed everywhere (triton: Linux + CUDA builds of torch only).
    optional: bool = False

    def spec(self) -> str:
        return f">={self.lower},<{self.upper}"


#: distribution name -> tested range. setup.cfg's install_requires must say the same
#: (tests/test_versions.py checks it).
TESTED: Dict[str, TestedRange] = {
    "torch": TestedRange("2.11", "2.14", "GPU runs: 2.11.0+cu130 on H100 (docs/gpu_logs); CPU suite: 2.13.0"),
    "triton": TestedRange("3.6", "3.8", "GPU kernels: 3.6.0 (with torch 2.11); CPU interpreter suite: 3.7.1 "
                                        "(with torch 2.13); 3.9 breaks the KL kernel under the interpreter",
                          optional=True),
    "megatron-core": TestedRange("0.19", "0.20", "0.19.2; the patches in msa_megatron/patches pin its sources"),
}


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range this project was tested with."""


def _release(version: str) -> Tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '0.20.0rc0' -> (0, 20, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def in_range(version: str, rng: TestedRange) -> bool:
    return _release(rng.lower) <= _release(version) < _release(rng.upper)


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def untested(versions: Optional[Dict[str, Optional[str]]] = None, missing_ok: bool = False) -> List[str]:
    """One message per package outside its tested range, or missing (unless optional or ``missing_ok``)."""
    problems = []
    for name, rng in TESTED.items():
        version = versions[name] if versions is not None and name in versions else installed_version(name)
        if version is None:
            if not (rng.optional or missing_ok):
                problems.append(f"{name} is not installed (tested range {rng.spec()})")
        elif not in_range(version, rng):
            problems.append(f"{name} {version} is outside the tested range {rng.spec()} ({rng.evidence})")
    return problems


_warned = False


def warn_if_untested() -> List[str]:
    """Warn once per process if installed versions leave the tested ranges; returns the messages."""
    global _warned
    if _warned:
        return []
    _warned = True
    problems = untested(missing_ok=True)  # the reference runs without megatron-core: no warning for that
    if problems:
        warnings.warn("msa_megatron was not tested with: " + "; ".join(problems), UntestedVersionWarning, stacklevel=3)
    return problems


__all__ = ["TESTED", "TestedRange", "UntestedVersionWarning", "in_range", "installed_version", "untested",
           "warn_if_untested"]

"""Shared mechanics of the Megatron-LM training-loop patches (``mcore_019_training_*``).

A :class:`FunctionWrapPatch` replaces module-level functions of one ``megatron.training``
module by wrappers. Before installing anything it checks the megatron-core version and the
sha256 of the source of every upstream function it wraps *or relies on* (callers that must keep
reaching the wrapped functions through module globals), so an upstream change refuses to patch
instead of patching blindly. ``apply`` is all-or-nothing and idempotent; ``remove`` restores the
originals (tests).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Dict, Iterable, Tuple

from msa_megatron.patches import check_pinned

log = logging.getLogger("msa_megatron.patches")

#: A wrapper factory: original function -> wrapper.
Factory = Callable[[Callable], Callable]


class FunctionWrapPatch:
    def __init__(self, name: str, target: str, wrappers: Dict[str, Factory], pinned: Dict[str, str],
                 source_checks: Iterable[Tuple[str, str]] = ()):
        """``pinned``: ``"module:function" -> sha256``, covering every wrapped function;
        ``source_checks``: ``("module:function", text)`` pairs, text the patch relies on."""
        missing = [n for n in wrappers if f"{target}:{n}" not in pinned]
        if missing:
            raise ValueError(f"{name}: wrapped functions without a pin: {missing}")
        self.name, self.target, self.wrappers = name, target, dict(wrappers)
        self.pinned = pinned  # shared with the patch module: tests may edit its PINNED
        self.source_checks = tuple(source_checks)
        self._originals: Dict[str, Callable] = {}

    def module(self):
        return importlib.import_module(self.target)

    def upstream(self, qualified: str) -> Callable:
        """The unpatched upstream function ``"module:function"`` (whether or not applied)."""
        module_name, fn_name = qualified.split(":")
        if module_name == self.target and fn_name in self._originals:
            return self._originals[fn_name]
        return getattr(importlib.import_module(module_name), fn_name)

    def verify_upstream(self) -> None:
        """Raise unless megatron-core is 0.19.x and every pinned source is the one patched against."""
        import inspect

        from msa_megatron.megatron.compat import check_mcore_version

        check_mcore_version(self.name)
        for qualified, sha in self.pinned.items():
            check_pinned(self.upstream(qualified), sha, self.name)
        for qualified, text in self.source_checks:
            if text not in inspect.getsource(self.upstream(qualified)):
                raise RuntimeError(f"{self.name}: upstream {qualified} no longer contains {text!r}")

    def is_applied(self) -> bool:
        module = self.module()
        return all(getattr(getattr(module, n), "__msa_patch__", False) for n in self.wrappers)

    def apply(self) -> bool:
        """Install the wrappers; True if this call installed them, False if already installed."""
        if self.is_applied():
            return False
        self.verify_upstream()
        module = self.module()
        wrapped = {}
        for fn_name, make in self.wrappers.items():
            original = getattr(module, fn_name)
            wrapper = make(original)
            wrapper.__msa_patch__ = True
            wrapper.__wrapped__ = original
            wrapped[fn_name] = (original, wrapper)
        for fn_name, (original, wrapper) in wrapped.items():
            self._originals[fn_name] = original
            setattr(module, fn_name, wrapper)
        log.info("MSA: %s applied to %s (%s)", self.name, self.target, ", ".join(self.wrappers))
        return True

    def remove(self) -> None:
        module = self.module()
        for fn_name, original in self._originals.items():
            setattr(module, fn_name, original)
        self._originals.clear()


__all__ = ["Factory", "FunctionWrapPatch"]

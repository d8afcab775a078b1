"""Run Megatron-Core on CPU (gloo) for tests and the default CPU training job.

Megatron-Core 0.19 assumes CUDA in a few places that the CPU path still reaches:
``torch.cuda.current_device()`` as an allocation device, the CUDA RNG state tracker,
CUDA streams/events/synchronize in the schedules and DDP, and ``Tensor.cuda()``.
:func:`install_cpu_compat` redirects exactly those to CPU equivalents. It is a no-op when
CUDA is available, refuses other megatron-core versions (the patched call sites were
checked on 0.19.x only), and logs once what it replaced.
"""

from __future__ import annotations

import contextlib
import logging
from typing import List

import torch

log = logging.getLogger("msa_megatron.compat")

#: megatron-core versions whose CUDA call sites this layer was checked against.
SUPPORTED_MCORE = ("0.19.",)

_installed = False
_patched: List[str] = []


def megatron_core_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def check_mcore_version(what: str) -> str:
    """Raise unless the installed megatron-core is one this project's patches target."""
    version = megatron_core_version()
    if not version.startswith(SUPPORTED_MCORE):
        raise RuntimeError(
            f"{what} targets megatron-core {', '.join(v + 'x' for v in SUPPORTED_MCORE)}; "
            f"found {version}. Re-check the patched call sites and update SUPPORTED_MCORE."
        )
    return version


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU: all work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn):
    """Wrap a tensor factory so that device='cuda' (hard-coded in megatron) means CPU."""

    def factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver; nothing to pin for on CPU
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn
    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


def _cpu_to(fn):
    """Tensor.to / Module.to that treat a CUDA target as CPU."""

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + tuple(args[1:])
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(self, *args, **kwargs)

    to.__wrapped__ = fn
    return to


def _cuda_type_name(fn):
    """Tensor.type() with no argument answers as if on CUDA ('torch.cuda.FloatTensor'):
    the optimizers sort parameters by that string."""

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return fn(self, *args, **kwargs)
        name = fn(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    type_.__wrapped__ = fn
    return type_


def _set(obj, name: str, value) -> None:
    setattr(obj, name, value)
    _patched.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")


def install_cpu_compat(force: bool = False) -> bool:
    """Patch the CUDA-only call sites for a CPU run. Returns True if patches are active.

    ``force`` installs even when CUDA is present (tests of this layer only)."""
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_mcore_version("msa_megatron.megatron.compat")
    cpu = torch.device("cpu")

    # Allocation device: megatron passes torch.cuda.current_device() as `device=`.
    _set(torch.cuda, "current_device", lambda: cpu)
    _set(torch.cuda, "synchronize", lambda *a, **k: None)
    _set(torch.cuda, "Stream", _NullStream)
    _set(torch.cuda, "Event", _NullStream)
    _set(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    _set(torch.cuda, "default_stream", lambda *a, **k: _NullStream())
    _set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _set(torch.cuda, "device_count", lambda: 0)
    _set(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    _set(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(torch.cuda, "empty_cache", lambda: None)
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _set(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    for name in _FACTORIES:
        _set(torch, name, _cpu_factory(getattr(torch, name)))
    _set(torch.Tensor, "to", _cpu_to(torch.Tensor.to))
    _set(torch.Tensor, "type", _cuda_type_name(torch.Tensor.type))
    _set(torch.nn.Module, "to", _cpu_to(torch.nn.Module.to))

    # RNG: the tensor-parallel RNG tracker forks CUDA generator states; on CPU the CPU
    # generator plays that role (dropout and init draw from it).
    _set(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: keep that a no-op.
    _set(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(torch.cuda, "manual_seed_all", lambda seed: None)
    import megatron.core.tensor_parallel.random as mrandom

    _set(mrandom, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state))
    _set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())

    # The tracker warns when the CPU generator moves inside a CUDA-RNG fork; on CPU that
    # generator *is* the forked one, so the warning is expected: drop exactly that line.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    _installed = True
    log.warning(
        "MSA: no CUDA device; Megatron-Core runs on CPU (gloo) with the compatibility layer "
        "(megatron-core %s): %s", megatron_core_version(), ", ".join(_patched)
    )
    return True


def patched_call_sites() -> List[str]:
    """What :func:`install_cpu_compat` replaced (empty when not installed)."""
    return list(_patched)


__all__ = ["SUPPORTED_MCORE", "check_mcore_version", "install_cpu_compat", "megatron_core_version", "patched_call_sites"]

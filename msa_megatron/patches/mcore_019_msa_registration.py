"""Register MSA as a Megatron-Core experimental attention variant (megatron-core 0.19.x).

Megatron-Core selects attention variants in
``megatron.core.models.gpt.experimental_attention_variant_module_specs`` by
``config.experimental_attention_variant`` ('gated_delta_net' | 'dsa'), and its backend
helper asserts Transformer Engine. For ``experimental_attention_variant == 'msa'`` only,
this patch routes three module-level functions to msa_megatron.megatron.specs:

* ``_get_backend_spec_provider``: the local backend when ``transformer_impl='local'`` or TE
  is absent (instead of ``assert config.transformer_impl == "transformer_engine"``);
* ``get_experimental_attention_variant_module_spec``: the MSA self-attention spec;
* ``get_transformer_layer_with_experimental_attention_variant_spec``: per-layer MSA/dense
  attention (MSAConfig.is_msa_layer) instead of "every layer experimental".

``get_transformer_block_with_experimental_attention_variant_spec`` (what Megatron-LM calls)
is not patched: it looks the functions above up as module globals, so it picks up the
wrappers; its source is pinned too because the patch relies on that. Every other variant
goes to the original functions unchanged.
"""

from __future__ import annotations

import functools
import importlib
import logging

from msa_megatron.patches import check_pinned

log = logging.getLogger("msa_megatron.patches")

TARGET = "megatron.core.models.gpt.experimental_attention_variant_module_specs"
VARIANT = "msa"

#: sha256 of the upstream source of every function this patch wraps or relies on (0.19.2).
PINNED = {
    "_get_backend_spec_provider": "0181cb9df535432cf71be33448fa64823d2fcc12027790090fff50b342f32e7c",
    "get_experimental_attention_variant_module_spec": "22cea16a436c8404b7bde592d014ef825163a3a4b3106280a09900a439186eca",
    "get_transformer_layer_with_experimental_attention_variant_spec": "f4020a6d87c4fe938e39ef490cf9977b72946521ea898800bee8d84ff3e18636",
    "get_transformer_block_with_experimental_attention_variant_spec": "a11260c5e8dd8aa7b0843ddc007926ad8c101d16138e6275929b939bac319197",
}
#: The upstream assertion the backend wrapper bypasses for 'msa'.
REPLACED_ASSERTION = 'assert config.transformer_impl == "transformer_engine"'

_ORIGINALS: dict = {}


def _is_msa(config) -> bool:
    return getattr(config, "experimental_attention_variant", None) == VARIANT


def _backend_spec_provider(original):
    @functools.wraps(original)
    def wrapper(config):
        if _is_msa(config):
            from msa_megatron.megatron.specs import select_backend

            return select_backend(config)
        return original(config=config)

    return wrapper


def _attention_module_spec(original):
    @functools.wraps(original)
    def wrapper(config, backend=None):
        if _is_msa(config):
            from msa_megatron.megatron.specs import get_msa_attention_module_spec, select_backend

            return get_msa_attention_module_spec(config, backend if backend is not None else select_backend(config))
        return original(config=config, backend=backend)

    return wrapper


def _layer_specs(original):
    @functools.wraps(original)
    def wrapper(config, backend=None):
        if _is_msa(config):
            from msa_megatron.megatron.specs import msa_layer_specs

            return msa_layer_specs(config, backend)
        return original(config=config, backend=backend)

    return wrapper


_WRAPPERS = {
    "_get_backend_spec_provider": _backend_spec_provider,
    "get_experimental_attention_variant_module_spec": _attention_module_spec,
    "get_transformer_layer_with_experimental_attention_variant_spec": _layer_specs,
}


def upstream_functions() -> dict:
    """The unpatched upstream functions (whether or not the patch is applied)."""
    module = importlib.import_module(TARGET)
    return {name: _ORIGINALS.get(name, getattr(module, name)) for name in PINNED}


def verify_upstream() -> None:
    """Raise if the installed megatron-core is not the version/source this patch was written for."""
    from msa_megatron.megatron.compat import check_mcore_version

    check_mcore_version("msa_megatron.patches.mcore_019_msa_registration")
    functions = upstream_functions()
    for name, fn in functions.items():
        check_pinned(fn, PINNED[name], "msa_megatron.patches.mcore_019_msa_registration")
    import inspect

    if REPLACED_ASSERTION not in inspect.getsource(functions["_get_backend_spec_provider"]):
        raise RuntimeError(f"upstream _get_backend_spec_provider no longer contains {REPLACED_ASSERTION!r}")


def is_applied() -> bool:
    module = importlib.import_module(TARGET)
    return all(getattr(getattr(module, name), "__msa_patch__", False) for name in _WRAPPERS)


def apply() -> bool:
    """Install the wrappers; True if this call installed them, False if already installed."""
    if is_applied():
        return False
    verify_upstream()
    module = importlib.import_module(TARGET)
    for name, make in _WRAPPERS.items():
        original = getattr(module, name)
        _ORIGINALS[name] = original
        wrapper = make(original)
        wrapper.__msa_patch__ = True
        setattr(module, name, wrapper)
    log.info("MSA: registered experimental_attention_variant='msa' in %s", TARGET)
    return True


def remove() -> None:
    """Restore the upstream functions (tests)."""
    module = importlib.import_module(TARGET)
    for name, original in _ORIGINALS.items():
        setattr(module, name, original)
    _ORIGINALS.clear()


__all__ = ["PINNED", "REPLACED_ASSERTION", "apply", "is_applied", "remove", "upstream_functions", "verify_upstream"]

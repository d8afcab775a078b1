"""The one place the trainer talks to the MSA backend (msa_megatron.megatron.model and
the run-time switches of msa_megatron.megatron).

Backend present (the normal case): every model, dense or MSA, is built by it, so the
dense baseline and MSA runs share one code path. Backend absent (this checkout predates
its merge): dense models are built from stock Megatron-Core pieces with the same
arguments, and ``attention.type=msa`` is refused with one clear error.

``MSA_MEGATRON_BACKEND=<module>`` points the adapter at another module with the same API
(the tests' stand-in); it is logged, never implicit.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any, Dict, List, Optional

from ..config import MSAConfig
from .config import ConfigError

log = logging.getLogger(__name__)

#: Default backend modules: model construction and run-time switches.
MODEL_MODULE = "msa_megatron.megatron.model"
SWITCHES_MODULE = "msa_megatron.megatron"

#: Parameters of the index branch are recognised by name (index_q, index_k, their norms).
INDEX_PARAM_MARKER = "index_"

_backend: Optional[Dict[str, Any]] = None


def _load() -> Dict[str, Any]:
    """Resolve the backend once: {'model': module|None, 'switches': module|None, 'name': str}."""
    global _backend
    if _backend is not None:
        return _backend
    override = os.environ.get("MSA_MEGATRON_BACKEND")
    if override:
        mod = importlib.import_module(override)
        _backend = {"model": mod, "switches": mod, "name": override}
        log.warning("MSA backend overridden by MSA_MEGATRON_BACKEND=%s", override)
        return _backend
    try:
        model_mod: Optional[ModuleType] = importlib.import_module(MODEL_MODULE)
    except ModuleNotFoundError as e:
        if e.name != MODEL_MODULE:
            raise  # the backend exists but one of its own imports is broken: surface it
        model_mod = None
    switches = importlib.import_module(SWITCHES_MODULE) if model_mod is not None else None
    if switches is not None and hasattr(switches, "register"):
        switches.register()  # Megatron-Core accepts experimental_attention_variant='msa' from now on
    _backend = {"model": model_mod, "switches": switches, "name": MODEL_MODULE if model_mod else None}
    return _backend


def backend_available() -> bool:
    return _load()["model"] is not None


def backend_name() -> str:
    return _load()["name"] or "stock Megatron-Core (MSA backend not installed)"


def require_backend(attention_type: str) -> None:
    if attention_type == "msa" and not backend_available():
        raise ConfigError(
            "attention.type", "msa",
            f"dense (the MSA backend module {MODEL_MODULE} is not in this checkout; merge branch `backend`)")


def is_index_param(name: str) -> bool:
    return INDEX_PARAM_MARKER in name


# --------------------------------------------------------------------------- building
def make_transformer_config(msa: Optional[MSAConfig], **kwargs):
    b = _load()
    if b["model"] is not None:
        return b["model"].make_transformer_config(msa, **kwargs)
    if msa is not None:
        require_backend("msa")
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**kwargs)


def build_gpt_model(config, vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                    post_process: bool = True, vp_stage: Optional[int] = None, use_te: bool = False, **gpt_kwargs):
    b = _load()
    if b["model"] is not None:
        return b["model"].build_gpt_model(config, vocab_size, max_sequence_length, pre_process=pre_process,
                                          post_process=post_process, vp_stage=vp_stage, use_te=use_te, **gpt_kwargs)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization,
                                      vp_stage=vp_stage)
    return GPTModel(config, spec, vocab_size, max_sequence_length, pre_process=pre_process,
                    post_process=post_process, vp_stage=vp_stage, **gpt_kwargs)


# --------------------------------------------------------------------------- run time
def set_attention_mode(model_chunks: List[Any], mode: str) -> None:
    sw = _load()["switches"]
    if sw is not None:
        sw.set_attention_mode(model_chunks, mode)


def set_recall_sampling(model_chunks: List[Any], enabled: bool) -> None:
    sw = _load()["switches"]
    if sw is not None:
        sw.set_recall_sampling(model_chunks, enabled)


def _core_attentions(model_chunks: List[Any]):
    """The backend's MSA core attentions (each reads ``self.msa.kl_coeff`` per forward)."""
    modes = importlib.import_module(SWITCHES_MODULE + ".modes")
    return list(modes.msa_core_attentions(model_chunks))


def supports_kl_schedule() -> bool:
    sw = _load()["switches"]
    if sw is None:
        return False
    if hasattr(sw, "set_kl_coeff"):
        return True
    try:
        importlib.import_module(SWITCHES_MODULE + ".modes").msa_core_attentions  # noqa: B018
        return True
    except (ImportError, AttributeError):
        return False


def set_kl_coeff(model_chunks: List[Any], coeff: float) -> None:
    """Run-time KL coefficient (attention.kl_schedule): the backend's set_kl_coeff if it has
    one, else a new MSAConfig (kl_coeff replaced) on each MSA core attention."""
    sw = _load()["switches"]
    if sw is not None and hasattr(sw, "set_kl_coeff"):
        sw.set_kl_coeff(model_chunks, coeff)
        return
    if not supports_kl_schedule():
        raise ConfigError("attention.kl_schedule", "set",
                          f"null: the MSA backend ({backend_name()}) has no run-time KL coefficient switch")
    for core in _core_attentions(model_chunks):
        core.msa = core.msa.replace(kl_coeff=float(coeff))


def init_index_from_dense(model_chunks: List[Any], init: str) -> List[Dict[str, Any]]:
    """After loading a dense checkpoint into an MSA model: initialise the index branch with
    the backend's method (``mean``: from the dense q/k projections; ``megatron``: fresh).
    Returns what was set; empty if the backend has no such function (logged)."""
    sw = _load()["switches"]
    if sw is None or not hasattr(sw, "init_index_from_dense"):
        log.warning("MSA backend %s has no init_index_from_dense: the index branch keeps its initialisation",
                    backend_name())
        return []
    return list(sw.init_index_from_dense(model_chunks, init))


def collect_metrics(reset: bool = True) -> Dict[str, float]:
    """MSA scalars since the last reset, reduced across ranks by the backend (all ranks call)."""
    sw = _load()["switches"]
    if sw is None:
        return {}
    return dict(sw.collect_msa_metrics(reset=reset))


__all__ = [
    "INDEX_PARAM_MARKER", "backend_available", "backend_name", "build_gpt_model", "collect_metrics",
    "is_index_param", "make_transformer_config", "require_backend", "set_attention_mode", "set_kl_coeff",
    "set_recall_sampling", "supports_kl_schedule",
]

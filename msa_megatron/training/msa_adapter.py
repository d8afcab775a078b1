"""The one place the trainer talks to the MSA backend (msa_megatron.megatron).

Every model, dense or MSA, is built by the backend (so the dense baseline and MSA runs
share one code path); at run time the trainer switches attention modes, recall sampling
and the KL coefficient, collects the MSA statistics, and initialises the index branch
after loading a dense checkpoint, all through the functions below.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any, Dict, List, Optional

from ..config import MSAConfig

log = logging.getLogger(__name__)

#: Parameters of the index branch are recognised by name (index_q, index_k, their norms).
INDEX_PARAM_MARKER = "index_"
BACKEND = "msa_megatron.megatron"

_backend: Optional[ModuleType] = None


def _load() -> ModuleType:
    """Import the backend once and register MSA with Megatron-Core."""
    global _backend
    if _backend is None:
        _backend = importlib.import_module(BACKEND)
        _backend.register()  # Megatron-Core accepts experimental_attention_variant='msa' from now on
    return _backend


def backend_name() -> str:
    return BACKEND


def is_index_param(name: str) -> bool:
    return INDEX_PARAM_MARKER in name


# --------------------------------------------------------------------------- building
def make_transformer_config(msa: Optional[MSAConfig], **kwargs):
    return _load().make_transformer_config(msa, **kwargs)


def build_gpt_model(config, vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                    post_process: bool = True, vp_stage: Optional[int] = None, use_te: bool = False, **gpt_kwargs):
    return _load().build_gpt_model(config, vocab_size, max_sequence_length, pre_process=pre_process,
                                   post_process=post_process, vp_stage=vp_stage, use_te=use_te, **gpt_kwargs)


def build_swa_gpt_model(config, window: int, swa_layers: List[int], vocab_size: int, max_sequence_length: int,
                        pre_process: bool = True, post_process: bool = True, use_te: bool = False, **gpt_kwargs):
    """Dense model with sliding-window attention in ``swa_layers`` (attention=swa)."""
    _load()
    swa = importlib.import_module(BACKEND + ".sliding_window")
    return swa.build_swa_gpt_model(config, window, swa_layers, vocab_size, max_sequence_length,
                                   pre_process=pre_process, post_process=post_process, use_te=use_te, **gpt_kwargs)


# --------------------------------------------------------------------------- run time
def set_attention_mode(model_chunks: List[Any], mode: str) -> None:
    _load().set_attention_mode(model_chunks, mode)


def set_recall_sampling(model_chunks: List[Any], enabled: bool) -> None:
    _load().set_recall_sampling(model_chunks, bool(enabled))


def set_kl_coeff(model_chunks: List[Any], coeff: float) -> None:
    """Run-time KL coefficient (attention.kl_schedule). The backend reads
    ``self.msa.kl_coeff`` on every forward of an MSA core attention; each gets an MSAConfig
    with the new coefficient (the backend's own set_kl_coeff is used once it has one)."""
    backend = _load()
    if hasattr(backend, "set_kl_coeff"):
        backend.set_kl_coeff(model_chunks, coeff)
        return
    modes = importlib.import_module(BACKEND + ".modes")
    for core in modes.msa_core_attentions(model_chunks):
        core.msa = core.msa.replace(kl_coeff=float(coeff))


def collect_metrics(reset: bool = True) -> Dict[str, float]:
    """MSA scalars since the last reset, reduced across all ranks (a collective)."""
    return dict(_load().collect_msa_metrics(reset=reset))


def init_index_from_dense(model_chunks: List[Any], init: str) -> List[Dict[str, Any]]:
    """After loading a dense checkpoint into an MSA model: initialise the index branch
    (``mean``: from the dense q/k projections; ``megatron``: fresh). Returns what was set."""
    return list(_load().init_index_from_dense(model_chunks, init))


__all__ = [
    "INDEX_PARAM_MARKER", "backend_name", "build_gpt_model", "build_swa_gpt_model", "collect_metrics", "init_index_from_dense",
    "is_index_param", "make_transformer_config", "set_attention_mode", "set_kl_coeff", "set_recall_sampling",
]

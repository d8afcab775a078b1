"""Run-time switches of MSA layers: attention mode, recall sampling, selection capture, KL coefficient, CP
select-first overlap.

They act on every MSA core attention in a model (or a list of model chunks, as Megatron's
schedules use with pipeline / virtual pipeline parallelism), without rebuilding anything.
Dense layers of an MSA model are unaffected. Modes:

* ``dense``: Megatron's own core attention; the index branch is idle (no KL, no metrics).
* ``msa_warmup``: main branch dense; the index branch learns from the dense teacher (KL
  over all causal tokens).
* ``msa``: main branch over the selected blocks; KL over the selected tokens.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Union

import torch

from .attention import MSACoreAttention, check_mode

ModelOrChunks = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def as_chunks(model_or_chunks: ModelOrChunks) -> List[torch.nn.Module]:
    """A model or a list of model chunks (Megatron's PP/VPP convention) as a list."""
    if isinstance(model_or_chunks, torch.nn.Module):
        return [model_or_chunks]
    return list(model_or_chunks)


def msa_core_attentions(model_or_chunks: ModelOrChunks) -> Iterator[MSACoreAttention]:
    """Every MSA core attention of the model (chunks), in module order."""
    for chunk in as_chunks(model_or_chunks):
        for module in chunk.modules():
            if isinstance(module, MSACoreAttention):
                yield module


def _set_on_every_layer(model_or_chunks: ModelOrChunks, attr: str, value) -> int:
    """Set one attribute on every MSA core attention; how many there were."""
    n = 0
    for core in msa_core_attentions(model_or_chunks):
        setattr(core, attr, value)
        n += 1
    return n


def set_attention_mode(model_or_chunks: ModelOrChunks, mode: str) -> int:
    """Switch every MSA layer to ``mode`` (dense | msa_warmup | msa); returns how many layers
    this process switched (0 is legal: a pipeline stage may hold only dense layers)."""
    check_mode(mode)
    return _set_on_every_layer(model_or_chunks, "mode", mode)


def get_attention_modes(model_or_chunks: ModelOrChunks) -> List[str]:
    """The mode of every MSA layer of this process, in module order."""
    return [core.mode for core in msa_core_attentions(model_or_chunks)]


def set_selection_recall_sampling(model_or_chunks: ModelOrChunks, enabled: bool) -> int:
    """Compute selection recall (an extra dense pass per MSA layer) while enabled; the trainer
    turns it on for the steps it samples. Returns how many layers were switched."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return _set_on_every_layer(model_or_chunks, "sample_recall", enabled)


def set_selection_capture(model_or_chunks: ModelOrChunks, store: Optional[list]) -> int:
    """Make every MSA layer append its selection of each forward to ``store`` (a list; see
    MSACoreAttention.capture_selection), or stop with None. The trainer's needle diagnostic
    (training/needle.py) reads it during the passkey probe. Returns how many layers were set."""
    if store is not None and not isinstance(store, list):
        raise TypeError(f"store must be a list or None, got {type(store).__name__}")
    return _set_on_every_layer(model_or_chunks, "capture_selection", store)


def set_kl_coeff(model_or_chunks: ModelOrChunks, coeff: float) -> int:
    """Set the KL coefficient of every MSA layer at run time (a KL schedule). Each core
    attention reads ``self.msa.kl_coeff`` on every forward, so it gets a copy of its
    MSAConfig with the new value (validated by MSAConfig). Returns how many were set."""
    n = 0
    for core in msa_core_attentions(model_or_chunks):
        core.msa = core.msa.replace(kl_coeff=float(coeff))
        n += 1
    return n


def set_cp_select_overlap(model_or_chunks: ModelOrChunks, enabled: bool) -> int:
    """Turn the select-first overlap under CP
    (:func:`~msa_megatron.megatron.context_parallel.gather_kv_and_select_for_cp`) on or off in
    every MSA core attention of a model (or list of chunks); returns how many were switched.
    Off by default; it only acts under CP. (Here, not in context_parallel.py, which the
    attention module imports: no import circle.)"""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    n = 0
    for core in msa_core_attentions(model_or_chunks):
        core.cp_select_first = enabled
        n += 1
    return n


__all__ = ["as_chunks", "get_attention_modes", "msa_core_attentions", "set_attention_mode", "set_cp_select_overlap",
           "set_kl_coeff", "set_selection_capture", "set_selection_recall_sampling"]

"""MSA as a Megatron-Core attention backend.

Public API (imported lazily: ``import msa_megatron.megatron`` does not import megatron-core)::

    register()                                     # Megatron-Core accepts experimental_attention_variant='msa'
    MSATransformerConfig                           # TransformerConfig + msa: MSAConfig
    make_transformer_config(msa, **kwargs)         # -> MSATransformerConfig (msa=None: dense)
    build_gpt_model(config, vocab_size, max_sequence_length, pre_process=True, post_process=True,
                    vp_stage=None, use_te=False, **gpt_kwargs) -> GPTModel
    set_attention_mode(model_or_chunks, mode)      # dense | msa_warmup | msa, at run time
    set_selection_recall_sampling(model_or_chunks, enabled)  # selection recall on sampled steps
    set_selection_capture(model_or_chunks, store)  # append each forward's block_idx to a list (None: off)
    set_kl_coeff(model_or_chunks, coeff)           # KL coefficient at run time (a KL schedule)
    collect_msa_metrics(reset=True) -> Dict[str, float]   # collective; see metrics.py for the keys
    save_model_checkpoint / load_model_checkpoint  # Megatron-Core dist checkpoints, any layout
    convert_dense_checkpoint(...)                  # dense checkpoint -> MSA model (CLI: msa-convert)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "register": "registry",
    "is_registered": "registry",
    "MSATransformerConfig": "transformer_config",
    "MSA_VARIANT": "transformer_config",
    "make_transformer_config": "model",
    "build_gpt_model": "model",
    "dense_config_of": "model",
    "set_attention_mode": "modes",
    "get_attention_modes": "modes",
    "set_selection_recall_sampling": "modes",
    "set_selection_capture": "modes",
    "set_kl_coeff": "modes",
    "collect_msa_metrics": "metrics",
    "reset_msa_metrics": "metrics",
    "MSAKLAutoScaler": "kl_loss",
    "MSASelfAttention": "attention",
    "MSACoreAttention": "attention",
    "MSAIndexer": "attention",
    "get_decoder_block_spec": "registry",
    "msa_layer_specs": "specs",
    "save_model_checkpoint": "checkpoint",
    "load_model_checkpoint": "checkpoint",
    "convert_dense_checkpoint": "convert",
    "init_index_from_dense": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Megatron-LM args -> the configs that build an MSA GPT with Megatron-LM's own model builder.

``transformer_config_from_args(args)`` gives an :class:`MSATransformerConfig` (``msa=None``: a
dense model of the same modules) through Megatron-LM's ``core_transformer_config_from_args(args,
config_class=MSATransformerConfig)``, or through ``core_transformer_config_from_yaml`` for
``--yaml-cfg`` runs (patched to return an MSATransformerConfig for the 'msa' variant).
``gpt_model_config_from_args(args)`` wraps it in Megatron-LM's ``GPTModelConfig``; its
``GPTModelBuilder`` calls Megatron-Core's experimental-variant block spec, which builds MSA
layers once :func:`msa_megatron.register` ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

from ..config import MSAConfig
from ..megatron.transformer_config import MSATransformerConfig


def transformer_config_from_args(args):
    """The model's TransformerConfig from parsed Megatron-LM args (command line or YAML)."""
    if getattr(args, "yaml_cfg", None) is not None:
        from megatron.training.yaml_arguments import core_transformer_config_from_yaml

        return core_transformer_config_from_yaml(args, "language_model")
    from megatron.training.argument_utils import core_transformer_config_from_args

    return core_transformer_config_from_args(args, config_class=MSATransformerConfig)


def gpt_model_config_from_args(args):
    """Megatron-LM's GPTModelConfig (what ``pretrain`` builds the model from) with the MSA config."""
    from megatron.training.argument_utils import gpt_config_from_args

    return gpt_config_from_args(args, config=transformer_config_from_args(args))


def as_msa_transformer_config(config, msa: Optional[Union[MSAConfig, Mapping[str, Any]]]) -> MSATransformerConfig:
    """The same model as a TransformerConfig ``config``, as an MSATransformerConfig with ``msa``
    (re-runs the config's validation, as ``dataclasses.replace`` does)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.pop("msa", None)
    return MSATransformerConfig(msa=msa, **values)


__all__ = ["as_msa_transformer_config", "gpt_model_config_from_args", "transformer_config_from_args"]

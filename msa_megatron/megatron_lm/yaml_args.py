"""MSA in Megatron-LM's YAML argument files (``--yaml-cfg``, ``megatron/training/yaml_arguments.py``).

In those files the TransformerConfig fields live under ``language_model:``; MSA follows that
layout, with the loop settings at the top level like ``train_iters``::

    language_model:
      experimental_attention_variant: msa
      msa: {block_size: 128, topk: 16, first_dense_layers: 3}   # MSAConfig fields ({} = defaults)
    msa_warmup_iters: 2000          # or msa_warmup_tokens; optional

:func:`finalize_yaml_args` (after Megatron's ``validate_yaml``) validates ``language_model.msa``
through MSAConfig (errors name the YAML key and the allowed values) and stores it as a plain
dict on both ``args.language_model.msa`` and ``args.msa``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from ..config import MSAConfig, MSAConfigError
from .args import MSA_VARIANT, MSAArgumentError, check_for_model, check_warmup

LM_KEY = "language_model"
LOOP_KEYS = ("msa_warmup_iters", "msa_warmup_tokens")


def _plain(value: Any) -> Any:
    """YAML namespaces (load_yaml turns every mapping into a SimpleNamespace) -> dicts/lists."""
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _yaml_name(field: str) -> str:
    return f"{LM_KEY}.msa.{field}"


def finalize_yaml_args(args) -> Optional[dict]:
    """Validate the MSA settings of a YAML run and set ``args.msa`` (dict, or None without MSA)."""
    lm = getattr(args, LM_KEY)
    variant = getattr(lm, "experimental_attention_variant", None)
    raw = getattr(lm, "msa", None)
    loop = {k: getattr(args, k) for k in LOOP_KEYS if getattr(args, k, None) is not None}
    if variant != MSA_VARIANT:
        if raw is not None or loop:
            name, value = (f"{LM_KEY}.msa", _plain(raw)) if raw is not None else next(iter(loop.items()))
            raise MSAArgumentError(name, value, f"unset unless {LM_KEY}.experimental_attention_variant is "
                                                f"{MSA_VARIANT!r} (it is {variant!r})")
        args.msa = None
        return None
    fields = _plain(raw) if raw is not None else {}
    if not isinstance(fields, dict):
        raise MSAArgumentError(f"{LM_KEY}.msa", fields, "a mapping of MSAConfig fields ({} for the defaults)")
    try:
        cfg = MSAConfig.from_dict(fields)  # unknown keys are errors too
    except MSAConfigError as exc:
        raise MSAArgumentError(_yaml_name(exc.field_name), exc.value, exc.allowed, exc.field_name) from None
    num_kv = lm.num_query_groups if getattr(lm, "num_query_groups", None) else lm.num_attention_heads
    check_for_model(cfg, lm.num_layers, num_kv, args.tensor_model_parallel_size, name_of=_yaml_name)
    check_warmup(getattr(args, "msa_warmup_iters", None), getattr(args, "msa_warmup_tokens", None),
                 "msa_warmup_iters", "msa_warmup_tokens")
    lm.msa = args.msa = cfg.to_dict()
    return args.msa


__all__ = ["LM_KEY", "LOOP_KEYS", "finalize_yaml_args"]

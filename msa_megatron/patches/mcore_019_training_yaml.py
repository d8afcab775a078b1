"""MSA in Megatron-LM's YAML argument files (``megatron.training.yaml_arguments``, megatron-core 0.19.x).

Wraps two module-level functions of ``megatron.training.yaml_arguments``:

* ``validate_yaml(args, defaults)``: after the upstream validation, validates
  ``language_model.msa`` (+ top-level ``msa_warmup_iters`` / ``msa_warmup_tokens``) and sets
  ``args.msa`` (msa_megatron.megatron_lm.yaml_args.finalize_yaml_args);
* ``core_transformer_config_from_yaml(args, key)``: for ``experimental_attention_variant: msa``
  returns the upstream config as an MSATransformerConfig carrying ``msa`` (upstream builds a plain
  TransformerConfig from TransformerConfig's fields only); other variants are unchanged.

Relied on (pinned): ``parse_and_validate_args`` imports ``validate_yaml`` from this module at call
time; ``load_yaml`` turns nested mappings into namespaces; ``core_config_from_args`` takes exactly
the TransformerConfig fields (so ``msa`` is not passed to TransformerConfig).
"""

from __future__ import annotations

import functools

from msa_megatron.patches.mcore_019_training_base import FunctionWrapPatch

TARGET = "megatron.training.yaml_arguments"

#: sha256 of the upstream sources this patch wraps or relies on (megatron-core 0.19.2).
PINNED = {
    f"{TARGET}:validate_yaml": "1a64a72978b8c0501983b15792011595f834ceebfac6b90b4ac01ab4ae8b6119",
    f"{TARGET}:core_transformer_config_from_yaml": "789f8a54bb04d0a6ea53663b160290b24d3a8fc4f9166e11d3fb52c29dd38ed7",
    f"{TARGET}:core_config_from_args": "fc11818be6cd892feeb8a50ceac0ba484e9ef9427e2071d97f0a12bb4347357a",
    f"{TARGET}:load_yaml": "da37783171288be0d5b807ddf70a9ef98b4b279c5f79a07a719f24efc38fe0c9",
    "megatron.training.arguments:parse_and_validate_args":
        "c2bc7af545b664d352dab688df4908a0ce02f5307a934facc81d3579a85786cd",
}
SOURCE_CHECKS = (
    ("megatron.training.arguments:parse_and_validate_args", "from megatron.training.yaml_arguments import validate_yaml"),
    (f"{TARGET}:core_transformer_config_from_yaml", "kw_args = core_config_from_args(args, TransformerConfig)"),
)


def _validate_yaml(original):
    @functools.wraps(original)
    def wrapper(args, defaults={}):  # noqa: B006 - upstream's signature
        from msa_megatron.megatron_lm.yaml_args import finalize_yaml_args

        args = original(args, defaults)
        finalize_yaml_args(args)
        return args

    return wrapper


def _config_from_yaml(original):
    @functools.wraps(original)
    def wrapper(args, transfomer_key="language_model"):  # upstream's parameter name
        from msa_megatron.megatron_lm.args import MSA_VARIANT
        from msa_megatron.megatron_lm.model import as_msa_transformer_config

        config = original(args, transfomer_key)
        section = getattr(args, transfomer_key)
        if getattr(section, "experimental_attention_variant", None) != MSA_VARIANT:
            return config
        msa = getattr(section, "msa", None)
        if not isinstance(msa, dict):
            raise RuntimeError(f"{transfomer_key}.msa is not validated ({type(msa).__name__}): parse YAML arguments "
                               "through megatron.training.arguments.parse_and_validate_args after "
                               "msa_megatron.megatron_lm.install()")
        return as_msa_transformer_config(config, msa)

    return wrapper


PATCH = FunctionWrapPatch(
    "msa_megatron.patches.mcore_019_training_yaml", TARGET,
    {"validate_yaml": _validate_yaml, "core_transformer_config_from_yaml": _config_from_yaml},
    PINNED, SOURCE_CHECKS,
)
apply, remove, is_applied, verify_upstream, upstream = (
    PATCH.apply, PATCH.remove, PATCH.is_applied, PATCH.verify_upstream, PATCH.upstream)

__all__ = ["PATCH", "PINNED", "SOURCE_CHECKS", "TARGET", "apply", "is_applied", "remove", "upstream",
           "verify_upstream"]

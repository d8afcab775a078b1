"""MSA on Megatron-LM's command line (``megatron.training.arguments``, megatron-core 0.19.x).

Wraps two module-level functions of ``megatron.training.arguments``:

* ``_add_experimental_attention_variant_args(parser)``: after the upstream group, adds
  ``'msa'`` to the choices of ``--experimental-attention-variant`` (generated earlier from
  ``TransformerConfig.experimental_attention_variant``'s Literal by ``_add_network_size_args``)
  and the ``msa`` group of ``--msa-*`` flags (msa_megatron.megatron_lm.args, generated from
  MSAConfig). It also escapes the bare '%' of ``--moe-paged-stash-buffer-size-factor-cuda``'s
  help (added earlier by ``_add_moe_args``), which makes ``--help`` of every Megatron-LM
  0.19.2 script raise ValueError;
* ``validate_args(args, defaults)``: after the upstream validation, builds ``args.msa`` from the
  flags (msa_megatron.megatron_lm.args.finalize_args) and, for an MSA run, builds the
  MSATransformerConfig once through ``core_transformer_config_from_args`` and checks the
  sequence length against its CP/SP layout, so that these checks (e.g. ``--attention-dropout 0``,
  ``--seq-length`` a multiple of 2 x CP) fail here, naming the flag, instead of later on every rank.

Relied on (pinned): ``add_megatron_arguments`` calls ``_add_experimental_attention_variant_args``
after ``_add_network_size_args`` and ``_add_moe_args`` through module globals; ``parse_and_validate_args`` calls
``validate_args`` through module globals (YAML runs go to ``validate_yaml`` instead, see
``mcore_019_training_yaml``); ``core_transformer_config_from_args`` copies ``args.msa`` into the
config by field name.
"""

from __future__ import annotations

import functools

from msa_megatron.patches.mcore_019_training_base import FunctionWrapPatch

TARGET = "megatron.training.arguments"

#: sha256 of the upstream sources this patch wraps or relies on (megatron-core 0.19.2).
PINNED = {
    f"{TARGET}:_add_experimental_attention_variant_args": "1634d764b42c8d0aacbce1c121e0d3f6c27513750ff60e4233126d5604e7a56c",
    f"{TARGET}:validate_args": "47bfcd3af0d8687f2ec8cfa0f5ccf8be95a731bbb0afaec05b436aae20c06b7d",
    f"{TARGET}:add_megatron_arguments": "580b80fbe5867b22ace53750fe322094d15f121af43c109df40cb2c95f0f4edc",
    f"{TARGET}:parse_and_validate_args": "c2bc7af545b664d352dab688df4908a0ce02f5307a934facc81d3579a85786cd",
    "megatron.training.argument_utils:core_transformer_config_from_args":
        "da0875d8cc0ce55c5040d240dc00e7d731467ffb06965a6331c348e23dd9ebd0",
}
SOURCE_CHECKS = (
    (f"{TARGET}:add_megatron_arguments", "parser = _add_experimental_attention_variant_args(parser)"),
    (f"{TARGET}:add_megatron_arguments", "parser = _add_moe_args(parser)"),
    (f"{TARGET}:parse_and_validate_args", "validate_args(args, args_defaults)"),
    ("megatron.training.argument_utils:core_transformer_config_from_args", "kw_args[f.name] = getattr(args, f.name)"),
)


def _variant_args(original):
    @functools.wraps(original)
    def wrapper(parser):
        from msa_megatron.megatron_lm.args import add_msa_arguments, allow_msa_variant, repair_help_strings

        parser = original(parser)
        allow_msa_variant(parser)
        repair_help_strings(parser)  # upstream's --help crashes on a bare '%' (see the docstring)
        return add_msa_arguments(parser)

    return wrapper


def _validate_args(original):
    @functools.wraps(original)
    def wrapper(args, defaults={}):  # noqa: B006 - upstream's signature
        from msa_megatron.megatron_lm.args import explain_config_error, finalize_args
        from msa_megatron.megatron_lm.model import transformer_config_from_args

        result = original(args, defaults)
        if finalize_args(args) is not None:
            try:
                config = transformer_config_from_args(args)
                config.validate_sequence_length(args.seq_length)  # CP / SP split of the sequence
            except Exception as exc:
                restated = explain_config_error(exc, args)  # names the flag to change, when it can
                if restated is exc:
                    raise
                raise restated from exc
        return result

    return wrapper


PATCH = FunctionWrapPatch(
    "msa_megatron.patches.mcore_019_training_args", TARGET,
    {"_add_experimental_attention_variant_args": _variant_args, "validate_args": _validate_args},
    PINNED, SOURCE_CHECKS,
)
apply, remove, is_applied, verify_upstream, upstream = (
    PATCH.apply, PATCH.remove, PATCH.is_applied, PATCH.verify_upstream, PATCH.upstream)

__all__ = ["PATCH", "PINNED", "SOURCE_CHECKS", "TARGET", "apply", "is_applied", "remove", "upstream",
           "verify_upstream"]

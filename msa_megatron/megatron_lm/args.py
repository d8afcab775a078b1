"""Megatron-LM command-line flags for MSA, generated from :class:`~msa_megatron.config.MSAConfig`.

Every MSAConfig field ``f`` becomes ``--msa-f`` (``msa_layers`` stays ``--msa-layers``), dest
``msa_f``, default ``None`` (= not given: MSAConfig's own default applies, so defaults live in one
place). Two loop settings that are not MSAConfig fields sit beside them: ``--msa-warmup-iters``
and ``--msa-warmup-tokens`` (see :mod:`msa_megatron.megatron_lm.schedule`).

Upstream names (Megatron-LM PR #5336, :mod:`msa_megatron.upstream_names`): ``--msa-block-size``
is already ours; ``--msa-num-selected-blocks``, ``--msa-indexer-head-dim``, ``--msa-loss-coeff`` and
``--msa-warmup`` are accepted as aliases of ``--msa-topk``, ``--msa-index-dim``, ``--msa-kl-coeff``
and ``--msa-mode msa_warmup`` (:data:`UPSTREAM_FLAGS`); giving both spellings with different values
is one error naming both flags.

After Megatron's ``validate_args``, :func:`finalize_args` builds the MSAConfig from the given
flags and stores it as the plain dict ``args.msa`` (a dict, so the args pickled into checkpoints
and the wandb config stay free of project classes). ``core_transformer_config_from_args(args,
config_class=MSATransformerConfig)`` copies ``args.msa`` by field name. Every error names the flag
and the values it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..config import ATTENTION_MODES, BACKENDS, ConfigError, MSAConfig, MSAConfigError
from ..upstream_names import ALIASES, UPSTREAM_PR, alias_origin, fold_upstream

#: Value of ``--experimental-attention-variant`` that selects MSA.
MSA_VARIANT = "msa"
VARIANT_DEST = "experimental_attention_variant"

#: Fields whose allowed values are a fixed list (shown by --help, checked by argparse).
_CHOICES = {"mode": ATTENTION_MODES, "backend": BACKENDS}


class MSAArgumentError(ConfigError):
    """An MSA setting given to Megatron-LM (flag or YAML key) holds a value it does not accept.
    ``field`` (as in every :class:`~msa_megatron.config.ConfigError`) is the flag or key;
    ``msa_field`` the MSAConfig field behind it, if any (named in the message)."""

    def __init__(self, name: str, value: Any, allowed: str, field: Optional[str] = None):
        self.name, self.msa_field = name, field
        super().__init__(name, value, allowed)

    def _message(self) -> str:
        known = self.msa_field is not None and self.msa_field in {f.name for f in dataclasses.fields(MSAConfig)}
        where = f" (MSAConfig.{self.msa_field})" if known else ""
        return f"{self.name}={self.value!r} is invalid{where}: allowed values are {self.allowed}"


@dataclass(frozen=True)
class Flag:
    """One MSA command-line flag."""

    dest: str
    option: str
    field: Optional[str]  # MSAConfig field, None for loop settings
    kwargs: Dict[str, Any]


def _dest_of(field_name: str) -> str:
    return field_name if field_name.startswith("msa_") else "msa_" + field_name


def _field_comments() -> Dict[str, str]:
    """``#:`` comments above MSAConfig fields: the --help text, kept with the field."""
    comments: Dict[str, str] = {}
    pending: List[str] = []
    for line in inspect.getsource(MSAConfig).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _kwargs_for(name: str, hint: Any, default: Any, comment: str) -> Dict[str, Any]:
    """argparse keyword arguments for one MSAConfig field (type from its annotation)."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in params:  # Optional[X] -> X (None = not given)
        inner = [p for p in params if p is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
        origin, params = typing.get_origin(hint), typing.get_args(hint)
    help_text = f"{comment} " if comment else ""
    help_text += f"MSAConfig.{name}; default {default!r}."
    kwargs: Dict[str, Any] = {"default": None, "help": help_text}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif hint in (int, float, str):
        kwargs["type"] = hint
        if name in _CHOICES:
            kwargs["choices"] = tuple(_CHOICES[name])
    elif origin in (list, List) and params in ((int,), (str,)):
        kwargs.update(type=params[0], nargs="+")
    else:
        raise TypeError(f"MSAConfig.{name} has type {hint!r}, which has no command-line form: "
                        "teach msa_megatron/megatron_lm/args.py about it")
    return kwargs


def _build_flags() -> Tuple[Flag, ...]:
    hints = typing.get_type_hints(MSAConfig)
    comments = _field_comments()
    flags = []
    for f in dataclasses.fields(MSAConfig):
        dest = _dest_of(f.name)
        flags.append(Flag(dest, "--" + dest.replace("_", "-"), f.name,
                          _kwargs_for(f.name, hints[f.name], f.default, comments.get(f.name, ""))))
    flags.append(Flag("msa_warmup_iters", "--msa-warmup-iters", None, dict(
        type=int, default=None,
        help="Run attention mode msa_warmup (dense main branch, indexer distilled from the dense teacher) "
             "for iterations 1..N, then --msa-mode. Exclusive with --msa-warmup-tokens.")))
    flags.append(Flag("msa_warmup_tokens", "--msa-warmup-tokens", None, dict(
        type=int, default=None,
        help="Like --msa-warmup-iters, counted in training tokens (consumed samples x seq length; "
             "the paper: 40B of 3T). Exclusive with --msa-warmup-iters.")))
    dests = [fl.dest for fl in flags]
    if len(set(dests)) != len(dests):
        raise RuntimeError(f"MSA flag names collide: {dests}")
    return tuple(flags)


FLAGS: Tuple[Flag, ...] = _build_flags()
FIELD_FLAGS: Tuple[Flag, ...] = tuple(fl for fl in FLAGS if fl.field is not None)
LOOP_FLAGS: Tuple[Flag, ...] = tuple(fl for fl in FLAGS if fl.field is None)
_OPTION_OF_FIELD = {fl.field: fl.option for fl in FIELD_FLAGS}


def option_of_field(field_name: str) -> str:
    """The flag of an MSAConfig field (``block_size`` -> ``--msa-block-size``)."""
    return _OPTION_OF_FIELD[field_name]


def _upstream_flags() -> Tuple[Flag, ...]:
    """Aliases for the upstream flat names whose flag is not already ours (``--msa-block-size`` is)."""
    ours = {fl.dest for fl in FLAGS}
    flags = []
    for a in ALIASES:
        if a.name in ours:
            continue
        if a.name == "msa_warmup":
            kwargs: Dict[str, Any] = dict(action="store_true", default=None)
        else:
            kwargs = dict(type=type(getattr(MSAConfig(), a.field)), default=None)
        kwargs["help"] = f"{a.help} Upstream name ({UPSTREAM_PR}) of {option_of_field(a.field)}" + (
            " msa_warmup." if a.name == "msa_warmup" else ".")
        flags.append(Flag(a.name, a.option, a.field, kwargs))
    return tuple(flags)


#: Upstream-name aliases (not in FLAGS: they set the same MSAConfig fields as FIELD_FLAGS).
UPSTREAM_FLAGS: Tuple[Flag, ...] = _upstream_flags()


# ----------------------------------------------------------------------------- parser
def add_msa_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``msa`` argument group (idempotent per parser)."""
    if any(a.dest == FLAGS[0].dest for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="msa", description="MiniMax Sparse Attention (used with --experimental-attention-variant msa)")
    for fl in FLAGS + UPSTREAM_FLAGS:
        group.add_argument(fl.option, dest=fl.dest, **fl.kwargs)
    return parser


def allow_msa_variant(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add 'msa' to the choices of Megatron's ``--experimental-attention-variant``."""
    actions = [a for a in parser._actions if a.dest == VARIANT_DEST]
    if len(actions) != 1 or not actions[0].choices:
        raise RuntimeError(f"Megatron-LM's parser has no single --experimental-attention-variant with choices "
                           f"(found {len(actions)}): the MSA argument patch needs re-checking")
    action = actions[0]
    if MSA_VARIANT not in action.choices:
        action.choices = tuple(action.choices) + (MSA_VARIANT,)
    return parser


_BARE_PERCENT = re.compile(r"%(?![(%])")


def repair_help_strings(parser: argparse.ArgumentParser) -> List[str]:
    """Escape bare '%' in help strings that break ``--help``; returns the options repaired.

    argparse %-formats every help string; megatron-core 0.19.2's
    ``--moe-paged-stash-buffer-size-factor-cuda`` help ends in "10%)", so ``--help`` of any
    Megatron-LM script raises ValueError. Only strings that fail to format are touched."""
    repaired = []
    for action in parser._actions:
        if not action.help or action.help is argparse.SUPPRESS:
            continue
        try:
            action.help % dict(vars(action), prog=parser.prog)
        except (ValueError, TypeError, KeyError):
            action.help = _BARE_PERCENT.sub("%%", action.help)
            repaired.extend(action.option_strings[:1])
    return repaired


# ----------------------------------------------------------------------------- validation
def given_msa_fields(args) -> Dict[str, Any]:
    """MSAConfig fields set on the command line (flags left at None are not given)."""
    return {fl.field: getattr(args, fl.dest) for fl in FIELD_FLAGS if getattr(args, fl.dest, None) is not None}


def msa_config_from_fields(fields: Dict[str, Any], name_of=option_of_field) -> MSAConfig:
    """MSAConfig from given fields; a validation error names the setting (``name_of(field)``)."""
    try:
        return MSAConfig(**fields)
    except MSAConfigError as exc:
        raise MSAArgumentError(name_of(exc.field_name), exc.value, exc.allowed, exc.field_name) from None


def num_kv_heads_of(args) -> int:
    """Megatron-LM's rule: KV heads are --num-query-groups only with --group-query-attention."""
    if args.group_query_attention and args.num_query_groups is not None:
        return args.num_query_groups
    return args.num_attention_heads


def check_for_model(cfg: MSAConfig, num_layers: int, num_kv_heads: int, tp: int, name_of=option_of_field) -> None:
    try:
        cfg.validate_for_model(num_layers, num_kv_heads, tp)
    except MSAConfigError as exc:
        raise MSAArgumentError(name_of(exc.field_name), exc.value, exc.allowed, exc.field_name) from None


def check_warmup(iters: Any, tokens: Any, iters_name: str, tokens_name: str) -> None:
    for name, value in ((iters_name, iters), (tokens_name, tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise MSAArgumentError(name, value, "an integer >= 0")
    if iters is not None and tokens is not None:
        raise MSAArgumentError(tokens_name, tokens, f"unset when {iters_name} is given (one of the two)")


def finalize_args(args) -> Optional[dict]:
    """After Megatron's validate_args: set ``args.msa`` (dict of MSAConfig fields, or None).

    MSA flags without ``--experimental-attention-variant msa`` are an error (they would be
    silently ignored otherwise)."""
    given = given_msa_fields(args)
    loop = {fl.option: getattr(args, fl.dest) for fl in LOOP_FLAGS if getattr(args, fl.dest, None) is not None}
    upstream = {fl.dest: getattr(args, fl.dest, None) for fl in UPSTREAM_FLAGS}
    variant = getattr(args, VARIANT_DEST, None)
    if variant != MSA_VARIANT:
        named = {**{option_of_field(f): v for f, v in given.items()},
                 **{fl.option: upstream[fl.dest] for fl in UPSTREAM_FLAGS if upstream[fl.dest] is not None}, **loop}
        if named:
            name, value = next(iter(named.items()))
            raise MSAArgumentError(name, value, f"unset unless --experimental-attention-variant {MSA_VARIANT} "
                                                f"(it is {variant!r})")
        args.msa = None
        return None
    try:
        given = fold_upstream(given, upstream, name_of_field=option_of_field, name_of_alias=lambda a: a.option)
    except MSAConfigError as exc:  # --msa-warmup with a non-bool (YAML-set args)
        raise MSAArgumentError("--msa-warmup", exc.value, "true or false") from None
    origin = alias_origin(upstream)

    def name_of(field_name: str) -> str:  # errors name the flag the user gave
        return origin[field_name].option if field_name in origin else option_of_field(field_name)

    cfg = msa_config_from_fields(given, name_of=name_of)
    check_for_model(cfg, args.num_layers, num_kv_heads_of(args), args.tensor_model_parallel_size, name_of=name_of)
    check_warmup(args.msa_warmup_iters, args.msa_warmup_tokens, "--msa-warmup-iters", "--msa-warmup-tokens")
    args.msa = cfg.to_dict()
    return args.msa


def flag_of_transformer_field(name: str) -> str:
    """Megatron-LM's flag for a TransformerConfig field (its factory's naming rule)."""
    return "--" + name.replace("_", "-")


_FIELD_IN_MESSAGE = re.compile(r"^(\w+)=")


def explain_config_error(exc: Exception, args) -> Exception:
    """An error raised while building the MSA TransformerConfig, restated with the flag to change."""
    if isinstance(exc, MSAConfigError) and exc.field_name in _OPTION_OF_FIELD:
        return MSAArgumentError(option_of_field(exc.field_name), exc.value, exc.allowed, exc.field_name)
    match = _FIELD_IN_MESSAGE.match(str(exc))
    if isinstance(exc, ValueError) and match and hasattr(args, match.group(1)):
        return ValueError(f"{flag_of_transformer_field(match.group(1))}: {exc}")
    return exc


__all__ = [
    "FIELD_FLAGS", "FLAGS", "Flag", "LOOP_FLAGS", "MSAArgumentError", "MSA_VARIANT", "add_msa_arguments",
    "allow_msa_variant", "check_for_model", "check_warmup", "explain_config_error", "finalize_args",
    "flag_of_transformer_field", "given_msa_fields", "msa_config_from_fields", "num_kv_heads_of", "option_of_field",
    "repair_help_strings", "UPSTREAM_FLAGS",
]

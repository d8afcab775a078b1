"""The flat ``msa_*`` names of the upstream Megatron-LM proposal, mapped onto :class:`MSAConfig`.

Megatron-LM pull request #5336 ("Add experimental MiniMax Sparse Attention (MSA) backend",
open) registers the same variant key ``experimental_attention_variant='msa'`` with five flat
TransformerConfig fields. A config written for it should load here, so those names are
accepted as aliases: as ``MSATransformerConfig`` keyword arguments
(:mod:`msa_megatron.megatron.transformer_config`) and as Megatron-LM flags
(:mod:`msa_megatron.megatron_lm.args`). The nested ``msa`` config stays the one source of
truth: aliases are folded into it, and an alias that disagrees with the native setting is
one error naming both.

| upstream (PR #5336)       | MSAConfig field | note |
|---------------------------|-----------------|------|
| ``msa_block_size``        | ``block_size``  | same name as our flag ``--msa-block-size`` |
| ``msa_num_selected_blocks`` | ``topk``      | blocks kept per query and KV group, the local block included |
| ``msa_indexer_head_dim``  | ``index_dim``   | |
| ``msa_loss_coeff``        | ``kl_coeff``    | |
| ``msa_warmup`` (bool)     | ``mode``        | True -> ``'msa_warmup'`` (dense main branch, indexer distilled); False -> ``'msa'`` |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping

from .config import MSAConfigError

UPSTREAM_PR = "Megatron-LM PR #5336"


@dataclass(frozen=True)
class UpstreamName:
    """One upstream flat field: its name (TransformerConfig field and flag dest) and our field."""

    name: str
    field: str
    help: str

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


ALIASES = (
    UpstreamName("msa_block_size", "block_size", "Tokens per key block."),
    UpstreamName("msa_num_selected_blocks", "topk", "Key blocks kept per query and KV group (the local block included)."),
    UpstreamName("msa_indexer_head_dim", "index_dim", "Head dimension of the index branch."),
    UpstreamName("msa_loss_coeff", "kl_coeff", "Coefficient of the indexer KL loss."),
    UpstreamName("msa_warmup", "mode", "Warmup: dense main branch while the indexer is distilled "
                                       "(True = mode msa_warmup, False = mode msa)."),
)
BY_NAME: Dict[str, UpstreamName] = {a.name: a for a in ALIASES}


def _ours(alias: UpstreamName, value: Any) -> Any:
    """The MSAConfig value of an upstream value (only msa_warmup changes form)."""
    if alias.name != "msa_warmup":
        return value
    if not isinstance(value, bool):
        raise MSAConfigError("mode", value, f"true or false for {alias.name} ({UPSTREAM_PR})")
    return "msa_warmup" if value else "msa"


def fold_upstream(fields: Mapping[str, Any], upstream: Mapping[str, Any],
                  name_of_field: Callable[[str], str] = lambda f: f"msa.{f}",
                  name_of_alias: Callable[[UpstreamName], str] = lambda a: a.name) -> Dict[str, Any]:
    """MSAConfig fields ``fields`` plus the upstream values in ``upstream`` (None = not given).

    A value given both ways must agree, else one ValueError naming both settings. ``msa_warmup``
    agrees with a given ``mode`` when ``(mode == 'msa_warmup') == msa_warmup``."""
    out = dict(fields)
    for name, value in upstream.items():
        if value is None:
            continue
        if name not in BY_NAME:
            raise ValueError(f"{name} is not an upstream MSA name: allowed names are {', '.join(BY_NAME)}")
        alias = BY_NAME[name]
        ours = _ours(alias, value)
        if alias.field in out and out[alias.field] is not None:
            mine = out[alias.field]
            agree = (mine == "msa_warmup") == value if alias.name == "msa_warmup" else mine == ours
            if not agree:
                raise ValueError(
                    f"{name_of_alias(alias)}={value!r} conflicts with {name_of_field(alias.field)}={mine!r}: both set "
                    f"MSAConfig.{alias.field} (the first is the upstream name, {UPSTREAM_PR}); give one of them")
            continue
        out[alias.field] = ours
    return out


def alias_origin(upstream: Mapping[str, Any]) -> Dict[str, UpstreamName]:
    """MSAConfig field -> the alias that set it (for error messages that name what the user typed)."""
    return {BY_NAME[n].field: BY_NAME[n] for n, v in upstream.items() if v is not None and n in BY_NAME}


def name_for_error(field: str, origin: Mapping[str, UpstreamName], native: Callable[[str], str],
                   alias_name: Callable[[UpstreamName], str]) -> str:
    return alias_name(origin[field]) if field in origin else native(field)


__all__ = ["ALIASES", "BY_NAME", "UPSTREAM_PR", "UpstreamName", "alias_origin", "fold_upstream", "name_for_error"]


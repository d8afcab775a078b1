"""MSATransformerConfig: Megatron's TransformerConfig carrying the one MSAConfig.

``msa`` (an :class:`~msa_megatron.config.MSAConfig`, or a mapping of its fields) is the
single source of MSA settings; everything else is Megatron's. With ``msa`` set the config
selects Megatron-Core's experimental attention variant ``'msa'`` (registered by
:func:`msa_megatron.megatron.registry.register`), points the schedules' loss-scale hook at
the KL auto-scaler and validates MSA against the model. ``dataclasses.replace`` keeps
``msa`` and re-validates; Megatron-LM's ``core_transformer_config_from_args(args,
config_class=MSATransformerConfig)`` can build it from flat arguments.

Upstream names: the flat fields of Megatron-LM PR #5336 (``msa_block_size``,
``msa_num_selected_blocks``, ``msa_indexer_head_dim``, ``msa_loss_coeff``, ``msa_warmup``) are
accepted as keyword arguments (:mod:`msa_megatron.upstream_names`): with
``experimental_attention_variant='msa'`` they build or complete ``msa``; a value that disagrees
with ``msa`` is one error naming both. They are inputs only: after construction they read None
and ``msa`` holds the values (so ``dataclasses.replace`` cannot re-apply stale ones).

Note: ``TransformerConfig.experimental_attention_variant`` is typed
``Literal['gated_delta_net', 'dsa']`` but not checked at run time in megatron-core 0.19,
so ``'msa'`` passes (tests/megatron/test_config.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import MSAConfig, MSAConfigError
from ..upstream_names import ALIASES, alias_origin, fold_upstream
from .kl_loss import MSAKLAutoScaler

#: Value of TransformerConfig.experimental_attention_variant that selects MSA.
MSA_VARIANT = "msa"
#: Keys of ``rope_llama3_scaling`` (Hugging Face's rope_type 'llama3' parameters).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class MSATransformerConfig(TransformerConfig):
    """TransformerConfig + ``msa``. ``msa=None`` is a plain dense model."""

    msa: Optional[MSAConfig] = None
    #: Upstream flat names (Megatron-LM PR #5336), folded into ``msa`` and reset to None.
    msa_block_size: Optional[int] = None
    msa_num_selected_blocks: Optional[int] = None
    msa_indexer_head_dim: Optional[int] = None
    msa_loss_coeff: Optional[float] = None
    msa_warmup: Optional[bool] = None
    #: Llama 3.x RoPE frequency scaling: {factor, low_freq_factor, high_freq_factor,
    #: original_max_position_embeddings}; build_gpt_model applies it to the model's RoPE.
    rope_llama3_scaling: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        self._validate_rope_scaling()
        self._fold_upstream_names()
        if isinstance(self.msa, Mapping):
            self.msa = MSAConfig.from_dict(self.msa)
        if self.msa is not None and not isinstance(self.msa, MSAConfig):
            raise MSAConfigError("msa", self.msa, "an MSAConfig, a mapping of its fields, or null")
        if self.msa is not None:
            if self.experimental_attention_variant not in (None, MSA_VARIANT):
                raise ValueError(
                    f"experimental_attention_variant={self.experimental_attention_variant!r} conflicts with msa: "
                    f"allowed values are None or {MSA_VARIANT!r} when msa is set"
                )
            self.experimental_attention_variant = MSA_VARIANT
        elif self.experimental_attention_variant == MSA_VARIANT:
            raise MSAConfigError("msa", None, "an MSAConfig when experimental_attention_variant='msa'")
        super().__post_init__()
        if self.msa is not None:
            self._validate_msa()

    def _validate_rope_scaling(self) -> None:
        spec = self.rope_llama3_scaling
        if spec is None:
            return
        if not isinstance(spec, Mapping) or sorted(spec) != sorted(LLAMA3_ROPE_KEYS):
            raise ValueError(f"rope_llama3_scaling={spec!r} is invalid: allowed values are null or a mapping with exactly "
                             f"the keys {', '.join(LLAMA3_ROPE_KEYS)}")
        spec = {k: float(spec[k]) for k in LLAMA3_ROPE_KEYS}
        if not (spec["factor"] > 0 and 0 < spec["low_freq_factor"] < spec["high_freq_factor"]
                and spec["original_max_position_embeddings"] > 0):
            raise ValueError(f"rope_llama3_scaling={spec!r} is invalid: allowed values are factor > 0, "
                             "0 < low_freq_factor < high_freq_factor, original_max_position_embeddings > 0")
        self.rope_llama3_scaling = spec

    def _fold_upstream_names(self) -> None:
        upstream = {a.name: getattr(self, a.name) for a in ALIASES}
        if all(v is None for v in upstream.values()):
            return
        given = ", ".join(f"{n}={v!r}" for n, v in upstream.items() if v is not None)
        if self.experimental_attention_variant != MSA_VARIANT:
            raise ValueError(f"{given} set with experimental_attention_variant={self.experimental_attention_variant!r}: "
                             f"allowed value is {MSA_VARIANT!r} (the upstream MSA fields only apply to the msa variant)")
        if isinstance(self.msa, MSAConfig):
            fields = self.msa.to_dict()
        elif isinstance(self.msa, Mapping):
            fields = dict(self.msa)
        elif self.msa is None:
            fields = {}
        else:
            raise MSAConfigError("msa", self.msa, "an MSAConfig, a mapping of its fields, or null")
        merged = fold_upstream(fields, upstream)
        origin = alias_origin(upstream)
        try:
            self.msa = MSAConfig.from_dict(merged)
        except MSAConfigError as exc:  # name what the user wrote (the upstream name), not our field
            if exc.field_name in origin:
                a = origin[exc.field_name]
                raise ValueError(f"{a.name}={upstream[a.name]!r} is invalid (MSAConfig.{a.field}): allowed values are "
                                 f"{exc.allowed}") from None
            raise
        for name in upstream:
            setattr(self, name, None)

    def _validate_msa(self) -> None:
        tp = self.tensor_model_parallel_size
        self.msa = self.msa.validate().for_model(self.num_layers, self.num_query_groups, tp)
        unsupported = {
            "multi_latent_attention": (self.multi_latent_attention, False, "MSA is built on GQA attention"),
            "attention_dropout": (self.attention_dropout, 0.0, "the MSA op has no attention dropout"),
            "softmax_type": (self.softmax_type, "vanilla", "the MSA op computes a plain softmax"),
            "window_size": (self.window_size, None, "MSA replaces sliding windows"),
        }
        if self.context_parallel_size > 1:
            unsupported["hybrid_context_parallel"] = (
                self.hybrid_context_parallel, False,
                "MSA layers need Megatron's static load-balanced CP split (chunks r and 2*cp-1-r)")
        for name, (value, allowed, why) in unsupported.items():
            if value != allowed:
                raise ValueError(f"{name}={value!r} is not supported with msa ({why}): allowed value is {allowed!r}")
        if self.context_parallel_size > 1:
            self._validate_msa_cp_comm_type()
        if self.experimental_attention_variant_loss_scale_func is None:
            self.experimental_attention_variant_loss_scale_func = MSAKLAutoScaler.set_loss_scale
        # Index parameters exist only in MSA layers, so stacking layers into one checkpoint
        # tensor would leave holes: MSA checkpoints use per-layer keys.
        self.hetereogenous_dist_checkpoint = True

    def _validate_msa_cp_comm_type(self) -> None:
        """MSA layers exchange K/V by all-gather (docs/context_parallel.md); a per-layer
        ``cp_comm_type`` may choose anything for the dense layers (TE), not for MSA layers."""
        types = self.cp_comm_type if isinstance(self.cp_comm_type, list) else [self.cp_comm_type] * self.num_layers
        for i in range(self.num_layers):
            t = types[i] if i < len(types) else None
            if self.msa.is_msa_layer(i) and t is not None and t.replace("_", "").lower() != "allgather":
                raise ValueError(
                    f"cp_comm_type={self.cp_comm_type!r} is not supported with msa: MSA layer {i} all-gathers its "
                    "keys over the CP group; allowed values for MSA layers are None or 'all_gather' (a per-layer "
                    "list may give the dense layers another type)")

    def validate_sequence_length(self, seq_length: int) -> int:
        """Check the training sequence length against this config's CP / TP / SP layout
        (one clear error); returns the tokens per CP rank. The sequence length lives in the
        trainer's data config, so the trainer calls this once at start-up."""
        from .context_parallel import validate_cp_sequence_length

        return validate_cp_sequence_length(seq_length, self.context_parallel_size, self.msa,
                                           tp=self.tensor_model_parallel_size,
                                           sequence_parallel=self.sequence_parallel)

    @property
    def msa_layer_indices(self):
        """0-based global indices of the MSA layers (empty for a dense config)."""
        if self.msa is None:
            return []
        return [i for i in range(self.num_layers) if self.msa.is_msa_layer(i)]


__all__ = ["MSA_VARIANT", "MSATransformerConfig"]

"""Validated MSA settings: the one source of truth read by the reference, the kernels,
the Megatron-Core backend, the hydra launcher and the Megatron-LM flags.

Every invalid value raises :class:`MSAConfigError` (a :class:`ConfigError`, the package's
one config error), whose message names the field and the values it accepts, so a bad YAML key or CLI flag fails with one readable line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence

#: Attention modes switchable at run time without rebuilding the model.
#: ``dense``: plain causal attention, index branch idle.
#: ``msa_warmup``: main branch dense, index branch distilled from the dense teacher.
#: ``msa``: main branch over the selected blocks, KL over the selected tokens.
ATTENTION_MODES = ("dense", "msa_warmup", "msa")

#: Where the MSA op runs. ``auto``: Triton kernels on CUDA, the reference elsewhere
#: (logged once). ``reference``/``triton``: forced; ``triton`` without CUDA is an error.
BACKENDS = ("auto", "reference", "triton")
#: How the index branch's gradients are clipped (msa.index_grad_clip).
INDEX_GRAD_CLIPS = ("separate", "global")


class ConfigError(ValueError):
    """The package's one error for an invalid setting, one readable line:
    ``<field>=<value> is invalid: allowed values are <allowed>``.

    ``field`` is the name as the user wrote it (a YAML path such as ``data.seq_length``, a
    flag such as ``--msa-topk``). Every other config error of the package is this class or a
    subclass of it (``MSAConfigError``, ``megatron_lm.args.MSAArgumentError``), so callers
    catch one type."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.field}={self.value!r} is invalid: allowed values are {self.allowed}"

    @property
    def path(self) -> str:
        """The dotted field path (the name msa-train's config uses); an alias of ``field``."""
        return self.field

    @path.setter
    def path(self, value: str) -> None:
        self.field = value

    @property
    def field_name(self) -> str:
        """The last component of the field path (``msa.topk`` -> ``topk``)."""
        return self.field.rsplit(".", 1)[-1]


class MSAConfigError(ConfigError):
    """A field of :class:`MSAConfig` holds a value it does not accept; the message says
    ``msa.<field>`` (kept under its old name; ``except ConfigError`` catches it)."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        super().__init__(f"msa.{field_name}", value, allowed)


@dataclass
class MSAConfig:
    """MiniMax Sparse Attention hyper-parameters (defaults: the paper / MiniMax-M3).

    ``num_index_heads`` defaults to the model's number of KV heads (one index query head
    per GQA group); it is filled in by :meth:`for_model`.
    """

    block_size: int = 128
    topk: int = 16
    index_dim: int = 128
    num_index_heads: Optional[int] = None
    init_blocks: int = 0
    local_blocks: int = 1
    kl_coeff: float = 1.0
    mode: str = "msa"
    #: Layers (0-based) that use MSA; None means every layer from ``first_dense_layers`` on.
    msa_layers: Optional[List[int]] = None
    #: Number of leading layers kept dense (MiniMax-M3 uses 3); ignored if msa_layers is set.
    first_dense_layers: int = 0
    #: Apply the model's (partial) RoPE to index q/k, as the paper does.
    index_rope: bool = True
    backend: str = "auto"
    #: Collect entropy statistics every forward (cheap, on the selected tokens).
    track_entropy: bool = True
    #: Selection recall needs a dense pass; computed only on steps the trainer samples.
    recall_interval: int = 0
    #: Detach the index branch's input (the paper's stop-gradient: the KL trains only the
    #: index projections). False is the ablation "KL reaches the backbone" (issue 10).
    index_stop_gradient: bool = True
    #: ``separate``: the index parameters are clipped by their own gradient norm, so the KL's
    #: gradient never scales the backbone's update through the global clip (the logged grad
    #: norm is the backbone's; the index branch's is logged as index_grad_norm). ``global``:
    #: Megatron's one norm over all parameters (what runs before this option used).
    index_grad_clip: str = "separate"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "MSAConfig":
        _check_int(self, "block_size", lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16")
        _check_int(self, "topk", lambda v: v >= 1, "an integer >= 1")
        _check_int(self, "index_dim", lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16")
        if self.num_index_heads is not None:
            _check_int(self, "num_index_heads", lambda v: v >= 1, "an integer >= 1 (= number of KV heads)")
        _check_int(self, "init_blocks", lambda v: v >= 0, "an integer >= 0")
        _check_int(self, "local_blocks", lambda v: v >= 1, "an integer >= 1 (the query's own block is always kept)")
        if self.init_blocks + self.local_blocks > self.topk:
            raise MSAConfigError(
                "topk", self.topk, f"an integer >= init_blocks + local_blocks = {self.init_blocks + self.local_blocks}"
            )
        if not isinstance(self.kl_coeff, (int, float)) or isinstance(self.kl_coeff, bool) or not (
            math.isfinite(self.kl_coeff) and self.kl_coeff >= 0
        ):
            raise MSAConfigError("kl_coeff", self.kl_coeff, "a finite float >= 0")
        if self.mode not in ATTENTION_MODES:
            raise MSAConfigError("mode", self.mode, "one of " + ", ".join(ATTENTION_MODES))
        if self.backend not in BACKENDS:
            raise MSAConfigError("backend", self.backend, "one of " + ", ".join(BACKENDS))
        if self.index_grad_clip not in INDEX_GRAD_CLIPS:
            raise MSAConfigError("index_grad_clip", self.index_grad_clip, "one of " + ", ".join(INDEX_GRAD_CLIPS))
        _check_int(self, "first_dense_layers", lambda v: v >= 0, "an integer >= 0")
        _check_int(self, "recall_interval", lambda v: v >= 0, "an integer >= 0 (0 = never)")
        if self.msa_layers is not None:
            layers = list(self.msa_layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise MSAConfigError("msa_layers", self.msa_layers, "a list of 0-based layer indices >= 0, or null")
            if len(set(layers)) != len(layers):
                raise MSAConfigError("msa_layers", self.msa_layers, "a list without repeated layer indices")
            self.msa_layers = sorted(layers)
        for name in ("index_rope", "track_entropy", "index_stop_gradient"):
            if not isinstance(getattr(self, name), bool):
                raise MSAConfigError(name, getattr(self, name), "true or false")
        return self

    def validate_for_model(self, num_layers: int, num_kv_heads: int, tp_size: int = 1) -> "MSAConfig":
        """Checks that need the model: layer indices, index heads vs KV heads, TP split."""
        if self.msa_layers is not None:
            bad = [i for i in self.msa_layers if i >= num_layers]
            if bad:
                raise MSAConfigError(
                    "msa_layers", self.msa_layers, f"layer indices in [0, {num_layers - 1}] (the model has {num_layers} layers)"
                )
        elif self.first_dense_layers > num_layers:
            raise MSAConfigError("first_dense_layers", self.first_dense_layers, f"an integer in [0, {num_layers}]")
        if self.num_index_heads is not None and self.num_index_heads != num_kv_heads:
            raise MSAConfigError(
                "num_index_heads", self.num_index_heads, f"{num_kv_heads} (one index head per KV group) or null"
            )
        if num_kv_heads % tp_size != 0:
            raise MSAConfigError(
                "num_index_heads",
                num_kv_heads,
                f"a multiple of the tensor-parallel size {tp_size}: MSA keeps whole GQA groups on one rank",
            )
        return self

    # ------------------------------------------------------------------ helpers
    def for_model(self, num_layers: int, num_kv_heads: int, tp_size: int = 1) -> "MSAConfig":
        """A validated copy with ``num_index_heads`` filled in for this model."""
        self.validate_for_model(num_layers, num_kv_heads, tp_size)
        return dataclasses.replace(self, num_index_heads=num_kv_heads)

    def is_msa_layer(self, layer_index: int) -> bool:
        """Whether 0-based layer ``layer_index`` uses MSA (others stay dense GQA)."""
        if self.msa_layers is not None:
            return layer_index in self.msa_layers
        return layer_index >= self.first_dense_layers

    @property
    def index_softmax_scale(self) -> float:
        """Temperature of the index student distribution: softmax(s / sqrt(d_index))."""
        return 1.0 / math.sqrt(self.index_dim)

    @property
    def budget_tokens(self) -> int:
        return self.topk * self.block_size

    def replace(self, **changes: Any) -> "MSAConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "MSAConfig":
        """Build from a mapping (YAML / OmegaConf); unknown keys are an error, not ignored."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MSAConfigError(unknown[0], values[unknown[0]], "an existing field: one of " + ", ".join(sorted(known)))
        if values.get("msa_layers") is not None:
            values["msa_layers"] = list(values["msa_layers"])
        return cls(**values)


def _check_int(cfg: MSAConfig, name: str, ok, allowed: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or not ok(value):
        raise MSAConfigError(name, value, allowed)


def msa_layer_pattern(cfg: MSAConfig, num_layers: int) -> List[bool]:
    """Per-layer flags (True = MSA) for a model of ``num_layers`` layers."""
    cfg.validate_for_model(num_layers, num_kv_heads=cfg.num_index_heads or 1)
    return [cfg.is_msa_layer(i) for i in range(num_layers)]


__all__: Sequence[str] = ("ATTENTION_MODES", "BACKENDS", "ConfigError", "MSAConfig", "MSAConfigError",
                          "msa_layer_pattern")

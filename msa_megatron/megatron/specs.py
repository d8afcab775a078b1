"""ModuleSpecs for MSA models on the local (pure torch) and Transformer Engine backends.

The per-layer list (:func:`msa_layer_specs`) mixes MSA and dense attention per
``MSAConfig.is_msa_layer`` and MoE/dense MLPs per ``moe_layer_freq``. Megatron-Core's own
``get_transformer_block_with_experimental_attention_variant_spec`` reaches it once
``register()`` has run (``experimental_attention_variant='msa'``); that is the path
Megatron-LM takes, and :func:`~msa_megatron.megatron.registry.get_decoder_block_spec` takes it too.
This module never imports the registry or the patches (they import it: no import circle).

Backends:
* local: :class:`MSALocalSpecProvider` = Megatron's LocalSpecProvider with norms that
  support sequence parallelism (:class:`~msa_megatron.megatron.layers.SequenceParallelTorchNorm`),
  a replicated :class:`~msa_megatron.megatron.layers.IndexLinear` and fused dense attention on
  torch SDPA (:class:`~msa_megatron.megatron.dense_attention.SDPADotProductAttention`). Layers keep the stock
  local spec's checkpoint key map, so local dense checkpoints load into MSA models.
* Transformer Engine: Megatron's TESpecProvider. MSA layers use an unfused input
  layernorm (the index branch needs the normalised hidden states, which TE's fused
  LayerNormLinear does not expose), and MoE layers an unfused pre-MLP norm; both are mapped
  to the fused keys, so local and TE checkpoints have the same keys (TE adds only its
  ``_extra_state`` entries: FP8 metadata, no weights).
"""

from __future__ import annotations

import logging
from typing import List, Optional

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_moe_layer_pattern
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import L2Norm
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .attention import (
    MSACoreAttention,
    MSACoreAttentionSubmodules,
    MSAIndexer,
    MSAIndexerSubmodules,
    MSASelfAttention,
    MSASelfAttentionSubmodules,
)
from .layers import IndexLinear, SequenceParallelTorchNorm

log = logging.getLogger("msa_megatron.megatron")
_announced: set = set()

#: Checkpoint key map of Megatron's local GPT layer spec (get_gpt_layer_local_submodules):
#: local checkpoints use the TE-fused names, so we keep it for compatibility.
LOCAL_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class MSALocalSpecProvider(LocalSpecProvider):
    """Megatron's local backend, with sequence-parallel-capable torch norms and a
    replicated linear for the index branch."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return SequenceParallelTorchNorm

    def linear(self) -> type:
        return IndexLinear

    def core_attention(self) -> type:
        # torch SDPA at CP = 1 (Megatron's DotProductAttention materialises S x S scores: 64 GiB
        # at 32K); under context parallelism the inherited CP-capable path (stock local attention
        # refuses CP). Same state dict as DotProductAttention, so checkpoints are unchanged.
        from .dense_attention import SDPADotProductAttention

        return SDPADotProductAttention


def _is_local(backend: BackendSpecProvider) -> bool:
    return not backend.fuse_layernorm_and_linear()


def te_available() -> bool:
    return bool(HAVE_TE)


def select_backend(config, use_te: Optional[bool] = None) -> BackendSpecProvider:
    """Backend for ``config.transformer_impl`` (or ``use_te`` when given).

    'transformer_engine' without TE installed runs the local backend and says so once;
    asking for TE explicitly (``use_te=True``) without TE is an error."""
    if use_te is None:
        if config.transformer_impl == "local":
            use_te = False
        elif config.transformer_impl == "transformer_engine":
            use_te = te_available()
            if not use_te and "te-missing" not in _announced:
                _announced.add("te-missing")
                log.warning("MSA: Transformer Engine is not installed; building the model with Megatron-Core's "
                            "local (pure torch) modules (transformer_impl='transformer_engine' requested)")
        else:
            raise ValueError(f"transformer_impl={config.transformer_impl!r} is not supported with msa: "
                             "allowed values are 'local', 'transformer_engine'")
    if use_te:
        if not te_available():
            raise RuntimeError("use_te=True but Transformer Engine is not installed (pip install "
                               "transformer-engine[pytorch]); use use_te=False for the local backend")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return MSALocalSpecProvider()


# ----------------------------------------------------------------------------- attention specs
def _qk_norm(config, backend: BackendSpecProvider):
    if config.qk_l2_norm:
        return L2Norm
    if config.qk_layernorm:
        return backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=True)
    return IdentityOp


def get_msa_attention_module_spec(config, backend: BackendSpecProvider) -> ModuleSpec:
    """MSA self-attention: Megatron's QKV/output projections + index branch + MSA core."""
    index_norm = backend.layer_norm(rms_norm=True, for_qk=True)
    return ModuleSpec(
        module=MSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MSASelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=ModuleSpec(
                module=MSACoreAttention,
                submodules=MSACoreAttentionSubmodules(dense_attention=backend.core_attention()),
            ),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=_qk_norm(config, backend),
            k_layernorm=_qk_norm(config, backend),
            indexer=ModuleSpec(
                module=MSAIndexer,
                submodules=MSAIndexerSubmodules(
                    index_q=backend.linear(), index_k=backend.linear(),
                    index_q_norm=index_norm, index_k_norm=index_norm,
                ),
            ),
        ),
        metainfo={"fuse_input_layernorm": False},
    )


def get_dense_attention_module_spec(config, backend: BackendSpecProvider) -> ModuleSpec:
    """Megatron's standard causal self-attention (for the dense layers of an MSA model)."""
    fused = backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=_qk_norm(config, backend),
            k_layernorm=_qk_norm(config, backend),
        ),
        metainfo={"fuse_input_layernorm": fused},
    )


# ----------------------------------------------------------------------------- layer / block specs
def msa_layer_specs(config, backend: Optional[BackendSpecProvider] = None) -> List[ModuleSpec]:
    """One TransformerLayer spec per global layer: MSA or dense attention, MoE or dense MLP.
    ``config.msa`` None (or absent) gives an all-dense model."""
    if backend is None:
        backend = select_backend(config)
    msa = getattr(config, "msa", None)
    if config.multi_latent_attention:
        raise ValueError("multi_latent_attention=True is not supported by the MSA spec builder: allowed value is False")
    local = _is_local(backend)
    rms = config.normalization == "RMSNorm"
    moe_pattern = get_moe_layer_pattern(config) if config.num_moe_experts is not None else [0] * config.num_layers
    dense_mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=None,
                                                use_te_activation_func=config.use_te_activation_func)
    moe_mlp = None
    if 1 in moe_pattern:
        moe_mlp = get_moe_module_spec_for_backend(backend=backend, num_experts=config.num_moe_experts,
                                                  moe_grouped_gemm=config.moe_grouped_gemm,
                                                  use_te_activation_func=config.use_te_activation_func)
    msa_attn = get_msa_attention_module_spec(config, backend) if msa is not None else None
    dense_attn = get_dense_attention_module_spec(config, backend)
    specs = []
    for i in range(config.num_layers):
        attention = msa_attn if (msa is not None and msa.is_msa_layer(i)) else dense_attn
        is_moe = moe_pattern[i] == 1
        fuse_input = attention.metainfo["fuse_input_layernorm"]
        # Dense MLPs fuse their pre-norm into linear_fc1 on TE; MoE layers never do.
        fuse_pre_mlp = (not is_moe) and backend.fuse_layernorm_and_linear()
        if local:
            keys_map = dict(LOCAL_KEYS_MAP)
        else:
            # TE: a norm that is not fused into the next linear (MSA layers' input norm, MoE
            # layers' pre-MLP norm) is saved under the fused / local-spec name, so every layer
            # has the same checkpoint keys on both backends (Megatron's own TE MoE spec says
            # 'pre_mlp_layernorm.weight' there; its local spec 'mlp.linear_fc1.layer_norm_weight').
            keys_map = {prefix: fused for prefix, fused in LOCAL_KEYS_MAP.items()
                        if (prefix == "input_layernorm." and not fuse_input)
                        or (prefix == "pre_mlp_layernorm." and not fuse_pre_mlp)}
        specs.append(ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=IdentityOp if fuse_input else backend.layer_norm(rms_norm=rms, for_qk=False),
                self_attention=attention,
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=IdentityOp if fuse_pre_mlp else backend.layer_norm(rms_norm=rms, for_qk=False),
                mlp=moe_mlp if is_moe else dense_mlp,
                mlp_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=keys_map,
            ),
        ))
    return specs


def local_layer_ids(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> List[int]:
    """Global indices of the layers this pipeline stage builds (Megatron's own rule)."""
    if config.pipeline_model_parallel_layout is not None:
        return list(config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)))


__all__ = [
    "LOCAL_KEYS_MAP", "MSALocalSpecProvider", "get_dense_attention_module_spec",
    "get_msa_attention_module_spec", "local_layer_ids", "msa_layer_specs", "select_backend", "te_available",
]

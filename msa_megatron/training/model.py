"""Model construction: TransformerConfig from the typed config, GPT model chunks built by
the MSA backend (msa_megatron.megatron, imported when first used so the config is checked
before Megatron-Core loads), mixed-precision wrapping and Megatron-Core DDP (distributed
optimizer buffers). Also counts parameters for the MFU estimate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from .config import Config, ConfigError

log = logging.getLogger(__name__)

#: Parameters of the MSA index branch are recognised by name (index_q, index_k, their norms).
INDEX_PARAM_MARKER = "index_"


def is_index_param(name: str) -> bool:
    """Whether a parameter (or state-dict key) belongs to the MSA index branch."""
    return INDEX_PARAM_MARKER in name


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Embedding rows: the vocabulary padded to a multiple of make_vocab_size_divisible_by.
    Unlike Megatron-LM (divisor x TP) the padding does not depend on TP, so a checkpoint
    resumed at another TP size has the same logits (padded rows take softmax mass too);
    the config check requires the divisor to be a multiple of TP."""
    multiple = cfg.model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config_kwargs(cfg: Config) -> Dict[str, Any]:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = PRECISION_DTYPES[t.precision]
    cuda = torch.cuda.is_available()
    kw: Dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        add_bias_linear=False,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        # parallelism
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sp,
        pipeline_dtype=dtype,
        # precision
        params_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        # fused kernels: only where their CUDA/TE implementations exist (the masked-softmax
        # kernel needs Megatron's separately built CUDA extension: opt in via model.extra)
        bias_activation_fusion=cuda and m.swiglu,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        calculate_per_token_loss=False,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        # Per-layer checkpoint keys for every model (MSA models need them: only MSA layers
        # have index tensors), so a dense checkpoint can initialise an MSA model.
        hetereogenous_dist_checkpoint=True,
    )
    if m.num_moe_experts is not None:
        kw.update(
            num_moe_experts=m.num_moe_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=[0] * m.moe_first_dense_layers + [1] * (m.num_layers - m.moe_first_dense_layers),
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_router_score_function=m.moe_router_score_function,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_router_dtype="fp32",
        )
    kw.update(m.extra)
    return kw


def make_transformer_config(cfg: Config):
    """The backend's (MSA-aware) TransformerConfig. Megatron's own validation errors are
    re-raised as one ConfigError naming the model section. Registers MSA with Megatron-Core
    first (and its upstream fixes, e.g. for MoE experts with biases), for every model built
    from this config, dense or MSA."""
    from ..megatron import make_transformer_config as backend_transformer_config, register

    register()
    try:
        config = backend_transformer_config(cfg.msa, **transformer_config_kwargs(cfg))
    except ConfigError:
        raise
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError("model", cfg.model.name, f"a shape Megatron-Core accepts ({type(e).__name__}: {e})") from None
    if hasattr(config, "validate_sequence_length"):  # the backend's CP / SP split rules
        try:
            config.validate_sequence_length(cfg.train.seq_length)
        except ValueError as e:
            raise ConfigError("train.seq_length", cfg.train.seq_length, f"lengths the parallel layout can split ({e})") from None
    return config


def build_model(cfg: Config, tf_config, vocab_size: int) -> List[torch.nn.Module]:
    """Model chunks for this pipeline stage, wrapped in Megatron-Core DDP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    m = cfg.model
    kwargs = dict(
        vocab_size=padded_vocab_size(vocab_size, cfg),
        max_sequence_length=cfg.train.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=m.use_te,
        position_embedding_type="rope",
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
    )
    if cfg.attention.type == "swa":
        from ..megatron.sliding_window import build_swa_gpt_model

        model = build_swa_gpt_model(tf_config, cfg.swa_window(), cfg.swa_layers(), **kwargs)
    else:
        from ..megatron import build_gpt_model

        model = build_gpt_model(tf_config, **kwargs)
    freeze_backbone(cfg, [model])
    freeze_indexer(cfg, [model])
    if _reduce_device().type == "cuda":
        model.cuda(torch.cuda.current_device())  # torch norms and buffers are created on the CPU
    if tf_config.fp16 or tf_config.bf16:
        model = Float16Module(tf_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,  # the loop checks and reports per parameter (numerics.py)
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
    return [ddp]


def freeze_backbone(cfg: Config, chunks: List[torch.nn.Module]) -> None:
    """attention.indexer_only.freeze_backbone: only index_* parameters require grad."""
    if not cfg.attention.indexer_only.freeze_backbone:
        return
    n_index = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            keep = is_index_param(name)
            param.requires_grad_(keep)
            n_index += keep
    if n_index == 0:
        raise ConfigError("attention.indexer_only.freeze_backbone", True,
                          "false for a model without index_* parameters (no MSA layer on this rank)")


def freeze_indexer(cfg: Config, chunks: List[torch.nn.Module]) -> None:
    """attention.freeze_indexer: index_* parameters keep their initial values (the "no KL
    teacher" ablation); requires_grad=False, so neither the KL nor weight decay moves them."""
    if not cfg.attention.freeze_indexer:
        return
    n_index = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if is_index_param(name):
                param.requires_grad_(False)
                n_index += 1
    log.info("attention.freeze_indexer: %d index parameters frozen at initialisation", n_index)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """DDP / Float16Module -> the GPTModel."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


@dataclass
class ParamCounts:
    total: int
    #: Parameters a token passes through (MoE: routed experts x topk / experts); excludes
    #: the input embedding table (a lookup, no FLOPs) unless it is tied to the output layer.
    active_matmul: int


def count_parameters(cfg: Config, chunks: List[torch.nn.Module]) -> ParamCounts:
    """Global counts over every shard: each local parameter is weighted by 1 / the number
    of ranks holding an identical copy, then summed over the whole job (a collective)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, dp_cp = ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(with_context_parallel=True)
    etp = ps.get_expert_tensor_parallel_world_size()
    edp = ps.get_expert_data_parallel_world_size()
    m = cfg.model
    routed_frac = (m.moe_router_topk / m.num_moe_experts) if m.num_moe_experts else 1.0
    tied = not m.untie_embeddings_and_output_weights
    total = active = 0.0
    for chunk in chunks:
        for name, p in unwrap(chunk).named_parameters():
            expert = not getattr(p, "allreduce", True)
            sharded = getattr(p, "tensor_model_parallel", False)
            if expert:
                copies = edp * (1 if sharded else etp)
            else:
                copies = dp_cp * (1 if sharded else tp)
            share = p.numel() / copies
            total += share
            if ("embedding.word_embeddings" in name and not tied) or ("output_layer" in name and tied):
                continue  # untied: the lookup table; tied + PP: the last stage's copy
            # routed experts by name: Megatron marks expert params allreduce=False only under
            # expert parallelism (or ETP != TP), so that flag cannot tell routed experts apart
            routed = ".experts." in f".{name}"
            active += share * (routed_frac if routed else 1.0)
    t = torch.tensor([total, active], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(_reduce_device())
        dist.all_reduce(t)
    return ParamCounts(int(round(t[0].item())), int(round(t[1].item())))


def _reduce_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["INDEX_PARAM_MARKER", "ParamCounts", "build_model", "count_parameters", "is_index_param",
           "make_transformer_config", "padded_vocab_size", "transformer_config_kwargs", "unwrap"]

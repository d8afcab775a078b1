"""Shared pieces of the Megatron backend tests (imported inside spawned gloo processes).

Tiny models: hidden 64, 4 query heads in 2 KV groups (head dim 16), partial RoPE (8 of 16
dims), block 16, sequences of 100 tokens (not a multiple of the block: 7 blocks) so top-2
selection is genuinely sparse.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
#: Spawned processes must import this worktree's msa_megatron, patches and these helpers.
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(Path(__file__).resolve().parent),
                                                 os.environ.get("PYTHONPATH", "")) if p)}

VOCAB = 128
SEQ = 100
BATCH = 2
HEAD_DIM = 16
ROTARY_PERCENT = 0.5


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("msa_megatron", "msa_megatron.ops", "msa_megatron.megatron", "msa_megatron.compat",
                 "msa_megatron.patches", "megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start(tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False, seed: int = 1234) -> None:
    """(Re)initialise Megatron's parallel state in this process for a layout."""
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(tp=tp, pp=pp, ep=ep, sequence_parallel=sp), seed=seed)


def msa_settings(**overrides):
    from msa_megatron import MSAConfig

    values = dict(block_size=16, topk=2, index_dim=16, kl_coeff=1.0)
    values.update(overrides)
    return MSAConfig(**values)


def tiny_config(msa=None, num_layers: int = 2, **overrides):
    from msa_megatron.megatron.model import make_transformer_config

    values = dict(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        kv_channels=HEAD_DIM, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32, init_method_std=0.08,
    )
    values.update(overrides)
    return make_transformer_config(msa, **values)


def moe_overrides(num_experts: int = 4, shared: bool = True, **extra) -> dict:
    values = dict(num_moe_experts=num_experts, moe_router_topk=2, moe_ffn_hidden_size=64,
                  moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.01,
                  moe_router_load_balancing_type="aux_loss")
    if shared:
        values["moe_shared_expert_intermediate_size"] = 64
    values.update(extra)
    return values


def gpt(config, pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    from megatron.core import parallel_state

    from msa_megatron.megatron.model import build_gpt_model

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return build_gpt_model(config, VOCAB, 256, pre_process=pre_process, post_process=post_process,
                           rotary_percent=ROTARY_PERCENT, share_embeddings_and_output_weights=False)


def batch(seed: int = 7, seq: int = SEQ, b: int = BATCH):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, seq + 1), generator=g)
    position_ids = torch.arange(seq).unsqueeze(0).expand(b, -1).contiguous()
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


def ddp(config, model, distributed_optimizer: bool = False):
    """Megatron DDP. With the distributed optimizer, main_grad holds the reduced gradient only
    in this rank's shard, so gradient comparisons use distributed_optimizer=False."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config, ddp_config, model)


_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def shift_layers(name: str, offset: int) -> str:
    """Local layer index -> global (offset > 0) in a parameter name."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}", name, count=1)


def stage_offset(config) -> int:
    """Global index of this pipeline stage's first layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config)


def tp_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's part of a full (TP=1) tensor, per Megatron's parameter attributes."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        full = full.chunk(tp, dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]
    return full


def load_full_state(model, full: Dict[str, torch.Tensor], offset: int = 0) -> None:
    """Copy full (TP=1, all layers) parameters into this rank's (TP-sharded, PP-stage) model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = tp_shard(p, full[shift_layers(name, offset)])
            assert t.shape == p.shape, (name, t.shape, p.shape)
            p.copy_(t)


def full_params(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main_grads(model) -> Dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(actual, expected, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs diff {diff:.3e} (rtol={rtol}, atol={atol})")

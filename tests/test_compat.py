"""The CPU compatibility layer: version-guarded, and Megatron-Core's training pieces
(GPTModel, DDP + distributed optimizer, schedules, dist_checkpointing) run on gloo."""

import os

import pytest
import torch

from dist_harness import run_distributed


def test_refuses_other_megatron_versions(monkeypatch):
    import megatron.core

    from msa_megatron.megatron import compat

    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match="targets megatron-core 0.19.x; found 0.20.0"):
        compat.check_mcore_version("test")


def _train_and_checkpoint(rank: int, ckpt_dir: str):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from msa_megatron.megatron.compat import patched_call_sites
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(tp=2))
    assert "torch.cuda.current_device" in patched_call_sites()
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            tensor_model_parallel_size=2, use_cpu_initialization=True, pipeline_dtype=torch.float32)

    def build():
        return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=64)

    model = build()
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32)[None].expand(2, -1)

    def step(it, m):
        return m(ids, pos, None, labels=ids), lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=None, model=[ddp], num_microbatches=1,
                                          seq_length=32, micro_batch_size=2, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        losses.append(float(res[0]["loss"]))
    assert losses[-1] < losses[0]
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    fresh = build()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, pos, None), fresh(ids, pos, None))
    return losses


@pytest.mark.slow
def test_megatron_training_pieces_run_on_gloo(tmp_path):
    losses = run_distributed(_train_and_checkpoint, 2, str(tmp_path / "ckpt"))
    assert losses[0] == losses[1]  # TP ranks see the same loss

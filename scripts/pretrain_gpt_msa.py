"""Pretrain a GPT (dense or MoE) with MSA layers through Megatron-LM's ``pretrain``.

A standard Megatron-LM launch line trains with MSA once it says
``--experimental-attention-variant msa`` (+ ``--msa-*`` flags, see ``--help``)::

    torchrun --nproc-per-node 8 scripts/pretrain_gpt_msa.py \
        --transformer-impl local --experimental-attention-variant msa --msa-topk 16 \
        --msa-warmup-iters 2000 --attention-dropout 0.0 ... (the usual GPT, data, TP/PP/EP flags)

Without ``--experimental-attention-variant msa`` it trains the dense model of the same modules.
The model is built by Megatron-LM's GPTModelBuilder from ``gpt_model_config_from_args``;
this file adds only the data (mock or indexed GPT datasets) and the forward step. Sequences are
not packed (MSA does not support packed sequences); with context parallelism
(``--context-parallel-size N --cp-comm-type all_gather``) the batch is cut by Megatron's
load-balanced split, which MSA layers expect.
"""

import time

_PROGRAM_START = time.time()

import os  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msa_megatron.megatron_lm as msa_lm  # noqa: E402

msa_lm.install()

import torch  # noqa: E402

import msa_megatron.training.step as lm_step  # noqa: E402
from msa_megatron.training.step import local_batch  # noqa: E402
from megatron.core import parallel_state as mpu  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_tp_rank  # noqa: E402
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0  # noqa: E402
from megatron.training import inprocess_restart, set_startup_timestamps  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage  # noqa: E402

#: The model inputs read per micro-batch (attention_mask: None unless built by the data loader).
BATCH_KEYS = lm_step.BATCH_KEYS + ("attention_mask",)


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch (a dict of BATCH_KEYS): read on TP rank 0, broadcast over TP, sliced
    for CP; all None on middle pipeline stages (they read no data)."""
    if not is_first_or_last_pipeline_stage(vp_stage):
        return dict.fromkeys(BATCH_KEYS)
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(data_iterator).items()}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=False, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = local_batch(batch)  # Megatron's load-balanced CP split (a no-op without CP)
    return {k: batch.get(k) for k in BATCH_KEYS}


def forward_step(data_iterator, model):
    """The forward step and loss of msa_megatron.training.step (shared with msa-train), reported
    under Megatron-LM's 'lm loss' key, NaN/Inf checked by the rerun state machine when
    --check-for-nan-in-loss-and-grad is on."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    return lm_step.forward_step(batch, model, report_key=lm_step.MEGATRON_LM_LOSS_KEY,
                                rerun_check=get_args().check_for_nan_in_loss_and_grad)


def _is_dataset_built_on_rank(vp_stage=None):
    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets: ``--mock-data`` or the indexed ``--data-path`` / per-split paths."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {dataset_type.__name__} train/valid/test splits ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(_is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()


train_valid_test_datasets_provider.is_distributed = True


def main() -> None:
    set_startup_timestamps(program_start=_PROGRAM_START, main_entry=time.time())
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    args = parse_and_validate_args()
    if args.mtp_num_layers:
        raise SystemExit("pretrain_gpt_msa.py: --mtp-num-layers is not supported (multi-token prediction "
                         "layers are not built with MSA attention)")
    config = pretrain_cfg_container_from_args(args, msa_lm.gpt_model_config_from_args(args))
    run(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step, store=store)


if __name__ == "__main__":
    main()

"""Dense -> MSA conversion of a Megatron-Core distributed checkpoint.

The paper converts a dense GQA checkpoint by adding the index projections and training on
(warmup first). Here: build the dense twin of the MSA model, load the dense checkpoint into
it (any saved parallel layout), move every weight into the MSA model (identical module
tree except the index branch), initialise the index branch, and optionally save.

Index initialisation (``init``):

* ``mean`` (default): when the index dim equals the head dim, index query head g = the mean
  of the query projections of group g's heads, and the shared index key = the mean of the
  key projections over all KV heads. The index scores then start as the group-mean query
  against the mean key (the same partial RoPE applies to both branches), so the first
  selections already follow the dense attention and the warmup KL starts lower than from
  noise. When the dims differ it falls back to ``megatron`` for that layer, and says so.
* ``megatron``: Megatron's ``init_method`` (normal, std ``init_method_std``), as a fresh model.

Index norms start at 1 (Megatron's norm init). In ``dense`` mode the converted model
computes exactly what the dense model computes: the same modules run and the index branch
is idle. The report lists every added tensor and how it was initialised.

CLI (``msa-convert``), one process or ``torchrun`` at any TP/PP/EP layout::

    msa-convert --load DENSE_CKPT_DIR --save MSA_CKPT_DIR --config model.yaml [--init mean]

``model.yaml``: ``model:`` TransformerConfig fields, ``msa:`` MSAConfig fields,
``vocab_size``, ``max_sequence_length``, optional ``gpt:`` GPTModel keyword arguments and
``use_te``.

Hugging Face checkpoints (msa_megatron.hf, docs/conversion.md), one process::

    msa-convert --from-hf HF_DIR --save OUT [--msa-block-size 128 --msa-topk 16 --msa-index-dim D
                --msa-dense-layers N --init mean --dtype fp32]
    msa-convert --to-hf CKPT --save HF_OUT [--hf-config DIR] [--dtype bf16]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger("msa_megatron.convert")

INIT_METHODS = ("mean", "megatron")


@dataclass
class ConversionReport:
    """What the conversion did; ``added`` has one entry per new tensor."""

    msa_layers: List[int] = field(default_factory=list)
    reused_tensors: int = 0
    added: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"MSA conversion: {self.reused_tensors} dense tensors reused on this rank, "
                 f"{len(self.added)} added (MSA layers {self.msa_layers})"]
        lines += [f"  + {a['name']} {tuple(a['shape'])}: {a['init']}" for a in self.added]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- index initialisation
def _full_qkv_weight(attn) -> torch.Tensor:
    """linear_qkv weight of all heads: the TP shards are contiguous runs of whole groups."""
    w = attn.linear_qkv.weight.detach()
    tp = attn.pg_collection.tp
    if tp.size() == 1:
        return w
    parts = [torch.empty_like(w) for _ in range(tp.size())]
    dist.all_gather(parts, w.contiguous(), group=tp)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def init_index_from_dense(model_or_chunks, init: str = "mean") -> List[Dict[str, Any]]:
    """Initialise the index branch of every MSA layer (see module doc); returns what was set.
    Collective over TP when ``init='mean'``."""
    from .attention import MSASelfAttention
    from .modes import as_chunks

    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is invalid: allowed values are {', '.join(INIT_METHODS)}")
    added: List[Dict[str, Any]] = []
    for chunk in as_chunks(model_or_chunks):
        for name, module in chunk.named_modules():
            if not isinstance(module, MSASelfAttention):
                continue
            cfg = module.config
            indexer = module.indexer
            g, di, hn = indexer.num_heads, indexer.index_dim, cfg.kv_channels
            how = "megatron init_method (requested)"
            if init == "mean" and di != hn:
                how = f"megatron init_method (index_dim {di} != head dim {hn}: no mean copy)"
                log.warning("MSA conversion: layer %d: %s", module.layer_number - 1, how)
            elif init == "mean":
                G = cfg.num_attention_heads // cfg.num_query_groups
                n_q = 2 * G if cfg.attention_output_gate else G  # per group: q heads [, gate heads], k, v
                w = _full_qkv_weight(module).view(cfg.num_query_groups, n_q + 2, hn, cfg.hidden_size)
                indexer.index_q.weight.copy_(w[:, :G].float().mean(1).reshape(g * di, -1))
                indexer.index_k.weight.copy_(w[:, n_q].float().mean(0))
                how = "mean of the group's query projections / of all key projections"
            prefix = f"{name}.indexer."
            added.append({"name": prefix + "index_q.weight", "shape": list(indexer.index_q.weight.shape), "init": how})
            added.append({"name": prefix + "index_k.weight", "shape": list(indexer.index_k.weight.shape), "init": how})
            for norm in ("index_q_norm", "index_k_norm"):
                for pname, p in getattr(indexer, norm).named_parameters():
                    p.fill_(1.0)
                    added.append({"name": f"{prefix}{norm}.{pname}", "shape": list(p.shape), "init": "ones"})
    return added


# ----------------------------------------------------------------------------- conversion
def _is_per_layer_checkpoint(checkpoint_dir: str) -> bool:
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(checkpoint_dir).keys()
    return any(re.match(r"^decoder\.layers\.\d+\.", k) for k in keys)


def _move_dense_weights(model, dense_state: Dict[str, Any]) -> int:
    """Load the dense state into the MSA model; only index-branch tensors may be left out."""
    target = model.state_dict()
    moved: Dict[str, Any] = {}
    unexpected = []
    for key, value in dense_state.items():
        if key in target:
            moved[key] = value
            continue
        # MSA layers keep Megatron's core attention (and its state) under core_attention.dense_attention.
        alt = key.replace(".core_attention.", ".core_attention.dense_attention.", 1)
        if alt in target:
            moved[alt] = value
        else:
            unexpected.append(key)
    missing = [k for k in target if k not in moved and ".indexer." not in k]
    if unexpected or missing:
        raise RuntimeError(f"dense checkpoint does not match the MSA model: unexpected {unexpected[:8]}, "
                           f"missing {missing[:8]} (check that the model config matches the dense model)")
    model.load_state_dict(moved, strict=False)
    return len(moved)


def convert_dense_checkpoint(
    dense_checkpoint_dir: str,
    config,
    vocab_size: int,
    max_sequence_length: int,
    save_dir: Optional[str] = None,
    init: str = "mean",
    use_te: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    **gpt_kwargs,
) -> Tuple[torch.nn.Module, ConversionReport]:
    """MSA model (this rank's pipeline stage) with the dense checkpoint's weights and an
    initialised index branch; saved to ``save_dir`` when given. Collective."""
    from megatron.core import parallel_state

    from .checkpoint import load_model_checkpoint, save_model_checkpoint
    from .model import build_gpt_model, dense_config_of

    if getattr(config, "msa", None) is None:
        raise ValueError("convert_dense_checkpoint needs an MSA config (msa set)")
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is invalid: allowed values are {', '.join(INIT_METHODS)}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    build = dict(vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
                 post_process=post_process, use_te=use_te, **gpt_kwargs)

    dense_config = dense_config_of(config, hetereogenous_dist_checkpoint=_is_per_layer_checkpoint(dense_checkpoint_dir))
    dense = build_gpt_model(dense_config, **build)
    load_model_checkpoint(dense, dense_checkpoint_dir)
    dense_state = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in dense.state_dict().items()}
    del dense

    model = build_gpt_model(config, **build)
    report = ConversionReport(msa_layers=list(config.msa_layer_indices))
    report.reused_tensors = _move_dense_weights(model, dense_state)
    report.added = init_index_from_dense(model, init)
    if save_dir is not None:
        save_model_checkpoint(model, save_dir)
        # One report for the job: index tensors of every pipeline stage (TP/DP copies merged).
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (report.added, report.reused_tensors))
        added = {a["name"]: a for added_part, _ in parts for a in added_part}
        job = report.to_dict()
        job.pop("reused_tensors")
        job.update(added=[added[k] for k in sorted(added)], reused_tensors_per_rank=[n for _, n in parts])
        if dist.get_rank() == 0:
            with open(os.path.join(save_dir, "msa_conversion_report.json"), "w") as f:
                json.dump(job, f, indent=1)
        dist.barrier()  # the directory is complete on return, on every rank
    return model, report


# ----------------------------------------------------------------------------- CLI
__all__ = ["ConversionReport", "INIT_METHODS", "convert_dense_checkpoint", "init_index_from_dense"]

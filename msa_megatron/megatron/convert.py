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

import argparse
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
def _transformer_kwargs(raw: Dict[str, Any]) -> Dict[str, Any]:
    import torch.nn.functional as F

    out = dict(raw)
    for key, value in raw.items():
        if key.endswith("dtype") and isinstance(value, str):
            out[key] = getattr(torch, value)
    if isinstance(out.get("activation_func"), str):
        out["activation_func"] = getattr(F, out["activation_func"])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import yaml

    from .parallel import ParallelLayout, init_distributed, shutdown_distributed
    from .model import make_transformer_config

    parser = argparse.ArgumentParser(prog="msa-convert", description="Convert a dense Megatron-Core checkpoint to MSA, "
                                     "or a Hugging Face model in / out (--from-hf / --to-hf)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="dense distributed checkpoint directory")
    source.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--to-hf", metavar="CKPT", help="distributed checkpoint (converted dir, step dir or "
                                                        "checkpoints dir) to export as a Hugging Face directory")
    parser.add_argument("--save", required=True, help="output directory (created)")
    parser.add_argument("--config", help="with --load: YAML with model (TransformerConfig fields), msa, vocab_size, "
                                         "max_sequence_length, optional gpt, use_te")
    parser.add_argument("--init", default="mean", choices=INIT_METHODS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    hf = parser.add_argument_group("Hugging Face (--from-hf / --to-hf)")
    hf.add_argument("--msa-block-size", type=int, help="--from-hf: MSA block size (default 128)")
    hf.add_argument("--msa-topk", type=int, help="--from-hf: selected blocks per query (default 16)")
    hf.add_argument("--msa-index-dim", type=int, help="--from-hf: index dim (default: the head dim)")
    hf.add_argument("--msa-dense-layers", type=int, help="--from-hf: leading layers kept dense (default 0)")
    hf.add_argument("--name", help="--from-hf: model config name (default hf_<directory name>)")
    hf.add_argument("--seq-length", type=int, help="--from-hf: max sequence length of the built model")
    hf.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                    help="--from-hf: checkpoint dtype, fp32 | bf16 (default fp32; match train.precision); "
                         "--to-hf: safetensors dtype (default: config.json's)")
    hf.add_argument("--hf-config", help="--to-hf: converted directory (hf_source.json) or HF directory (config.json) "
                                        "describing the architecture (default: found from the checkpoint)")
    hf.add_argument("--index-norm", choices=("rmsnorm", "gemma"), default="rmsnorm",
                    help="--to-hf: index norm scales as stored (rmsnorm: w, the source family's convention) or as "
                         "MiniMax-M3's Gemma RMSNorm reads them (gemma: w - 1)")
    hf.add_argument("--max-shard-gb", type=float, default=4.0, help="--to-hf: safetensors shard size")
    hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.from_hf or args.to_hf:
        return _main_hf(parser, args)
    if not args.config:
        parser.error("--load needs --config")
    with open(args.config) as f:
        spec = yaml.safe_load(f)
    for key in ("model", "msa", "vocab_size", "max_sequence_length"):
        if key not in spec:
            parser.error(f"--config {args.config}: missing key {key!r}")
    if not os.path.isfile(os.path.join(args.load, "metadata.json")):
        parser.error(f"--load {args.load}: not a distributed checkpoint directory (no metadata.json)")
    if os.path.isfile(os.path.join(args.load, "manifest.json")):  # saved by msa-train: check before unpickling
        from pathlib import Path

        from ..training.checkpoint import verify_checkpoint

        problem = verify_checkpoint(Path(args.load))
        if problem:
            parser.error(f"--load {args.load}: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_distributed(ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep))
    try:
        model_kwargs = _transformer_kwargs(spec["model"])
        model_kwargs.update(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                            expert_model_parallel_size=args.ep)
        config = make_transformer_config(spec["msa"], **model_kwargs)
        _, report = convert_dense_checkpoint(args.load, config, spec["vocab_size"], spec["max_sequence_length"],
                                             save_dir=args.save, init=args.init, use_te=bool(spec.get("use_te", False)),
                                             **(spec.get("gpt") or {}))
        if dist.get_rank() == 0:
            print(report.format())
            print(f"saved to {args.save}")
    finally:
        shutdown_distributed()
    return 0


def _main_hf(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--from-hf / --to-hf: one process (the checkpoint is reshardable: it loads at any TP/PP/EP)."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        parser.error("--from-hf / --to-hf run in one process (no torchrun): the checkpoint loads at any TP/PP/EP")
    if args.tp != 1 or args.pp != 1 or args.ep != 1:
        parser.error("--tp/--pp/--ep apply to --load only: Hugging Face conversion writes a reshardable checkpoint "
                     "that msa-train loads at its own parallel.tp/pp/ep")
    if args.config:
        parser.error("--config applies to --load only (--from-hf writes the model YAML itself)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..hf.convert import export_hf, import_hf
    from ..training.checkpoint import prepare_writer_queue
    from .parallel import shutdown_distributed

    prepare_writer_queue()  # a forked (not spawned) checkpoint writer helper on CPU: no second torch import
    try:
        if args.from_hf:
            if args.dtype == "fp16":
                parser.error("--from-hf --dtype: allowed values are fp32, bf16")
            _, report = import_hf(args.from_hf, args.save, name=args.name, block_size=args.msa_block_size,
                                  topk=args.msa_topk, index_dim=args.msa_index_dim, dense_layers=args.msa_dense_layers,
                                  index_init=args.init, precision=args.dtype or "fp32", seq_length=args.seq_length,
                                  show_progress=not args.no_progress)
            name = json.load(open(os.path.join(args.save, "hf_source.json")))["model"]["name"]
            print(f"{report['family']}: MSA layers {report['msa_layers']} ({report['msa']}); index tensors from the "
                  f"checkpoint: {len(report['index_from_checkpoint'])}, initialised: {len(report['index_initialised'])}")
            print(f"saved to {args.save}; model config: {args.save}/configs/model/{name}.yaml\n"
                  f"continue pretraining: msa-train hydra.searchpath=[file://{os.path.abspath(args.save)}/configs] "
                  f"model={name} checkpoint.init_from={os.path.abspath(args.save)} ...")
        else:
            summary = export_hf(args.to_hf, args.save, hf_config=args.hf_config, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * (1 << 30)), show_progress=not args.no_progress,
                                index_norm=args.index_norm)
            print(f"{summary['family']}: {summary['tensors']} tensors ({summary['dtype']}) in {summary['shards']}, "
                  f"MSA index tensors on layers {summary['msa_layers']}; saved to {args.save}")
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as e:  # unsupported model, bad paths / options
        import sys

        print(f"msa-convert: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ConversionReport", "INIT_METHODS", "convert_dense_checkpoint", "init_index_from_dense", "main"]

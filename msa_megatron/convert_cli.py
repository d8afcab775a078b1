"""``msa-convert``: the command line of the checkpoint conversions (dense Megatron-Core ->
MSA, Hugging Face in and out). It lives above the backend and the trainer because it uses both
(the backend's :mod:`msa_megatron.megatron.convert` is the library; the trainer's checkpoint
writer and verifier; :mod:`msa_megatron.hf`), so none of them imports the other back."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .megatron.convert import convert_dense_checkpoint, INIT_METHODS


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

    from .megatron.parallel import ParallelLayout, init_distributed, shutdown_distributed
    from .megatron.model import make_transformer_config

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

        from .training.checkpoint import verify_checkpoint

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
        from pathlib import Path

        from .training.checkpoint import write_manifest

        write_manifest(Path(args.save))  # msa-train's checkpoint.init_from verifies it before unpickling
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
    from .hf.convert import export_hf, import_hf
    from .megatron.parallel import shutdown_distributed

    try:  # (no checkpoint writer helper process: --from-hf writes in this process, msa_megatron.hf.stream)
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


__all__ = ["main"]

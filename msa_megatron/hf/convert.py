"""Hugging Face <-> msa_megatron checkpoints.

``import_hf``: an HF directory (config.json + safetensors) -> our GPT model with MSA layers
(the model msa-train builds from the generated ``model`` YAML), saved as a Megatron-Core
distributed checkpoint. The checkpoint is written at TP=PP=1 in one process; distributed
checkpoints reshard on load and layers are keyed per global layer, so it loads at any
TP/PP/EP (``checkpoint.init_from``). The model is built on the meta device and each tensor
is read from the safetensors, fused and written when the checkpoint writer reaches it
(:mod:`.stream`): peak memory is one tensor with its inputs, not the model.

``export_hf``: a distributed checkpoint (ours, or a training step) -> safetensors +
config.json in the source family's layout, read layer by layer from the checkpoint
without building a model (peak memory: one layer plus one output shard). MSA index
tensors are written under MiniMax-M3's names, and config.json gets M3's
``sparse_attention_config`` so the indexer stays live for tools that read it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .arch import IGNORED_SUFFIXES, HFArch, Source, UnsupportedModelError, ckpt_globals_to_hf, \
    ckpt_layer_to_hf, hf_global_sources, hf_layer_sources
from .io import SafetensorsReader, SafetensorsWriter, progress, progress_bar
from .stream import Materialiser, check_meta, meta_tensors, save_streamed

log = logging.getLogger("msa_megatron.hf")

SOURCE_FILE = "hf_source.json"
#: Small non-weight files of the HF directory kept with the checkpoint (tokenizer etc.).
FILES_DIR = "hf_files"
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.h5|\.msgpack)$|safetensors\.index\.json$")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check_out_dir(out_dir: str) -> None:
    """Refuse to write into a non-empty directory: stale shards of an earlier conversion
    would be read together with the new ones."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"--save {out_dir} is not empty: allowed values are a new or empty directory")


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (an HF model directory has config.json + *.safetensors)")
    with open(path) as f:
        return json.load(f)


def ensure_process_group() -> None:
    """Megatron-Core's checkpointing and model building need a process group and
    parallel state: start a one-process gloo group (TP=PP=1) unless one exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return
    from ..megatron.parallel import ParallelLayout, init_distributed

    if not dist.is_initialized() and "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        import socket

        with socket.socket() as s:  # a free port: 29500 may be taken by another job on this host
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    init_distributed(ParallelLayout())


def msa_settings(arch: HFArch, block_size: Optional[int], topk: Optional[int], index_dim: Optional[int],
                 dense_layers: Optional[int]) -> Dict[str, int]:
    """MSA shape: explicit arguments, else what the config recorded (an export of ours),
    else MiniMax-M3's block 128 / top-16, index dim = head dim (the ``mean`` init copies
    q/k projections), no dense layers."""
    rec = arch.msa_extra
    if dense_layers is None and arch.index_layers is not None:
        first = arch.num_layers - len(arch.index_layers)
        if arch.index_layers != list(range(first, arch.num_layers)):
            raise UnsupportedModelError(f"sparse_attention_freq with MSA layers {arch.index_layers}: only leading dense "
                                        "layers then MSA layers (model.msa_dense_layers)")
        dense_layers = first
    return dict(block_size=block_size or rec.get("block_size", 128), topk=topk or rec.get("topk", 16),
                index_dim=index_dim or arch.index_dim or arch.head_dim,
                first_dense_layers=0 if dense_layers is None else dense_layers)


def training_config(model: Dict[str, Any], msa: Dict[str, int], seq_length: int, precision: str = "fp32"):
    """The trainer's typed Config for this model (attention=msa), so the model built here
    is the one msa-train builds from the same YAML."""
    from ..training.config import load_config

    return load_config({"model": model, "attention": {"type": "msa", "msa": dict(msa)},
                        "train": {"steps": 1, "seq_length": seq_length, "precision": precision}})


def build_model(cfg, vocab_size: int):
    """GPTModel (one stage, TP=PP=1 unless Megatron's parallel state says otherwise),
    built like training.model.build_model but without DDP / Float16Module."""
    from megatron.core import parallel_state

    from ..megatron import build_gpt_model
    from ..training.model import make_transformer_config, padded_vocab_size

    tf = make_transformer_config(cfg)
    m = cfg.model
    return build_gpt_model(
        tf, vocab_size=padded_vocab_size(vocab_size, cfg), max_sequence_length=cfg.train.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        use_te=False, position_embedding_type="rope", rotary_percent=m.rotary_percent, rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights)


def _model_name(hf_dir: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(os.path.normpath(hf_dir))).strip("_").lower()
    return f"hf_{base or 'model'}"


def model_yaml(model: Dict[str, Any], arch: HFArch, out_dir: str) -> str:
    import yaml

    eos = arch.raw.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    header = (
        f"# Generated by msa-convert --from-hf ({arch.family}, {arch.raw.get('architectures')}). The checkpoint in\n"
        f"# {out_dir} holds these weights with MSA index tensors; continue pretraining with\n"
        f"#   msa-train hydra.searchpath=[file://{os.path.abspath(os.path.join(out_dir, 'configs'))}] model={model['name']} \\\n"
        f"#     checkpoint.init_from={os.path.abspath(out_dir)} data.vocab_size={arch.vocab_size} "
        f"data.eod_id={eos if eos is not None else '<eos id>'} ...\n"
        f"# (data.vocab_size = the HF vocabulary: its padding to make_vocab_size_divisible_by must give\n"
        f"# exactly {arch.vocab_size} embedding rows).\n")
    return header + yaml.safe_dump(model, sort_keys=False)


# ---------------------------------------------------------------------------- import
#: Index-branch initialisations (the strings of megatron.convert.init_index_from_dense's report).
MEAN_INIT = "mean of the group's query projections / of all key projections"
_INDEX_NORMS = ("index_q_norm.weight", "index_k_norm.weight")


def _model_tensors(model) -> Dict[str, torch.Tensor]:
    """The model's state_dict tensors (no ``_extra_state``), as the tensors themselves."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _index_source(key: str, arch: HFArch, params: Dict[str, torch.Tensor], sources: Dict[str, Source],
                  index_init: str, init_method) -> Tuple[Source, str]:
    """How an index tensor the HF checkpoint lacks starts (``checkpoint.index_init``): the
    mean of the group's q projections / of all k projections (``mean``, index dim = head
    dim), Megatron's ``init_method`` otherwise; norms at 1."""
    ref = params[key]
    shape, dtype = tuple(ref.shape), ref.dtype
    if key.endswith(_INDEX_NORMS):
        return (lambda get: torch.ones(shape, dtype=dtype)), "ones"
    g, G, hn, di = arch.num_kv_heads, arch.group_size, arch.head_dim, shape[0] // (
        arch.num_kv_heads if key.endswith("index_q.weight") else 1)
    if index_init == "mean" and di == hn:
        qkv = sources[key.split(".indexer.")[0] + ".linear_qkv.weight"]

        def grouped(get):  # [g, G + 2, hn, hidden] in the model's dtype, as the in-model init reads it
            return qkv(get).to(params[key.split(".indexer.")[0] + ".linear_qkv.weight"].dtype).view(g, G + 2, hn, -1)

        if key.endswith("index_q.weight"):
            return (lambda get: grouped(get)[:, :G].float().mean(1).reshape(g * di, -1)), MEAN_INIT
        return (lambda get: grouped(get)[:, G].float().mean(0)), MEAN_INIT
    how = "megatron init_method (requested)" if index_init != "mean" else \
        f"megatron init_method (index_dim {di} != head dim {hn}: no mean copy)"

    def draw(get):
        t = torch.empty(shape, dtype=dtype)
        init_method(t)
        return t

    return draw, how


def plan_import(arch: HFArch, reader: SafetensorsReader, params: Dict[str, torch.Tensor], msa_layers: List[int],
                index_init: str, init_method) -> Tuple[Dict[str, Source], Dict[str, Any]]:
    """Every model tensor -> its source, checked before anything is read or written: shapes
    (the sources evaluated on meta tensors from the safetensors headers), every HF tensor
    used, every non-index parameter filled; an index tensor the checkpoint lacks gets
    ``index_init``. Errors name the tensors."""
    sources: Dict[str, Source] = dict(hf_global_sources(arch))
    for i in range(arch.num_layers):
        sources.update(hf_layer_sources(arch, i, reader.has))
    norm_offset = float(arch.msa_extra.get("index_norm_offset", 0))  # 1: exported with --index-norm gemma
    if norm_offset:
        for key in [k for k in sources if k.endswith(_INDEX_NORMS)]:
            sources[key] = (lambda f: lambda get: f(get) + norm_offset)(sources[key])  # Gemma-style 1 + w -> w
    misplaced = [k for k in sources if k not in params]
    if misplaced:
        raise UnsupportedModelError(f"{misplaced[:4]} have no place in the model (index tensors on a dense layer? MSA "
                                    f"layers are {msa_layers})")
    used: set = set()

    def meta_get(name: str) -> torch.Tensor:
        used.add(name)
        return reader.meta(name)

    for key, source in sources.items():
        shape = tuple(source(meta_get).shape)
        if shape != tuple(params[key].shape):
            raise UnsupportedModelError(f"{key}: HF shape {shape} != model shape {tuple(params[key].shape)}")
    unused = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if unused:
        raise UnsupportedModelError(f"{len(unused)} HF tensors the {arch.family} conversion does not know (unsupported "
                                    f"modules?): {unused[:8]}")
    missing = [k for k in params if k not in sources and ".indexer." not in k]
    if missing:
        raise UnsupportedModelError(f"model parameters without an HF tensor: {missing[:8]}")
    given = sorted(k for k in sources if ".indexer." in k)
    initialised = []
    for key in [k for k in params if ".indexer." in k and k not in sources]:
        sources[key], how = _index_source(key, arch, params, sources, index_init, init_method)
        initialised.append({"name": key, "shape": list(params[key].shape), "init": how})
    return sources, {"index_from_checkpoint": given, "index_initialised": initialised}


@torch.no_grad()
def import_hf(hf_dir: str, out_dir: str, *, name: Optional[str] = None, block_size: Optional[int] = None,
              topk: Optional[int] = None, index_dim: Optional[int] = None, dense_layers: Optional[int] = None,
              index_init: str = "mean", precision: str = "fp32", seq_length: Optional[int] = None,
              show_progress: bool = True, save: bool = True):
    """HF directory -> (model, summary). ``save``: streams the checkpoint to ``out_dir``
    (plus the model YAML and hf_source.json) one tensor at a time from a meta-device model,
    and returns ``None`` for the model; otherwise builds and returns the filled model (for
    tests and in-process use: memory = the model). Every HF tensor must be used and every
    non-index parameter filled: anything else is an error naming the tensors, raised before
    anything is written."""
    from ..megatron.convert import INIT_METHODS

    if index_init not in INIT_METHODS:
        raise ValueError(f"index_init={index_init!r} is invalid: allowed values are {', '.join(INIT_METHODS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: allowed values are {', '.join(PRECISIONS)}")
    if save:
        _check_out_dir(out_dir)
    raw = read_hf_config(hf_dir)
    arch = HFArch.from_config(raw)
    reader = SafetensorsReader(hf_dir)
    msa = msa_settings(arch, block_size, topk, index_dim, dense_layers)
    model_cfg = arch.model_config(name or _model_name(hf_dir), msa)
    seq = seq_length or min(arch.max_position_embeddings, 4096)
    cfg = training_config(model_cfg, msa, seq, precision)
    from ..training.config import validate

    ensure_process_group()
    cfg.train.global_batch_size = cfg.train.micro_batch_size  # validate() checks the batch shape too
    validate(cfg, 1)
    if save:
        with meta_tensors():
            model = build_model(cfg, arch.vocab_size)
        check_meta(model)
    else:
        model = build_model(cfg, arch.vocab_size)
    params = _model_tensors(model)
    msa_layers = [i for i in range(arch.num_layers) if cfg.msa.is_msa_layer(i)]
    sources, index_report = plan_import(arch, reader, params, msa_layers, index_init, model.config.init_method)
    report = {"family": arch.family, "msa": msa, "msa_layers": msa_layers, **index_report}

    def produce(key: str) -> torch.Tensor:
        return sources[key](reader.get)

    if not save:
        for key in progress(list(params), len(params), f"import {arch.family}", show_progress, unit="tensor"):
            params[key].copy_(produce(key))
        return model, report
    bar = progress_bar(len(params), f"import {arch.family}", show_progress, unit="tensor")
    materialise = Materialiser(params, produce, on_new=lambda _: bar.update(1))
    try:
        _save_import(model, arch, model_cfg, msa, report, hf_dir, out_dir, materialise)
    finally:
        bar.close()
    return None, report


def _save_import(model, arch: HFArch, model_cfg: Dict[str, Any], msa: Dict[str, int], report: Dict[str, Any],
                 hf_dir: str, out_dir: str, materialise: Materialiser) -> None:
    import torch.distributed as dist

    from ..training.checkpoint import write_manifest

    save_streamed(model, out_dir, materialise)
    # rank 0 holds every main replica at TP = PP = 1: it must have written every tensor
    unwritten = [[k for k in materialise.params if k not in materialise.produced] if dist.get_rank() == 0 else []]
    dist.broadcast_object_list(unwritten, src=0)
    if unwritten[0]:
        raise RuntimeError(f"{out_dir}: {len(unwritten[0])} model tensors were not written: {unwritten[0][:8]}")
    if dist.get_rank() == 0:  # data-parallel replicas (a test's two-process job) write the side files once
        _write_side_files(arch, model_cfg, msa, report, hf_dir, out_dir)
    dist.barrier()
    # msa-train's checkpoint.init_from verifies this (sizes + sha256 of every file, side files included)
    write_manifest(Path(out_dir))


def _write_side_files(arch: HFArch, model_cfg: Dict[str, Any], msa: Dict[str, int], report: Dict[str, Any],
                      hf_dir: str, out_dir: str) -> None:
    cfg_dir = os.path.join(out_dir, "configs", "model")
    os.makedirs(cfg_dir, exist_ok=True)
    with open(os.path.join(cfg_dir, f"{model_cfg['name']}.yaml"), "w") as f:
        f.write(model_yaml(model_cfg, arch, out_dir))
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump({"hf_dir": os.path.abspath(hf_dir), "config": arch.raw, "model": model_cfg, "msa": msa}, f, indent=1)
    with open(os.path.join(out_dir, "msa_conversion_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    files = [n for n in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, n)) and n != "config.json"
             and not WEIGHT_FILE.search(n) and os.path.getsize(os.path.join(hf_dir, n)) < (64 << 20)]
    if files:
        os.makedirs(os.path.join(out_dir, FILES_DIR), exist_ok=True)
        for n in files:
            shutil.copy2(os.path.join(hf_dir, n), os.path.join(out_dir, FILES_DIR, n))


# ---------------------------------------------------------------------------- export
def find_source(checkpoint: Path) -> Optional[Path]:
    """hf_source.json of a checkpoint: in it or a parent (a converted directory), or in
    the checkpoint named by checkpoint.init_from of the run's config.yaml (a training run
    started from a converted directory)."""
    import yaml

    for p in [checkpoint, *list(checkpoint.parents)[:3]]:
        if (p / SOURCE_FILE).is_file():
            return p / SOURCE_FILE
        run_cfg = p / "config.yaml"
        if run_cfg.is_file():
            with open(run_cfg) as f:
                init = ((yaml.safe_load(f) or {}).get("checkpoint") or {}).get("init_from")
            if init:
                found = find_source(Path(init))
                if found:
                    return found
    return None


def _load_full(checkpoint: str, metadata: Dict[str, Any], keys: List[str]) -> Dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = {k: ShardedTensor.from_rank_offsets(k, torch.empty(tuple(metadata[k].global_shape), dtype=metadata[k].dtype))
          for k in keys}
    return dist_checkpointing.load(sd, checkpoint) if sd else {}


INDEX_NORMS = ("rmsnorm", "gemma")


def export_hf(checkpoint: str, out_dir: str, *, hf_config: Optional[str] = None, dtype: Optional[str] = None,
              max_shard_bytes: int = 4 << 30, show_progress: bool = True, index_norm: str = "rmsnorm") -> Dict[str, Any]:
    """Distributed checkpoint -> HF directory; returns a summary. ``hf_config``: a
    converted directory (hf_source.json) or an HF directory (config.json) describing the
    architecture; found automatically for checkpoints made by import_hf or trained from one.
    ``index_norm='gemma'`` stores index norm scales as MiniMax-M3's Gemma RMSNorm reads
    them (w - 1; exact for scales in [0.5, 2]); import_hf undoes it from config.json."""
    if index_norm not in INDEX_NORMS:
        raise ValueError(f"index_norm={index_norm!r} is invalid: allowed values are {', '.join(INDEX_NORMS)}")
    return _export_hf(checkpoint, out_dir, hf_config, dtype, max_shard_bytes, show_progress, index_norm)


@torch.no_grad()
def _export_hf(checkpoint, out_dir, hf_config, dtype, max_shard_bytes, show_progress, index_norm):
    from megatron.core import dist_checkpointing

    from ..training.checkpoint import resolve_checkpoint

    _check_out_dir(out_dir)
    path = resolve_checkpoint(checkpoint)
    source: Dict[str, Any] = {}
    if hf_config is None:
        found = find_source(path)
        if found is None:
            raise FileNotFoundError(f"{checkpoint}: no {SOURCE_FILE} in it, its parents or the run's init_from "
                                    "checkpoint; pass --hf-config (the converted or original HF directory)")
        hf_config = str(found.parent)
    if os.path.isfile(os.path.join(hf_config, SOURCE_FILE)):
        with open(os.path.join(hf_config, SOURCE_FILE)) as f:
            source = json.load(f)
        raw = dict(source["config"])
        files_dir = os.path.join(hf_config, FILES_DIR)
    else:
        raw = read_hf_config(hf_config)
        files_dir = hf_config
    for key in ("sparse_attention_config", "msa_megatron"):
        raw.pop(key, None)
    arch = HFArch.from_config(raw)
    out_dtype = arch.dtype if dtype is None else {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                  "fp16": torch.float16}[dtype]
    ensure_process_group()
    metadata = {k: v for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items()
                if k.startswith(("embedding.", "decoder.", "output_layer."))}
    n_layers = 1 + max((int(m.group(1)) for k in metadata if (m := re.match(r"decoder\.layers\.(\d+)\.", k))), default=-1)
    if n_layers != arch.num_layers:
        raise UnsupportedModelError(f"{path}: {n_layers} layers in the checkpoint, config.json says {arch.num_layers}")
    writer = SafetensorsWriter(out_dir, max_shard_bytes)
    written: List[str] = []
    index_layers: List[int] = []
    index_dim = None
    steps = [None] + list(range(arch.num_layers))
    for i in progress(steps, len(steps), f"export {arch.family}", show_progress):
        prefix = "decoder.layers." + (f"{i}." if i is not None else "")
        keys = [k for k in metadata if (k.startswith(prefix) if i is not None else not k.startswith(prefix))]
        tensors = _load_full(str(path), metadata, keys)
        pairs = ckpt_globals_to_hf(arch, tensors.__getitem__) if i is None else \
            ckpt_layer_to_hf(arch, i, tensors.__getitem__, tensors.__contains__)
        for key, value in pairs:
            if index_norm == "gemma" and key.endswith(("index_q_norm.weight", "index_k_norm.weight")):
                value = value.to(out_dtype) - 1  # in the output dtype: exact (Sterbenz) for scales in [0.5, 2]
            writer.add(key, value.to(out_dtype))
            written.append(key)
        if i is not None and f"{prefix}self_attention.indexer.index_k.weight" in tensors:
            index_layers.append(i)
            index_dim = tensors[f"{prefix}self_attention.indexer.index_k.weight"].shape[0]
        del tensors
    shards = writer.close()
    dtype_key = "torch_dtype" if "torch_dtype" in raw and "dtype" not in raw else "dtype"
    raw[dtype_key] = _DTYPE_NAMES[out_dtype]
    if index_layers:
        msa = dict(source.get("msa") or {})
        msa.update(_run_msa_settings(path))
        raw["sparse_attention_config"] = {
            "sparse_num_index_heads": arch.num_kv_heads, "sparse_index_dim": int(index_dim),
            "sparse_attention_freq": [int(i in index_layers) for i in range(arch.num_layers)],
            "sparse_disable_index_value": [int(i in index_layers) for i in range(arch.num_layers)]}
        raw["msa_megatron"] = {"block_size": msa.get("block_size"), "topk": msa.get("topk"),
                               "index_norm": index_norm, "index_norm_offset": int(index_norm == "gemma"),
                               "index_rope": msa.get("index_rope", True)}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    if os.path.isdir(files_dir):
        for n in os.listdir(files_dir):
            src = os.path.join(files_dir, n)
            if os.path.isfile(src) and n != "config.json" and not WEIGHT_FILE.search(n) and n != SOURCE_FILE:
                shutil.copy2(src, os.path.join(out_dir, n))
    return {"checkpoint": str(path), "family": arch.family, "tensors": len(written), "shards": shards,
            "msa_layers": index_layers, "dtype": _DTYPE_NAMES[out_dtype]}


def _run_msa_settings(step_dir: Path) -> Dict[str, Any]:
    """block_size / topk / index_rope of the run that wrote a training checkpoint (its config.yaml)."""
    import yaml

    for p in list(step_dir.parents)[:3]:
        if (p / "config.yaml").is_file():
            with open(p / "config.yaml") as f:
                msa = (((yaml.safe_load(f) or {}).get("attention") or {}).get("msa")) or {}
            return {k: msa[k] for k in ("block_size", "topk", "index_rope") if k in msa}
    return {}


__all__ = ["PRECISIONS", "SOURCE_FILE", "build_model", "ensure_process_group", "export_hf", "find_source", "import_hf",
           "msa_settings", "read_hf_config", "training_config"]

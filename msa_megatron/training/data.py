"""Training and held-out data through megatron.core.datasets.

Both sources, the embedded corpus and user datasets, are Megatron indexed datasets
(.bin/.idx), blended by BlendedMegatronDatasetBuilder into GPTDataset samples of
``seq_length + 1`` tokens; the split string carves a held-out range of documents from
each dataset. Token ids (vocabulary size, EOD) come from the ``<prefix>.meta.json`` that
the corpus builder and ``scripts/prepare_data.py`` write, or from data.vocab_size/eod_id.

The sampler is the trainer's data position: sample ``consumed_samples`` onwards, each
global batch split across data-parallel ranks the way Megatron-LM's pretraining sampler
does, so a resumed run reads exactly the batches the uninterrupted run would have read.
megatron-core ships no sampler, hence the few lines here.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import corpus
from .config import Config, ConfigError, UsageError

log = logging.getLogger(__name__)
_announced: set = set()


@dataclass(frozen=True)
class DataSources:
    prefixes: List[str]
    weights: List[float]
    vocab_size: int
    eod_id: int
    description: str


# --------------------------------------------------------------------------- C++ helpers
def ensure_dataset_helpers() -> str:
    """megatron.core.datasets needs its compiled helpers (helpers_cpp) to build sample
    indices. Wheels ship them prebuilt; source installs may lack them. Returns how they
    were obtained; if neither the prebuilt module nor a compile works, one clear error."""
    import importlib

    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return "prebuilt"
    except ImportError as prebuilt_error:
        reason = str(prebuilt_error)
    import sys

    import megatron.core.datasets as mds

    src = Path(mds.__file__).parent / "helpers.cpp"
    build_dir = corpus.default_cache_dir() / "helpers_cpp" / f"py{sys.version_info.major}{sys.version_info.minor}"
    log.warning("megatron.core.datasets.helpers_cpp is not importable (%s); compiling %s with the system C++ "
                "compiler into %s (once)", reason, src, build_dir)
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        module = load(name="helpers_cpp", sources=[str(src)], build_directory=str(build_dir),
                      extra_cflags=["-O3"], verbose=False)
    except Exception as e:  # noqa: BLE001 - report the compiler's failure as one error
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "error" in ln.lower() or "not found" in ln.lower()), lines[-1] if lines else "")
        log.debug("compiler output:\n%s", e)
        raise RuntimeError(
            "megatron.core.datasets needs its C++ helpers: the prebuilt helpers_cpp module is missing "
            f"({reason}) and compiling {src} failed ({type(e).__name__}: {cause}). Install a C++ compiler "
            "(g++) and ninja, or a megatron-core wheel that ships helpers_cpp."
        ) from None
    sys.modules["megatron.core.datasets.helpers_cpp"] = module
    mds.helpers_cpp = module
    return f"compiled into {build_dir}"


# --------------------------------------------------------------------------- checks
_IDX_MAGIC = b"MMIDIDX\x00\x00"
#: Megatron's indexed-dataset dtype codes.
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


def check_indexed(prefix: str, vocab_size: int, field: str, samples: int = 64, chunk: int = 4096) -> int:
    """Before megatron.core opens a dataset (it fails deep inside, naming no file): the .idx
    header and arrays parse, the .bin has exactly the size the index describes, and token ids
    in ``samples`` evenly spaced chunks of the .bin are < ``vocab_size``. Each problem is one
    UsageError naming ``field`` and the file. Returns the number of tokens."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    try:
        with open(idx, "rb") as f:
            head = f.read(34)
            if len(head) < 34 or head[:9] != _IDX_MAGIC:
                raise UsageError(field, prefix, f"{idx}: not a Megatron indexed-dataset index (bad header)")
            version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
            if version != 1 or code not in _IDX_DTYPES:
                raise UsageError(field, prefix, f"{idx}: unsupported index (version {version}, dtype code {code})")
            want = 34 + 4 * n_seq + 8 * n_seq + 8 * n_doc
            size = os.path.getsize(idx)
            if size != want:
                raise UsageError(field, prefix, f"{idx}: {size} bytes, its header describes {want} "
                                                f"({n_seq} sequences, {n_doc} documents): truncated or damaged")
            lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
            pointers = np.frombuffer(f.read(8 * n_seq), dtype=np.int64)
    except OSError as e:
        raise UsageError(field, prefix, f"{idx}: cannot be read ({e.strerror or e})") from None
    dtype = np.dtype(_IDX_DTYPES[code])
    tokens = int(lengths.astype(np.int64).sum())
    expected = tokens * dtype.itemsize
    if n_seq and (int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize != expected or (lengths < 0).any()):
        raise UsageError(field, prefix, f"{idx}: sequence offsets and lengths disagree (damaged index)")
    try:
        got = os.path.getsize(bin_)
    except OSError as e:
        raise UsageError(field, prefix, f"{bin_}: cannot be read ({e.strerror or e})") from None
    if got != expected:
        raise UsageError(field, prefix, f"{bin_}: {got} bytes, the index describes {expected} "
                                        f"({tokens} tokens of {dtype.name}): truncated, or not the .bin of this .idx")
    if tokens:
        data = np.memmap(bin_, dtype=dtype, mode="r")
        starts = np.linspace(0, max(0, tokens - chunk), num=min(samples, max(1, tokens // chunk))).astype(np.int64)
        top = max(int(data[s:s + chunk].max()) for s in starts)
        low = min(int(data[s:s + chunk].min()) for s in starts)
        del data
        if top >= vocab_size or low < 0:
            raise UsageError(field, prefix, f"{bin_}: token id {top if top >= vocab_size else low} is outside the "
                                            f"vocabulary 0..{vocab_size - 1} (sampled): the dataset was tokenized "
                                            "for another vocabulary (check data.vocab_size / <prefix>.meta.json)")
    return tokens


# --------------------------------------------------------------------------- sources
def resolve_sources(cfg: Config) -> DataSources:
    """Dataset prefixes, weights and token ids; builds the corpus cache when needed
    (call on one rank per node first; see :func:`prepare`)."""
    d = cfg.data
    if d.source == "corpus":
        c = d.corpus
        info = corpus.build_corpus(c.cache_dir, c.include_tests, c.min_doc_bytes, tuple(c.packages), c.order)
        check_indexed(info.prefix, info.vocab_size, "data.corpus.cache_dir")
        what = "stdlib" + "".join(f" + {p}" for p in c.packages) + ("" if c.order == "path" else f", {c.order} order")
        return DataSources([info.prefix], [1.0], info.vocab_size, info.eod_id,
                           f"embedded corpus: {info.documents} files ({what}), {info.tokens / 1e6:.1f}M byte tokens")
    prefixes = [e.path for e in d.blend]
    weights = [e.weight for e in d.blend]
    if d.vocab_size is not None:
        vocab, eod = d.vocab_size, d.eod_id
    else:
        ids = []
        for i, p in enumerate(prefixes):
            meta = corpus.read_meta(p)
            if meta is None:
                raise ConfigError(f"data.blend[{i}].path", p, "datasets with a <prefix>.meta.json (written by "
                                  "scripts/prepare_data.py), or set data.vocab_size and data.eod_id")
            ids.append((meta["vocab_size"], meta["eod_id"], meta.get("tokenizer")))
        if len(set(ids)) != 1:
            raise ConfigError("data.blend", prefixes, f"datasets sharing one tokenizer (found {sorted(set(ids), key=str)})")
        vocab, eod = ids[0][0], ids[0][1]
    for i, p in enumerate(prefixes):
        check_indexed(p, vocab, f"data.blend[{i}].path")
    return DataSources(prefixes, weights, vocab, eod,
                       "blend: " + ", ".join(f"{w:g} x {p}" for p, w in zip(prefixes, weights)))


def _tokenizer(vocab_size: int, eod_id: int):
    """GPTDataset reads eod/pad/vocab_size from a tokenizer object; a null tokenizer with
    our ids (pad -1: never collides with a real token) is all it needs."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=vocab_size,
                                             eod_id=eod_id, pad_id=-1)


def build_datasets(cfg: Config, sources: DataSources, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets via BlendedMegatronDatasetBuilder (a collective)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache = cfg.data.index_cache_dir or os.path.join(cfg.run_dir, "data_cache")
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=(sources.prefixes, sources.weights),
        split=cfg.data.split,
        path_to_cache=cache,
        tokenizer=_tokenizer(sources.vocab_size, sources.eod_id),
        reset_position_ids=cfg.data.packing == "eod",  # positions restart after each EOD: the documents
        reset_attention_mask=False,  # never an [s, s] mask: packed_micro_batch builds PackedSeqParams instead
        eod_mask_loss=cfg.data.mask_eod_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    has_valid = float(cfg.data.split.split(",")[1]) > 0
    sizes = [train_samples, valid_samples if has_valid else 0, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_config).build()
    return train, (valid if has_valid else None)


def held_out_composition(valid, names: Optional[List[str]] = None) -> Optional[Dict[str, object]]:
    """What the held-out split holds: its documents, their tokens, and the largest document's
    share (``names``: each document's source, from the corpus meta). Megatron's split is a
    contiguous range of documents, so a few outsized documents can dominate it (run 19: 28% of
    the embedded corpus's held-out bytes were one generated table). None when ``valid`` is not one
    GPTDataset over an indexed dataset (a blend of one is unwrapped)."""
    inner = getattr(valid, "datasets", None)  # BlendedDataset
    if inner is not None:
        if len(inner) != 1:
            return None
        valid = inner[0]
    docs = getattr(valid, "indices", None)
    lengths = getattr(getattr(valid, "dataset", None), "sequence_lengths", None)
    if docs is None or lengths is None or len(docs) == 0:
        return None
    sizes = np.asarray(lengths)[np.asarray(docs)]
    top = int(np.argmax(sizes))
    out = {"documents": int(len(docs)), "tokens": int(sizes.sum()), "largest_share": float(sizes[top] / sizes.sum()),
           "largest_document": int(docs[top])}
    if names is not None and 0 <= out["largest_document"] < len(names):
        out["largest_name"] = names[out["largest_document"]]
    return out


def describe_held_out(c: Dict[str, object]) -> str:
    name = f" ({c['largest_name']})" if "largest_name" in c else ""
    return (f"held-out split: {c['documents']} documents, {c['tokens'] / 1e6:.2f}M tokens; the largest, document "
            f"{c['largest_document']}{name}, is {100 * c['largest_share']:.1f}% of them")


# --------------------------------------------------------------------------- documents (data.packing=eod)
def packing_format(cfg: Config) -> str:
    """The packed layout the trainer feeds (docs/packed.md section 4): Megatron's THD (one row
    of b*s tokens, RoPE per document) when the layout allows it (cp = 1, and one sequence per
    pipeline message), else msa_megatron's sbhd form (rows kept, cu_seqlens over the rows end
    to end; RoPE at global positions, equal up to rounding since only same-document pairs meet)."""
    p = cfg.parallel
    return "thd" if p.cp == 1 and (p.pp == 1 or cfg.train.micro_batch_size == 1) else "sbhd"


def document_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [n_docs + 1] (int32) of a [b, s] micro-batch whose position ids restart at 0
    with every document (GPTDataset's reset_position_ids), rows laid end to end: a document
    starts at every position id 0 and at every row start."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s]; got shape {tuple(position_ids.shape)}")
    new = position_ids == 0
    new[:, 0] = True
    starts = torch.nonzero(new.reshape(-1)).flatten()
    end = torch.tensor([position_ids.numel()], dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def packed_micro_batch(batch: Dict[str, torch.Tensor], fmt: str, device=None):
    """data.packing=eod: (batch, PackedSeqParams) for one micro-batch of [b, s] tensors (before the
    CP split). THD flattens every tensor to [1, b*s]; sbhd keeps [b, s]. cu_seqlens go to
    ``device``; everything else stays where it is."""
    from megatron.core.packed_seq_params import PackedSeqParams

    pos = batch["position_ids"]
    b, s = pos.shape
    cu = document_boundaries(pos.cpu())
    if fmt == "thd":
        batch = {k: (v.reshape(1, b * s) if v is not None else None) for k, v in batch.items()}
        longest = int((cu[1:] - cu[:-1]).max())
    elif fmt == "sbhd":
        longest = s  # RoPE table of the whole row (global positions; under CP the row before the split)
    else:
        raise ValueError(f"packing format {fmt!r}: allowed values are thd, sbhd")
    cu = cu.to(device) if device is not None else cu
    if fmt not in _announced:
        _announced.add(fmt)
        log.info("data.packing=eod: a document mask at every EOD in every layer (PackedSeqParams qkv_format=%s)", fmt)
    return batch, PackedSeqParams(qkv_format=fmt, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                  max_seqlen_kv=longest)


# --------------------------------------------------------------------------- loading
class PretrainingSampler:
    """Yields this data-parallel rank's micro-batch indices from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        chunk = self.mbs * self.dp_size
        for base in range(self.consumed, self.total - chunk + 1, chunk):
            yield list(range(base + self.dp_rank * self.mbs, base + (self.dp_rank + 1) * self.mbs))


def make_loader(dataset, consumed_samples: int, cfg: Config, dp_rank: int, dp_size: int):
    sampler = PretrainingSampler(len(dataset), consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=cfg.data.num_workers > 0,
    )


def samples_needed(cfg: Config) -> Tuple[int, int]:
    """(train, valid) sample counts for the whole run; validation reuses the same
    ``eval_iters`` held-out global batches at every evaluation, so curves are comparable."""
    gbs = cfg.train.global_batch_size
    train = cfg.total_steps() * gbs
    valid = cfg.train.eval_iters * gbs if cfg.train.eval_interval > 0 else gbs
    return train, valid


__all__ = ["DataSources", "PretrainingSampler", "build_datasets", "document_boundaries", "ensure_dataset_helpers",
           "make_loader", "packed_micro_batch", "packing_format",
           "resolve_sources", "samples_needed"]

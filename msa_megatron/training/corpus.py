"""The embedded default corpus: this interpreter's standard-library sources as byte-level
tokens, built once into a Megatron indexed dataset (.bin/.idx) in a cache directory.
``packages`` adds the .py sources of installed packages after the stdlib's (e.g. torch: ~46M
bytes, where a distribution's stripped stdlib has ~10M): more tokens, still no download.

It exists on every machine with no download, its documents (whole source files) are long
enough to exceed a tiny MSA budget, and code has the long-range structure (definitions
used far below) that makes block selection meaningful. Tokens: one per byte (0..255) and
EOD = 256 after each document, vocabulary 257. File order is the sorted relative POSIX
path, so two machines with the same Python build get the same token stream; the cache
key hashes that file list with sizes, so a different Python gets its own cache entry.

Megatron's ``data.split`` carves its held-out range from the END of the document order, so
in path order the held-out set is the last files alphabetically: with torch's sources added,
43 files of torch/utils and torch/xpu, 28% of their bytes one generated table
(torch/utils/hipify/cuda_to_hip_mappings.py). ``order="shuffled"`` puts the documents in a
fixed pseudo-random order (sorted by a hash of their path) instead, so every split range is a
sample of the whole corpus.

Writes are atomic (temporary directory + rename), so concurrent ranks or an interrupted
build never leave a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..config import ConfigError

log = logging.getLogger(__name__)

#: Bump when the token layout or the meta changes: old cache entries are then ignored
#: (2: the meta lists each document's source file).
CORPUS_FORMAT = 2
BYTE_VOCAB = 257
BYTE_EOD = 256
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
#: document orders (data.corpus.order): sorted path, or sorted by a hash of the path
ORDERS = ("path", "shuffled")


@dataclass(frozen=True)
class CorpusInfo:
    prefix: str
    documents: int
    tokens: int
    vocab_size: int = BYTE_VOCAB
    eod_id: int = BYTE_EOD


def default_cache_dir() -> Path:
    return Path(os.environ.get("MSA_CACHE_DIR") or Path.home() / ".cache" / "msa_megatron")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _py_files(root: Path, include_tests: bool, min_doc_bytes: int) -> List[Path]:
    """.py files under ``root`` of at least ``min_doc_bytes``, sorted by relative path; no
    caches, installed packages or (unless ``include_tests``) test directories."""
    out = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _EXCLUDED_DIRS.intersection(parts):
            continue
        if not include_tests and _TEST_DIRS.intersection(parts[:-1]):
            continue
        if path.is_file() and path.stat().st_size >= max(min_doc_bytes, 1):
            out.append(path)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    return out


def corpus_files(include_tests: bool = False, min_doc_bytes: int = 0, root: Optional[Path] = None) -> List[Path]:
    """The standard library's .py files in deterministic (sorted relative path) order."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} (sysconfig stdlib) does not exist")
    out = _py_files(root, include_tests, min_doc_bytes)
    if not out:
        raise FileNotFoundError(f"no standard-library source files of >= {min_doc_bytes} bytes under {root}")
    return out


def package_root(name: str) -> Path:
    """The source directory of an installed package (``data.corpus.packages`` entry)."""
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    locs = list(spec.submodule_search_locations or []) if spec else []
    if not locs or not Path(locs[0]).is_dir():
        raise ConfigError("data.corpus.packages", name, "names of installed Python packages (directories with "
                          "sources, e.g. torch)")
    return Path(locs[0])


def package_files(name: str, include_tests: bool = False, min_doc_bytes: int = 0) -> Tuple[Path, List[Path]]:
    """(root, .py files) of one installed package, the stdlib's rules (tests, size, order)."""
    root = package_root(name)
    return root, _py_files(root, include_tests, min_doc_bytes)


def _cache_key(groups: List[Tuple[str, Path, List[Path]]], include_tests: bool, min_doc_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(f"{CORPUS_FORMAT}|{sys.version}|{include_tests}|{min_doc_bytes}".encode())
    for label, root, files in groups:
        if label != "stdlib":  # the stdlib-only key stays what it was (existing caches stay valid)
            h.update(f"[{label}]\n".encode())
        for f in files:
            h.update(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _documents(include_tests: bool, min_doc_bytes: int, packages: Tuple[str, ...],
               order: str) -> Tuple[str, List[Tuple[str, Path]]]:
    """(cache key, documents in corpus order as ("<group>/<relative path>", file)); group: stdlib
    or the package's name. ``shuffled`` sorts by a hash of that label: the same order on every
    machine with the same files, unrelated to where a file sits in the tree."""
    if order not in ORDERS:
        raise ConfigError("data.corpus.order", order, ", ".join(ORDERS))
    root = stdlib_root()
    groups = [("stdlib", root, corpus_files(include_tests, min_doc_bytes, root))]
    for name in packages:
        groups.append((name, *package_files(name, include_tests, min_doc_bytes)))
    docs = [(f"{label}/{f.relative_to(r).as_posix()}", f) for label, r, files in groups for f in files]
    if order == "shuffled":
        docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    return _cache_key(groups, include_tests, min_doc_bytes), docs


def _prefix(cache_dir: Optional[str], key: str, packages: Tuple[str, ...], order: str) -> str:
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tag = "" if order == "path" else f"-{order}"  # path order: the name it had before the field
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}{''.join('+' + p for p in packages)}{tag}-{key}"
    return str(base / "corpus" / name / "stdlib")


def corpus_prefix(cache_dir: Optional[str] = None, include_tests: bool = False, min_doc_bytes: int = 2048,
                  packages: Tuple[str, ...] = (), order: str = "path") -> Tuple[str, List[Path]]:
    """(dataset prefix in the cache, the documents' files in corpus order)."""
    key, docs = _documents(include_tests, min_doc_bytes, tuple(packages), order)
    return _prefix(cache_dir, key, tuple(packages), order), [f for _, f in docs]


def read_meta(prefix: str) -> Optional[dict]:
    path = Path(prefix + ".meta.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def build_corpus(cache_dir: Optional[str] = None, include_tests: bool = False, min_doc_bytes: int = 2048,
                 packages: Tuple[str, ...] = (), order: str = "path") -> CorpusInfo:
    """Return the cached corpus, building it first if needed (safe to call from every rank)."""
    key, docs = _documents(include_tests, min_doc_bytes, tuple(packages), order)
    prefix, files = _prefix(cache_dir, key, tuple(packages), order), [f for _, f in docs]
    meta = read_meta(prefix)
    if meta is not None and Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return CorpusInfo(prefix, meta["documents"], meta["tokens"])
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final_dir = Path(prefix).parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".building-", dir=final_dir.parent))
    try:
        tmp_prefix = str(tmp_dir / "stdlib")
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=np.uint16)
        tokens = 0
        eod = np.array([BYTE_EOD], dtype=np.uint16)
        for f in files:
            doc = np.concatenate([np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16), eod])
            builder.add_document(doc, [doc.size])
            tokens += doc.size
        builder.finalize(tmp_prefix + ".idx")
        meta = {
            "format": CORPUS_FORMAT, "tokenizer": "byte", "vocab_size": BYTE_VOCAB, "eod_id": BYTE_EOD,
            "documents": len(files), "tokens": tokens, "python": sys.version, "stdlib": str(stdlib_root()),
            "packages": list(packages), "order": order,
            # each document's source, in document order: lets a run name what its held-out split holds
            "files": [label for label, _ in docs],
        }
        Path(tmp_prefix + ".meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp_dir, final_dir)  # atomic; fails if another process won the race
        except OSError:
            if read_meta(prefix) is None:
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("built the embedded corpus: %d files (stdlib%s, %s order), %.1fM byte tokens -> %s", len(files),
             "".join(" + " + p for p in packages), order, tokens / 1e6, prefix)
    return CorpusInfo(prefix, len(files), tokens)


__all__ = ["BYTE_EOD", "BYTE_VOCAB", "ORDERS", "CorpusInfo", "build_corpus", "corpus_files", "corpus_prefix", "default_cache_dir",
           "package_files", "package_root", "read_meta"]

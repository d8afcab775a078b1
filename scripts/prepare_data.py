#!/usr/bin/env python
"""Build a Megatron indexed dataset (<prefix>.bin/.idx + <prefix>.meta.json) for msa-train.

    python scripts/prepare_data.py --input docs.jsonl more/*.txt --output-prefix data/mix
    python scripts/prepare_data.py --input web.jsonl --tokenizer path/to/tokenizer.json \\
        --eod-token '<|endoftext|>' --output-prefix data/web

Inputs: .jsonl (one document per line, text under --json-key) and plain text files (one
document per file, or per line / blank-line-separated paragraph with --text-docs).
Tokenizers: ``byte`` (default; UTF-8 bytes 0..255 + EOD 256, vocabulary 257, the same ids
as the embedded corpus) or a Hugging Face ``tokenizer.json`` read with the `tokenizers`
library (a local file; nothing is downloaded). Every document ends with EOD.
The .meta.json records the vocabulary size and EOD id; msa-train reads it, so a blend of
several prepared datasets needs no tokenizer settings (they must share one tokenizer).
Train with:  msa-train data=indexed 'data.blend=[{path:data/mix,weight:1.0}]'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

BYTE_VOCAB, BYTE_EOD = 257, 256
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class PrepareError(RuntimeError):
    """A bad input or option, reported as one line."""


def _decode(data: bytes, where: str, errors: str) -> str:
    """UTF-8 text of ``data``; invalid bytes are one PrepareError (errors=strict) or
    replaced by U+FFFD with a note naming the file (errors=replace)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors != "replace":
            raise PrepareError(f"{where}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                               "convert it to UTF-8, or pass --errors replace to substitute U+FFFD") from None
        print(f"prepare_data: note: {where}: invalid UTF-8 replaced by U+FFFD (--errors replace)", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


def iter_documents(paths: List[str], json_key: str, text_docs: str, errors: str = "strict") -> Iterator[Tuple[str, str]]:
    """(source, text) for every document of every input, in argument order."""
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise PrepareError(f"--input {raw}: no such file")
        if path.suffix in (".jsonl", ".json"):
            with open(path, "rb") as f:
                for n, data in enumerate(f, 1):
                    line = _decode(data, f"{raw}:{n}", errors)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PrepareError(f"{raw}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                        raise PrepareError(f"{raw}:{n}: no string field {json_key!r} (set --json-key)")
                    yield f"{raw}:{n}", record[json_key]
        else:
            text = _decode(path.read_bytes(), raw, errors)
            if text_docs == "file":
                parts = [text]
            elif text_docs == "line":
                parts = text.splitlines()
            else:
                parts = text.split("\n\n")
            for i, part in enumerate(parts):
                if part.strip():
                    yield f"{raw}#{i}", part


def byte_tokenizer() -> Tuple[Callable[[str], List[int]], int, int, str]:
    return (lambda text: list(text.encode("utf-8"))), BYTE_VOCAB, BYTE_EOD, "byte"


def file_tokenizer(path: str, eod_token: Optional[str]) -> Tuple[Callable[[str], List[int]], int, int, str]:
    if not Path(path).is_file():
        raise PrepareError(f"--tokenizer {path}: no such file (give 'byte' or a local tokenizer.json)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PrepareError("--tokenizer <file> needs the `tokenizers` library (pip install tokenizers); "
                           "or use --tokenizer byte") from None
    tok = Tokenizer.from_file(path)
    candidates = (eod_token,) if eod_token else EOD_CANDIDATES
    eod = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    if eod is None:
        raise PrepareError(f"--eod-token: none of {list(candidates)} is in {path}; name its end-of-document token")
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), tok.get_vocab_size(), eod, f"file:{os.path.abspath(path)}"


def build(inputs: List[str], output_prefix: str, tokenizer: str = "byte", eod_token: Optional[str] = None,
          json_key: str = "text", text_docs: str = "file", errors: str = "strict") -> dict:
    """Tokenize every document and write the dataset atomically. Returns the metadata."""
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise PrepareError(f"--input {missing[0]}: no such file")
    encode, vocab, eod, name = byte_tokenizer() if tokenizer == "byte" else file_tokenizer(tokenizer, eod_token)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # heavy: after the cheap checks

    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tmp = tmp_dir / out.name
        builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
        docs = tokens = 0
        for _, text in iter_documents(inputs, json_key, text_docs, errors):
            ids = encode(text)
            ids.append(eod)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            docs += 1
            tokens += len(ids)
        if docs == 0:
            raise PrepareError("the inputs hold no non-empty document")
        builder.finalize(str(tmp) + ".idx")
        meta = {"tokenizer": name, "vocab_size": vocab, "eod_id": eod, "documents": docs, "tokens": tokens,
                "sources": [os.path.abspath(p) for p in inputs]}
        Path(str(tmp) + ".meta.json").write_text(json.dumps(meta, indent=1))
        for suffix in (".bin", ".idx", ".meta.json"):  # metadata last: it marks completeness
            os.replace(str(tmp) + suffix, str(out) + suffix)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl or text files")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx, .meta.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local HF tokenizer.json")
    p.add_argument("--eod-token", default=None, help="end-of-document token of a tokenizer file")
    p.add_argument("--json-key", default="text")
    p.add_argument("--text-docs", choices=("file", "line", "paragraph"), default="file",
                   help="documents of a text file: the whole file, each line, or blank-line-separated paragraphs")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="input that is not valid UTF-8: strict (default) stops naming the file and byte; replace "
                        "substitutes U+FFFD and says so once per file or line")
    a = p.parse_args(argv)
    try:
        meta = build(a.input, a.output_prefix, a.tokenizer, a.eod_token, a.json_key, a.text_docs, a.errors)
    except PrepareError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output_prefix}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens, "
          f"vocab {meta['vocab_size']}, EOD {meta['eod_id']} ({meta['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data pipeline: the embedded corpus, scripts/prepare_data.py (byte-level and a
tokenizer file), a weighted blend of several indexed datasets through
megatron.core.datasets, the held-out split, the resumable sampler, and the C++ helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from msa_megatron.training import corpus
from msa_megatron.training.data import PretrainingSampler, build_datasets, resolve_sources, samples_needed

from .test_config import cfg_of

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_data  # noqa: E402


def test_corpus_is_the_stdlib_in_order_and_cached(cache_dir):
    files = corpus.corpus_files(min_doc_bytes=2048)
    root = corpus.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/")[:-1])
    info = corpus.build_corpus(str(cache_dir), min_doc_bytes=2048)
    assert info.documents == len(files)
    assert info.tokens == sum(f.stat().st_size for f in files) + len(files)  # bytes + one EOD each
    mtime = Path(info.prefix + ".bin").stat().st_mtime_ns
    assert corpus.build_corpus(str(cache_dir), min_doc_bytes=2048) == info  # cached: no rebuild
    assert Path(info.prefix + ".bin").stat().st_mtime_ns == mtime

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(info.prefix)
    first = ds[0]
    assert bytes(first[:-1].astype(np.uint8)) == files[0].read_bytes() and first[-1] == corpus.BYTE_EOD
    assert len(ds) == len(files)
    # Documents exceed the tiny MSA budget (block 16 x top-4 = 64 tokens) by far.
    assert np.median(ds.sequence_lengths) > 16 * 64


def test_corpus_shuffled_order_spreads_the_held_out_range_over_the_corpus(cache_dir):
    """data.corpus.order=shuffled: the same documents in a fixed order by a hash of the path, so
    Megatron's split (a contiguous range at the end of the document order) samples every part of
    the tree, where path order gives it the last files alphabetically; its own cache entry."""
    from msa_megatron.training.config import ConfigError

    root = corpus.stdlib_root()
    path_prefix, by_path = corpus.corpus_prefix(str(cache_dir), packages=("omegaconf",))
    prefix, shuffled = corpus.corpus_prefix(str(cache_dir), packages=("omegaconf",), order="shuffled")
    assert corpus.corpus_prefix(str(cache_dir), packages=("omegaconf",), order="shuffled") == (prefix, shuffled)
    assert sorted(map(str, shuffled)) == sorted(map(str, by_path)) and shuffled != by_path
    assert prefix != path_prefix and "-shuffled-" in prefix

    n = len(by_path)
    where = {f: i for i, f in enumerate(by_path)}
    tail = [where[f] for f in shuffled[-max(1, n // 20):]]  # a 5% held-out range at the end, in path order
    assert min(tail) < n // 4 and max(tail) >= 3 * n // 4  # from every part of the tree, where path order
    assert abs(sum(tail) / len(tail) - n / 2) < n / 6       # gives the alphabetically last 5%
    info = corpus.build_corpus(str(cache_dir), packages=("omegaconf",), order="shuffled")
    assert corpus.read_meta(info.prefix)["order"] == "shuffled" and info.documents == len(shuffled)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(info.prefix)
    for i in (0, len(shuffled) // 2, len(shuffled) - 1):  # stored in the shuffled order
        assert bytes(ds[i][:-1].astype(np.uint8)) == shuffled[i].read_bytes()
    with pytest.raises(ConfigError, match="data.corpus.order.*path, shuffled"):
        corpus.build_corpus(str(cache_dir), order="random")


def test_held_out_composition_names_the_split_and_its_largest_document(cache_dir, tmp_path):
    """Run 19: the held-out loss is measured on Megatron's last 2% of the documents, which a few
    outsized files can dominate; a run states what its held-out split holds (an event in
    metrics.jsonl), from the corpus meta's list of document sources."""
    from msa_megatron.training.data import describe_held_out, held_out_composition

    cfg = cfg_of(f"data.corpus.cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "train.steps=4",
                 "train.seq_length=128", "train.eval_interval=2")
    sources = resolve_sources(cfg)
    _, valid = build_datasets(cfg, sources, *samples_needed(cfg))
    _, files = corpus.corpus_prefix(str(cache_dir))
    names = corpus.read_meta(sources.prefixes[0])["files"]
    assert names == ["stdlib/" + f.relative_to(corpus.stdlib_root()).as_posix() for f in files]
    n = len(files)
    tail = files[int(round(0.98 * n)):]  # data.split "98,2,0": the last 2% of the documents
    comp = held_out_composition(valid, names)
    sizes = [f.stat().st_size + 1 for f in tail]  # bytes + EOD
    assert comp["documents"] == len(tail) and comp["tokens"] == sum(sizes)
    assert comp["largest_share"] == pytest.approx(max(sizes) / sum(sizes))
    assert comp["largest_name"] == names[comp["largest_document"]] == "stdlib/" + tail[int(np.argmax(sizes))].relative_to(
        corpus.stdlib_root()).as_posix()
    text = describe_held_out(comp)
    assert text.startswith(f"held-out split: {len(tail)} documents, ") and f"({comp['largest_name']})" in text
    assert held_out_composition(None) is None and held_out_composition(object()) is None


def test_corpus_packages_append_installed_sources_after_the_stdlib(cache_dir):
    from msa_megatron.training.config import ConfigError

    std = corpus.corpus_files(min_doc_bytes=2048)
    root, extra = corpus.package_files("omegaconf", min_doc_bytes=2048)
    rel = [f.relative_to(root).as_posix() for f in extra]
    assert root.name == "omegaconf" and rel == sorted(rel) and len(rel) >= 3
    info = corpus.build_corpus(str(cache_dir), min_doc_bytes=2048, packages=("omegaconf",))
    plain = corpus.build_corpus(str(cache_dir), min_doc_bytes=2048)
    assert info.prefix != plain.prefix and "+omegaconf" in info.prefix  # its own cache entry
    assert info.documents == len(std) + len(extra)
    assert info.tokens == plain.tokens + sum(f.stat().st_size + 1 for f in extra)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(info.prefix)
    assert bytes(ds[len(std)][:-1].astype(np.uint8)) == extra[0].read_bytes()  # packages after the stdlib
    for bad in ("no_such_package_xyz", "os.path", "sys"):  # missing, not a name, no source directory
        with pytest.raises(ConfigError, match="data.corpus.packages"):
            corpus.build_corpus(str(cache_dir), packages=(bad,))


def test_prepare_data_byte_level(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "héllo world"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("para one\n\npara two\n")
    meta = prepare_data.build([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], str(tmp_path / "out" / "ds"),
                              text_docs="paragraph")
    assert (meta["vocab_size"], meta["eod_id"], meta["documents"], meta["tokenizer"]) == (257, 256, 4, "byte")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out" / "ds"))
    docs = [bytes(ds[i][:-1].astype(np.uint8)).decode() for i in range(len(ds))]
    assert docs == ["héllo world", "second", "para one", "para two\n"]
    assert all(ds[i][-1] == 256 for i in range(len(ds)))
    assert not list((tmp_path / "out").glob(".ds-*"))  # no temporary left behind


def test_prepare_data_with_a_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"body": "hello world hello"}) + "\n")
    meta = prepare_data.build([str(tmp_path / "in.jsonl")], str(tmp_path / "tok"), tokenizer=str(tmp_path / "tokenizer.json"),
                              json_key="body")
    assert (meta["vocab_size"], meta["eod_id"]) == (4, 1)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "tok"))  # keep it alive: ds[0] is a view into its mmap (closed on __del__)
    assert ds[0].tolist() == [2, 3, 2, 1]
    with pytest.raises(prepare_data.PrepareError, match="--eod-token"):
        prepare_data.build([str(tmp_path / "in.jsonl")], str(tmp_path / "t2"), tokenizer=str(tmp_path / "tokenizer.json"),
                           eod_token="</s>", json_key="body")


def test_prepare_data_errors(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--input", str(tmp_path / "nope.jsonl"),
                        "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (r.returncode, r.stderr.strip()) == (2, f"prepare_data: error: --input {tmp_path / 'nope.jsonl'}: no such file")
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(prepare_data.PrepareError, match=r"bad\.jsonl:1: no string field 'text' \(set --json-key\)"):
        prepare_data.build([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"))
    assert not (tmp_path / "o.bin").exists()


def _prepared(tmp_path, name: str, char: str, docs: int) -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": char * 700}) + "\n" for _ in range(docs)))
    prepare_data.build([str(path)], str(tmp_path / name))
    return str(tmp_path / name)


def test_blend_of_indexed_datasets_follows_weights(tmp_path):
    a, b = _prepared(tmp_path, "aaa", "a", 60), _prepared(tmp_path, "bbb", "b", 60)
    cfg = cfg_of("data=indexed", f"data.blend=[{{path:{a},weight:3}},{{path:{b},weight:1}}]", "data.split='90,10,0'",
                 f"run_dir={tmp_path / 'run'}", "train.steps=20", "train.seq_length=128", "train.eval_interval=5")
    sources = resolve_sources(cfg)
    assert (sources.vocab_size, sources.eod_id) == (257, 256)
    train, valid = build_datasets(cfg, sources, *samples_needed(cfg))
    counts = Counter()
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        counts["a"] += int((tokens == ord("a")).sum())
        counts["b"] += int((tokens == ord("b")).sum())
    assert counts["a"] / (counts["a"] + counts["b"]) == pytest.approx(0.75, abs=0.05)
    sample = train[0]
    assert sample["tokens"].shape == (128,) and sample["labels"].shape == (128,)
    assert (sample["labels"][:-1] == sample["tokens"][1:]).all()
    assert valid is not None and len(valid) >= cfg.train.eval_iters * cfg.train.global_batch_size


def test_blend_refuses_mixed_tokenizers(tmp_path):
    a = _prepared(tmp_path, "aaa", "a", 5)
    meta = json.loads(Path(a + ".meta.json").read_text())
    b = _prepared(tmp_path, "bbb", "b", 5)
    Path(b + ".meta.json").write_text(json.dumps(dict(meta, vocab_size=50000, eod_id=0)))
    from msa_megatron.training.config import ConfigError

    cfg = cfg_of("data=indexed", f"data.blend=[{{path:{a},weight:1}},{{path:{b},weight:1}}]")
    with pytest.raises(ConfigError, match=r"^data\.blend=.*datasets sharing one tokenizer"):
        resolve_sources(cfg)


def test_sampler_resumes_at_the_data_position():
    full = [list(PretrainingSampler(64, 0, 2, r, 2)) for r in range(2)]
    resumed = [list(PretrainingSampler(64, 24, 2, r, 2)) for r in range(2)]
    for r in range(2):
        assert resumed[r] == full[r][6:]  # 24 samples = 6 micro-batches of 2 per rank x 2 ranks
    assert sorted(i for r in range(2) for batch in full[r] for i in batch) == list(range(64))


def test_helpers_prebuilt_and_clear_error_when_they_cannot_be_built(tmp_path, monkeypatch):
    from msa_megatron.training.data import ensure_dataset_helpers

    assert ensure_dataset_helpers() == "prebuilt"
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # a wheel without it
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # and no working compiler
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        ensure_dataset_helpers()
    message = str(info.value)
    assert "needs its C++ helpers" in message and "Install a C++ compiler" in message and "\n" not in message


@pytest.mark.skipif(not os.environ.get("MSA_TEST_COMPILE_HELPERS"), reason="compiles helpers.cpp (~40 s); "
                    "set MSA_TEST_COMPILE_HELPERS=1 to run")
def test_helpers_compile_when_missing(tmp_path):
    code = ("import sys; sys.modules['megatron.core.datasets.helpers_cpp'] = None\n"
            "from msa_megatron.training.data import ensure_dataset_helpers\n"
            "print(ensure_dataset_helpers())\nfrom megatron.core.datasets import helpers\nprint('OK', helpers.build_sample_idx)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO), MSA_CACHE_DIR=str(tmp_path)))
    assert "compiled into" in r.stdout and "OK" in r.stdout, r.stdout + r.stderr


def test_prepare_data_tokenizer_file_without_the_library(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(prepare_data.PrepareError, match=r"needs the `tokenizers` library \(pip install tokenizers\)"):
        prepare_data.build([str(tmp_path / "in.jsonl")], str(tmp_path / "o"), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(prepare_data.PrepareError, match="no such file"):
        prepare_data.build([str(tmp_path / "in.jsonl")], str(tmp_path / "o"), tokenizer=str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ damaged or unsuitable data (issue 18.7)
def test_damaged_or_foreign_datasets_are_one_line_naming_the_file(tmp_path):
    from msa_megatron.training.config import UsageError
    from msa_megatron.training.data import check_indexed

    prefix = _prepared(tmp_path, "ok", "z", 40)
    assert check_indexed(prefix, 257, "data.blend[0].path") == 40 * 701
    # data.vocab_size smaller than the data's token ids (EOD 256): trained silently before
    with pytest.raises(UsageError, match=r"^data\.blend\[0\]\.path=.*ok: .*ok\.bin: token id 256 is outside the "
                                         r"vocabulary 0\.\.99 \(sampled\)"):
        check_indexed(prefix, 100, "data.blend[0].path")
    cfg = cfg_of("data=indexed", f"data.blend=[{{path:{prefix},weight:1}}]", "data.vocab_size=100", "data.eod_id=99")
    with pytest.raises(UsageError, match="token id 256 is outside"):
        resolve_sources(cfg)
    bin_, idx = Path(prefix + ".bin"), Path(prefix + ".idx")
    good_bin, good_idx = bin_.read_bytes(), idx.read_bytes()
    bin_.write_bytes(good_bin[:1000])  # truncated .bin
    with pytest.raises(UsageError, match=r"ok\.bin: 1000 bytes, the index describes 56080 \(28040 tokens of uint16\): "
                                         r"truncated"):
        check_indexed(prefix, 257, "data.blend[0].path")
    bin_.write_bytes(good_bin)
    idx.write_bytes(good_idx[:-8])  # truncated .idx
    with pytest.raises(UsageError, match=r"ok\.idx: \d+ bytes, its header describes \d+ \(40 sequences, 41 documents\)"):
        check_indexed(prefix, 257, "data.blend[0].path")
    idx.write_bytes(os.urandom(len(good_idx)))  # garbage .idx
    with pytest.raises(UsageError, match=r"ok\.idx: not a Megatron indexed-dataset index \(bad header\)"):
        check_indexed(prefix, 257, "data.blend[0].path")


def test_prepare_data_non_utf8_input(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--input", str(tmp_path / "latin1.jsonl"),
                        "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"prepare_data: error: {tmp_path / 'latin1.jsonl'}:2: not valid UTF-8 (byte 13: b'\\xe9'); convert it to "
        "UTF-8, or pass --errors replace to substitute U+FFFD"), r.stderr
    meta = prepare_data.build([str(tmp_path / "latin1.jsonl")], str(tmp_path / "o"), errors="replace")
    assert meta["documents"] == 2 and meta["tokens"] == 3 + len("caf\ufffd".encode()) + 1

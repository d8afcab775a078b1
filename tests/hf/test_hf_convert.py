"""Hugging Face parity and round trips against real ``transformers`` models.

One spawned one-process gloo job (Megatron's CPU layer patches torch, so it stays out of
the pytest process) builds tiny random models of every supported family with
``transformers``, converts them, and measures; the assertions run here:

* logits of our model in dense mode == transformers' (eager attention), fp32, within
  ATOL/RTOL of hf_cases (same math, different op order);
* MSA with the full budget (top-3 x block 16 = 48 >= 40 tokens) == dense, same tolerance;
  at 100 tokens the same model is genuinely sparse and must differ;
* HF -> ours -> HF is bit-equal (bf16 Qwen2: biases; GLM: fused gate_up_proj; Qwen2-MoE: gated
  shared expert; Qwen3-MoE: experts, q/k norm), and
  HF(with index) -> ours -> HF is bit-equal including the MiniMax-M3-named index tensors;
* the exported directory loads with ``from_pretrained`` and gives the source's logits.

A two-process job loads a converted checkpoint at TP=2 (Qwen2) and at EP=2 (Qwen2-MoE)
and checks the logits against transformers again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # hf_cases, also in the pytest process
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from hf_cases import LLAMA3_ROPE  # noqa: E402
from tests.dist_harness import run_distributed  # noqa: E402

ENV = {"PYTHONPATH": str(HERE)}
FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "glm", "mixtral", "qwen2_moe", "qwen3_moe")
MSA_ARGS = dict(block_size=16, topk=3, index_dim=16, dense_layers=1)
ROUND_TRIPS = ("qwen2", "glm", "qwen2_moe", "qwen3_moe", "llama3")


def _tensors(path: str):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _parity(tmp: str, family: str, tie: bool = False):
    from hf_cases import SEQ, VOCAB, hf_logits, make_hf_model, our_logits

    from msa_megatron.hf import import_hf

    hf_dir = os.path.join(tmp, f"{family}{'_tied' if tie else ''}")
    hf = make_hf_model(family, hf_dir, seed=len(family), tie=tie)
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, VOCAB, (2, SEQ), generator=gen), torch.randint(0, VOCAB, (2, 100), generator=gen)
    ref_short, ref_long = hf_logits(hf, short), hf_logits(hf, long)
    model, report = import_hf(hf_dir, os.path.join(tmp, "unused"), save=False, show_progress=False, **MSA_ARGS)

    def err(a, b):  # max |a - b| / (ATOL + RTOL |b|): <= 1 passes
        from hf_cases import ATOL, RTOL

        return float(((a - b).abs() / (ATOL + RTOL * b.abs())).max())

    dense_long = our_logits(model, long, "dense")
    out = {
        "dense": err(our_logits(model, short, "dense"), ref_short),
        "dense_long": err(dense_long, ref_long),
        "msa_full_budget": err(our_logits(model, short, "msa"), ref_short),
        "msa_sparse_maxdiff": float((our_logits(model, long, "msa") - dense_long).abs().max()),
        "msa_layers": report["msa_layers"],
        "index_init": sorted({a["init"] for a in report["index_initialised"]}),
    }
    if family == "llama3":  # the same weights with plain RoPE must miss transformers' logits
        import json
        import shutil

        plain = hf_dir + "_plain_rope"
        shutil.copytree(hf_dir, plain)
        cfg = json.load(open(os.path.join(plain, "config.json")))
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
        json.dump(cfg, open(os.path.join(plain, "config.json"), "w"))
        unscaled, _ = import_hf(plain, os.path.join(tmp, "unused"), save=False, show_progress=False, **MSA_ARGS)
        out["plain_rope_dense_long"] = err(our_logits(unscaled, long, "dense"), ref_long)
        out["rope_extra"] = model.config.rope_llama3_scaling
    return out


def _round_trips(tmp: str):
    """CLI: bf16 HF -> ours -> HF (bit-equal), then the export -> ours -> HF (bit-equal, index included)."""
    from hf_cases import make_hf_model

    from msa_megatron.convert_cli import main
    from msa_megatron.training.checkpoint import verify_checkpoint

    out = {}
    for family in ROUND_TRIPS:
        src, ours, back, ours2, back2 = (os.path.join(tmp, f"rt_{family}_{n}") for n in ("src", "ours", "back", "ours2",
                                                                                          "back2"))
        make_hf_model(family, src, seed=7, dtype=torch.bfloat16)
        flags = ["--msa-block-size", "16", "--msa-topk", "3", "--msa-dense-layers", "1", "--no-progress"]
        assert main(["--from-hf", src, "--save", ours, *flags]) == 0
        manifest = verify_checkpoint(Path(ours))  # None: msa-train's checkpoint.init_from accepts it
        assert main(["--to-hf", ours, "--save", back, "--no-progress"]) == 0
        a, b = _tensors(src), _tensors(back)
        # a trained indexer's norms are not ones: give the exported index tensors other values
        # (scales in [0.6, 1.6]) so the trips below must carry them, not re-initialise them
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(13)
        for k in [k for k in b if ".index_" in k]:
            noise = torch.rand(b[k].shape, generator=gen)
            b[k] = (0.6 + noise if k.endswith("_norm.weight") else noise - 0.5).to(b[k].dtype)
        assert sorted(os.listdir(back)).count("model.safetensors") == 1
        save_file(b, os.path.join(back, "model.safetensors"), metadata={"format": "pt"})
        index = sorted(k for k in b if ".index_" in k)
        same = sorted(k for k in a if k in b and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))
        cfg_src, cfg_back = (json.load(open(os.path.join(d, "config.json"))) for d in (src, back))
        # second trip: index tensors now come from the checkpoint (no new init)
        assert main(["--from-hf", back, "--save", ours2, "--no-progress"]) == 0
        report2 = json.load(open(os.path.join(ours2, "msa_conversion_report.json")))
        assert main(["--to-hf", ours2, "--save", back2, "--no-progress"]) == 0
        c = _tensors(back2)
        # MiniMax-M3's norm convention: scales stored as w - 1, read back as w
        gemma, ours3, back3 = (os.path.join(tmp, f"rt_{family}_{n}") for n in ("gemma", "ours3", "back3"))
        assert main(["--to-hf", ours2, "--save", gemma, "--index-norm", "gemma", "--max-shard-gb", "0.00003",
                     "--no-progress"]) == 0  # ~32 KB shards: several files + model.safetensors.index.json
        g = _tensors(gemma)
        shards = [n for n in os.listdir(gemma) if n.endswith(".safetensors")]
        index_map = json.load(open(os.path.join(gemma, "model.safetensors.index.json")))["weight_map"]
        assert main(["--from-hf", gemma, "--save", ours3, "--no-progress"]) == 0
        assert main(["--to-hf", ours3, "--save", back3, "--no-progress"]) == 0
        d = _tensors(back3)
        out[family] = {
            "src": src, "back": back, "manifest": manifest,
            "src_keys": sorted(a), "same_keys": same, "extra_keys": sorted(set(b) - set(a)), "index_keys": index,
            "index_shapes": {k: list(b[k].shape) for k in index},
            "config_kept": all(cfg_back.get(k) == v for k, v in cfg_src.items() if k != "transformers_version"),
            "sparse_config": cfg_back.get("sparse_attention_config"),
            "second_trip_equal": sorted(b) == sorted(c) and all(torch.equal(b[k], c[k]) and b[k].dtype == c[k].dtype
                                                                for k in b),
            "second_trip_index_from_checkpoint": len(report2["index_from_checkpoint"]),
            "second_trip_index_initialised": len(report2["index_initialised"]),
            "second_trip_config_equal": json.load(open(os.path.join(back2, "config.json"))) == cfg_back,
            "gemma_norms": all(torch.equal(g[k], c[k] - 1) if k.endswith("_norm.weight") and ".index_" in k
                               else torch.equal(g[k], c[k]) for k in c),
            "gemma_config": json.load(open(os.path.join(gemma, "config.json")))["msa_megatron"],
            "gemma_trip_equal": sorted(d) == sorted(c) and all(torch.equal(c[k], d[k]) for k in c),
            "shards": len(shards), "index_map_complete": sorted(index_map) == sorted(g)
            and set(index_map.values()) == set(shards),
        }
    return out


def _unknown_tensor_error(tmp: str) -> str:
    """An HF tensor the map does not consume is an error naming it (not silently dropped)."""
    from hf_cases import make_hf_model
    from safetensors.torch import load_file, save_file

    from msa_megatron.hf import UnsupportedModelError, import_hf

    d = os.path.join(tmp, "llama_extra")
    make_hf_model("llama", d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    try:
        import_hf(d, os.path.join(tmp, "unused"), save=False, show_progress=False, **MSA_ARGS)
    except UnsupportedModelError as e:
        return str(e)
    return "no error"


def _single(rank: int, tmp: str):
    from hf_cases import quiet

    quiet()
    results = {f: _parity(tmp, f) for f in FAMILIES}
    results["unknown_tensor"] = _unknown_tensor_error(tmp)
    results["llama_tied"] = _parity(tmp, "llama", tie=True)
    results["round_trips"] = _round_trips(tmp)  # last: the CLI shuts the process group down
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("hf"))
    return run_distributed(_single, 1, tmp, env=ENV, timeout=600)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES + ("llama_tied",))
def test_dense_and_full_budget_msa_match_transformers(single, family):
    r = single[family]
    assert r["dense"] <= 1 and r["dense_long"] <= 1, r  # normalised error (<= 1: within ATOL + RTOL |ref|)
    assert r["msa_full_budget"] <= 1, r
    assert r["msa_sparse_maxdiff"] > 1e-3, r  # 100 tokens > 48-token budget: sparse, so not dense
    assert r["msa_layers"] == [1, 2]
    assert r["index_init"] == ["mean of the group's query projections / of all key projections", "ones"]
    if family == "llama3":  # the scaling matters at these positions: plain RoPE is far off
        assert r["plain_rope_dense_long"] > 10, r  # measured ~40 (a pass is <= 1)
        assert r["rope_extra"] == {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}, r


@pytest.mark.slow
def test_unknown_hf_tensor_is_an_error(single):
    assert "model.layers.0.self_attn.sinks" in single["unknown_tensor"], single["unknown_tensor"]
    assert "does not know" in single["unknown_tensor"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ROUND_TRIPS)
def test_round_trip_bit_equal(single, family):
    r = single["round_trips"][family]
    assert r["manifest"] is None, r["manifest"]  # the converted directory verifies (msa-train's init_from check)
    assert r["same_keys"] == r["src_keys"], set(r["src_keys"]) - set(r["same_keys"])
    assert r["extra_keys"] == r["index_keys"] and len(r["index_keys"]) == 8  # 2 MSA layers x q, k, q_norm, k_norm
    assert r["index_shapes"]["model.layers.1.self_attn.index_q_proj.weight"] == [2 * 16, 64]  # [n_kv * d_index, hidden]
    assert r["index_shapes"]["model.layers.1.self_attn.index_k_proj.weight"] == [16, 64]
    assert r["index_shapes"]["model.layers.2.self_attn.index_k_norm.weight"] == [16]
    assert r["config_kept"]  # every source config.json entry, rope_parameters included (llama3's scaling)
    assert r["sparse_config"] == {"sparse_num_index_heads": 2, "sparse_index_dim": 16, "sparse_attention_freq": [0, 1, 1],
                                  "sparse_disable_index_value": [0, 1, 1]}
    assert r["second_trip_equal"] and r["second_trip_config_equal"]
    assert r["gemma_norms"] and r["gemma_config"]["index_norm_offset"] == 1 and r["gemma_trip_equal"]
    assert r["shards"] > 1 and r["index_map_complete"]  # sharded export, read back through the index file
    assert (r["second_trip_index_from_checkpoint"], r["second_trip_index_initialised"]) == (8, 0)
    # The export loads with from_pretrained and computes the source's logits. Here, in the pytest
    # process: in the spawned job Megatron's CPU compatibility layer (it patches torch.empty & co.)
    # leaves transformers 5's non-persistent rotary buffers uninitialised in from_pretrained.
    import transformers as T
    from hf_cases import SEQ, VOCAB, hf_logits

    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(5))
    loaded = T.AutoModelForCausalLM.from_pretrained(r["back"])
    original = T.AutoModelForCausalLM.from_pretrained(r["src"])
    assert type(loaded) is type(original) and loaded.dtype == original.dtype == torch.bfloat16
    assert torch.equal(hf_logits(loaded, tokens), hf_logits(original, tokens))


# ----------------------------------------------------------------------------- other layouts
def _make_references(tmp: str) -> None:
    """Qwen2 / Qwen2-MoE HF directories and transformers' logits (in the pytest process, so
    the spawned ranks need not import transformers)."""
    from hf_cases import SEQ, VOCAB, hf_logits, make_hf_model

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9))
    for family in ("qwen2", "qwen2_moe"):
        hf = make_hf_model(family, os.path.join(tmp, f"{family}_hf"), seed=11)
        torch.save({"tokens": tokens, "logits": hf_logits(hf, tokens)}, os.path.join(tmp, f"{family}_ref.pt"))


def _layouts(rank: int, tmp: str):
    from hf_cases import ATOL, RTOL, our_logits, quiet
    from megatron.core import parallel_state

    from msa_megatron.hf.convert import build_model, training_config
    from msa_megatron.megatron.checkpoint import load_model_checkpoint
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    from msa_megatron.hf import import_hf

    quiet()
    init_distributed(ParallelLayout())
    for family in ("qwen2", "qwen2_moe"):  # both ranks: data-parallel replicas save collectively
        import_hf(os.path.join(tmp, f"{family}_hf"), os.path.join(tmp, f"{family}_ours"), show_progress=False,
                  **MSA_ARGS)
    out = {}
    for family, layout in (("qwen2", dict(tp=2)), ("qwen2_moe", dict(ep=2))):
        init_distributed(ParallelLayout(**layout))
        src = json.load(open(os.path.join(tmp, f"{family}_ours", "hf_source.json")))
        model_cfg = dict(src["model"])
        if "ep" in layout:
            model_cfg["moe_token_dispatcher_type"] = "allgather"  # gloo has no all_to_all
        cfg = training_config(model_cfg, src["msa"], 128)
        cfg.parallel.tp, cfg.parallel.ep = layout.get("tp", 1), layout.get("ep", 1)
        model = build_model(cfg, src["config"]["vocab_size"])
        load_model_checkpoint(model, os.path.join(tmp, f"{family}_ours"))
        ref = torch.load(os.path.join(tmp, f"{family}_ref.pt"))
        logits = our_logits(model, ref["tokens"], "dense")  # [b, s, vocab / tp]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, -1)
        b = ref["logits"]
        out[family] = float(((logits - b).abs() / (ATOL + RTOL * b.abs())).max())
    return out


@pytest.mark.slow
def test_checkpoint_loads_at_tp2_and_ep2(tmp_path):
    _make_references(str(tmp_path))
    results = run_distributed(_layouts, 2, str(tmp_path), env=ENV, timeout=600)
    for rank, r in enumerate(results):
        assert r["qwen2"] <= 1 and r["qwen2_moe"] <= 1, (rank, r)

"""Peak resident memory of ``msa-convert --from-hf``: a script and the test's helper.

``measure`` runs in a fresh process: it imports everything and converts a tiny model of
the same family first (so lazy imports and first-call allocations are not counted), then
resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- 5, Linux >= 4.0),
converts the target model through the CLI and reports ``VmHWM`` minus the RSS just before
(bytes), with the largest model tensor and the total model size in the checkpoint dtype.

    python tests/hf/hf_memory.py make  DIR --preset llama150m [--dtype bfloat16]
    python tests/hf/hf_memory.py measure HF_DIR [--dtype fp32]      # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

PRESETS = {
    # the test: layers dominate (16 x ~6 MB fp32), largest tensor fc1 = 2 x 1024 x 384 x 4 = 3 MB
    "test": dict(family="llama", vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=16,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
    # docs/conversion.md's earlier measurement: Qwen3, 100M parameters, the embedding dominates
    "qwen3_100m": dict(family="qwen3", vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    # a Llama-shaped 150M model whose layers dominate (Llama-2 vocabulary)
    "llama150m": dict(family="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "tiny": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}


def make(out_dir: str, preset: str, dtype: str = "float32", family: str = None) -> None:
    """A random HF model of the preset (``family`` overrides the preset's)."""
    import torch
    import transformers as T

    spec = dict(PRESETS[preset])
    family = family or spec.pop("family")
    spec.pop("family", None)
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    model = cls[1](cls[0](**spec, max_position_embeddings=4096, rope_theta=10000.0)).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + (1 << 20)


def measure(hf_dir: str, dtype: str = "fp32", family: str = "llama") -> dict:
    """In this process: warm up on a tiny model, then convert ``hf_dir``; peak RSS above
    the RSS before the conversion."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from msa_megatron.convert_cli import main
    from safetensors import safe_open

    tmp = tempfile.mkdtemp(prefix="hf_memory_")
    try:
        make(os.path.join(tmp, "tiny"), "tiny", family=family)
        flags = ["--msa-block-size", "64", "--msa-topk", "4", "--no-progress", "--dtype", dtype]
        assert main(["--from-hf", os.path.join(tmp, "tiny"), "--save", os.path.join(tmp, "tiny_out"), *flags]) == 0
        if not _reset_peak():
            return {"error": "cannot reset the peak RSS (/proc/self/clear_refs)"}
        before = _status("VmRSS")
        assert main(["--from-hf", hf_dir, "--save", os.path.join(tmp, "out"), *flags]) == 0
        peak = _status("VmHWM")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # model tensors in the checkpoint dtype; fused tensors (q/k/v, gate/up) are the largest
    import torch

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    item = 4 if dtype == "fp32" else 2
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg[
        "num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd * h
    largest = max(cfg["vocab_size"] * h, 2 * f * h, qkv) * item
    total = 0
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    total += int(torch.Size(sl.get_shape()).numel()) * item
    return {"peak_delta": peak - before, "rss_before": before, "peak": peak, "largest_tensor": largest,
            "model_bytes": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--preset", choices=sorted(PRESETS), default="test")
    m.add_argument("--dtype", default="float32")
    r = sub.add_parser("measure")
    r.add_argument("hf_dir")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    r.add_argument("--family", default="llama")
    args = p.parse_args(argv)
    if args.cmd == "make":
        make(args.dir, args.preset, args.dtype)
    else:
        print("HF_MEMORY " + json.dumps(measure(args.hf_dir, args.dtype, args.family)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

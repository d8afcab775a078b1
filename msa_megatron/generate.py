"""msa-generate: text generation from an msa-train checkpoint, in MSA or dense mode.

The model is the trainer's own (same config, same builder); weights come from the
checkpoint through ``dist_checkpointing`` (any TP/PP it was saved at). Generation runs
through Megatron-Core's inference path: a ``StaticInferenceContext`` holds the per-layer
K/V caches and, for MSA layers in mode ``msa``, the index-key caches
(:mod:`msa_megatron.megatron.attention`); the prompt is one prefill forward, then one
forward per new token. ``use_cache=False`` recomputes the whole sequence every step
(the consistency baseline of tests/decode).

Tokens: models trained on the embedded corpus (or any byte-tokenized data) read and write
UTF-8 bytes (ids 0-255, EOD 256); other tokenizers take ``--prompt-ids`` and print ids.

Megatron-LM checkpoints (``scripts/pretrain_gpt_msa.py --save DIR``: torch_dist with the
run's args in the common state) load too: the model is rebuilt from those args with
Megatron-LM's own builder (:func:`load_megatron_lm_model`); token ids in and out.

    msa-generate runs/tiny-msa --prompt "def main(" --max-new-tokens 64
    msa-generate runs/tiny-msa/checkpoints/step_00000100 --mode dense --temperature 0.8 --top-p 0.9
    msa-generate $CKPT --prompt-ids 1,2,3 --json          # a Megatron-LM --save directory
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

log = logging.getLogger("msa_megatron.generate")

MODES = ("msa", "dense", "msa_warmup", "checkpoint")
PRECISIONS = ("fp32", "bf16", "fp16")
BYTE_EOD = 256


# --------------------------------------------------------------------------- sampling
def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token per row from logits [b, V]: greedy (argmax, lowest id on ties) at
    temperature 0, else softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} / top_p={top_p} are invalid: allowed temperature >= 0, "
                         "top_p in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- generation
@dataclass
class Generation:
    tokens: Tensor  # [b, prompt + new]
    prompt_len: int
    #: logits [b, V] that chose each new token (return_logits=True)
    step_logits: List[Tensor] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def new_tokens(self) -> Tensor:
        return self.tokens[:, self.prompt_len:]


def _positions(start: int, stop: int, b: int, device) -> Tensor:
    return torch.arange(start, stop, device=device).unsqueeze(0).expand(b, -1)


@torch.no_grad()
def full_logits(model, tokens: Tensor) -> Tensor:
    """Logits [b, s, V] of a no-cache forward over the whole sequence."""
    b, s = tokens.shape
    return model(tokens, _positions(0, s, b, tokens.device), None).float()


def _cached_forward(model, tokens: Tensor, start: int, context) -> Tensor:
    """Last-position logits [b, V] of a KV-cache forward over ``tokens`` at positions start..
    Megatron's InferenceMode is on, as in its own engine: the static context then has the
    model compute logits for the last position only (a long prompt never materialises
    [prompt, vocab] logits)."""
    from megatron.core.inference.utils import InferenceMode

    b, s = tokens.shape
    with InferenceMode.active():
        out = model(tokens, _positions(start, start + s, b, tokens.device), None, inference_context=context,
                    runtime_gather_output=True)
    return out[:, -1].float()


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True, stop_id: Optional[int] = None,
             return_logits: bool = False) -> Generation:
    """Generate ``max_new_tokens`` after ``prompt`` [b, p] (int64). With the cache: a
    prefill forward over the prompt, then one forward per token with a
    StaticInferenceContext; without: a full forward per token. ``stop_id``: stop once every
    row has produced it (rows that stopped keep producing tokens; callers cut at stop_id)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids; got shape {tuple(prompt.shape)}")
    b, p = prompt.shape
    tokens = prompt
    out = Generation(tokens=prompt, prompt_len=p)
    context = StaticInferenceContext(b, p + max_new_tokens) if use_cache else None
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        if not use_cache:
            logits = full_logits(model, tokens)[:, -1]
        elif step == 0:
            logits = _cached_forward(model, tokens, 0, context)
            context.sequence_len_offset += p
            context.enable_decode_mode()
        else:
            logits = _cached_forward(model, tokens[:, -1:], tokens.shape[1] - 1, context)
            context.sequence_len_offset += 1
        if step == 0:
            out.prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        nxt = sample_next(logits, temperature, top_p, generator)
        if return_logits:
            out.step_logits.append(logits)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                break
    out.decode_s = time.perf_counter() - t0
    out.tokens = tokens
    return out


# --------------------------------------------------------------------------- loading
def find_run(path: str) -> Tuple[Path, Path]:
    """(run dir holding config.yaml, checkpoint step dir) from a run dir, a checkpoints
    dir or a step dir."""
    from .training.checkpoint import resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist: pass an msa-train run dir, its checkpoints/ dir or a step dir")
    step = resolve_checkpoint(str(p))
    for candidate in (p, step.parent.parent, step.parent):
        if (candidate / "config.yaml").is_file():
            return candidate, step
    raise FileNotFoundError(f"no config.yaml next to {step} (looked in {p} and {step.parent.parent}): msa-generate "
                            "needs the msa-train run directory's config.yaml")


def single_process_port() -> None:
    """A free MASTER_PORT for a one-process group (unless a launcher set one): several
    msa-generate processes on one host must not collide on the default port."""
    import os
    import socket

    if "MASTER_PORT" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _padded_vocab(step: Path) -> int:
    from megatron.core.dist_checkpointing import load_tensors_metadata

    meta = load_tensors_metadata(str(step))
    for key, t in meta.items():
        if key.endswith("embedding.word_embeddings.weight"):
            return int(t.global_shape[0])
    for key, t in meta.items():
        if key.endswith("output_layer.weight"):
            return int(t.global_shape[0])
    raise RuntimeError(f"{step}: no embedding.word_embeddings.weight / output_layer.weight in the checkpoint")


def load_model(path: str, mode: str = "checkpoint", precision: Optional[str] = None, backend: Optional[str] = None):
    """(model, cfg, info) for generation on one process: the run's model with the
    checkpoint's weights, eval mode, on CUDA when present. ``path``: an msa-train run (its
    config.yaml rebuilds the model) or a Megatron-LM checkpoint (:func:`load_megatron_lm_model`;
    cfg is then its args Namespace). ``mode``: msa | dense |
    msa_warmup for every MSA layer, or ``checkpoint`` (the run's final mode: msa.mode for
    MSA runs). ``precision`` None: the run's (fp32 on CPU). ``backend``: msa.backend."""
    import yaml
    from megatron.core import dist_checkpointing

    from .megatron import build_gpt_model, set_attention_mode
    from .megatron.parallel import ParallelLayout, init_distributed
    from .training.config import load_config
    from .training.model import make_transformer_config

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: allowed values are {', '.join(MODES)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: allowed values are {', '.join(PRECISIONS)}")
    if megatron_lm_checkpoint(path) is not None:
        return load_megatron_lm_model(path, mode, precision, backend)
    run_dir, step = find_run(path)
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    values["parallel"] = {}  # one process; dist_checkpointing reshards whatever the run used
    cuda = torch.cuda.is_available()
    values.setdefault("train", {})["precision"] = precision or (values.get("train", {}).get("precision", "fp32")
                                                                if cuda else "fp32")
    if backend is not None:
        values.setdefault("attention", {}).setdefault("msa", {})["backend"] = backend
    cfg = load_config(values)
    if cfg.attention.type not in ("msa", "dense"):
        raise ValueError(f"attention.type={cfg.attention.type!r} of {run_dir} is not supported by msa-generate: "
                         "allowed values are msa, dense")
    single_process_port()
    init_distributed(ParallelLayout(), seed=cfg.train.seed)
    tf_config = make_transformer_config(cfg)
    m = cfg.model
    model = build_gpt_model(
        tf_config, vocab_size=_padded_vocab(step), max_sequence_length=cfg.train.seq_length, use_te=m.use_te,
        position_embedding_type="rope", rotary_percent=m.rotary_percent, rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights)
    if cuda:
        model.cuda(torch.cuda.current_device())
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step))
    model.load_state_dict(state["model"], strict=True)
    if tf_config.fp16 or tf_config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tf_config, model)
    model.eval()
    final_mode = cfg.msa.mode if cfg.msa is not None else "dense"
    chosen = final_mode if mode == "checkpoint" else mode
    if cfg.msa is None and chosen != "dense":
        raise ValueError(f"mode={mode!r} needs MSA layers; {run_dir} trained dense attention (allowed: dense, checkpoint)")
    if cfg.msa is not None:
        set_attention_mode([model], chosen)
    info = {"run_dir": str(run_dir), "checkpoint": str(step), "mode": chosen, "precision": cfg.train.precision,
            "device": "cuda" if cuda else "cpu", "byte_tokens": _byte_tokens(cfg),
            "eod_id": BYTE_EOD if _byte_tokens(cfg) else cfg.data.eod_id}
    return model, cfg, info


# --------------------------------------------------------------------------- Megatron-LM checkpoints
def megatron_lm_checkpoint(path: str) -> Optional[Path]:
    """The iteration directory of a Megatron-LM checkpoint (``--save`` dir with
    latest_checkpointed_iteration.txt, or an ``iter_N`` / ``release`` dir of torch_dist
    files), else None (not one: an msa-train run, or nothing)."""
    p = Path(path)
    tracker = p / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return p / "release"
        if not text.isdigit():
            raise ValueError(f"{tracker} holds {text!r}: allowed values are an iteration number or 'release'")
        step = p / f"iter_{int(text):07d}"
        if not step.is_dir():
            raise FileNotFoundError(f"{tracker} names iteration {int(text)} but {step} does not exist")
        return step
    if (p.name.startswith("iter_") or p.name == "release") and (p / "metadata.json").is_file():
        return p
    return None


def _single_process_args(args, precision: str, cuda: bool, backend: Optional[str]):
    """A copy of a Megatron-LM run's saved args for one process: every parallel size 1 (the
    torch_dist checkpoint is resharded on load), no sequence parallelism, the chosen dtype,
    no Apex/TE-only fusions."""
    import copy

    a = copy.copy(args)
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size", "world_size", "data_parallel_size"):
        if hasattr(a, name):
            setattr(a, name, 1)
    a.virtual_pipeline_model_parallel_size = None
    a.num_layers_per_virtual_pipeline_stage = None
    a.sequence_parallel = False
    a.gradient_accumulation_fusion = False
    a.use_cpu_initialization = not cuda
    a.perform_initialization = False  # the checkpoint overwrites every weight
    a.fp16, a.bf16 = precision == "fp16", precision == "bf16"
    a.params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if backend is not None and getattr(a, "msa", None):
        a.msa = dict(a.msa, backend=backend)
    return a


def load_megatron_lm_model(path: str, mode: str = "checkpoint", precision: Optional[str] = None,
                           backend: Optional[str] = None):
    """(model, args, info) from a checkpoint saved by Megatron-LM's loop
    (``scripts/pretrain_gpt_msa.py``, torch_dist format): the run's args come from the
    checkpoint's common state, and the model is built from them the way ``pretrain`` built
    it (``gpt_model_config_from_args`` + Megatron-LM's ``GPTModelBuilder``), on one process.
    Token ids only: Megatron-LM runs name their tokenizer in args, which is not loaded here."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    from . import megatron_lm
    from .megatron import set_attention_mode
    from .megatron.parallel import ParallelLayout, init_distributed

    step = megatron_lm_checkpoint(path)
    common = dist_checkpointing.load_common_state_dict(str(step))
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise ValueError(f"{step} has no 'args' in its common state: not a checkpoint of Megatron-LM's loop")
    variant = getattr(args, "experimental_attention_variant", None)
    if variant not in (None, "msa"):
        raise ValueError(f"experimental_attention_variant={variant!r} of {step} is not supported by msa-generate: "
                         "allowed values are msa, or none (dense)")
    if getattr(args, "mtp_num_layers", None):
        raise ValueError(f"mtp_num_layers={args.mtp_num_layers} of {step}: multi-token prediction layers are not "
                         "supported by msa-generate (allowed: none)")
    cuda = torch.cuda.is_available()
    saved = "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")
    chosen_precision = precision or (saved if cuda else "fp32")
    a = _single_process_args(args, chosen_precision, cuda, backend)
    megatron_lm.install()  # registers MSA with Megatron-Core (the variant's layer specs)
    single_process_port()
    init_distributed(ParallelLayout(), seed=getattr(args, "seed", 1234))
    model_cfg = megatron_lm.gpt_model_config_from_args(a)
    from megatron.training.models.gpt import GPTModelBuilder

    model = GPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                                   pre_process=True, post_process=True)
    if cuda:
        model.cuda(torch.cuda.current_device())
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
    state = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=metadata)}, str(step))
    model.load_state_dict(state["model"], strict=True)
    tf_config = model_cfg.transformer
    if tf_config.fp16 or tf_config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tf_config, model)
    model.eval()
    msa = getattr(a, "msa", None) if variant == "msa" else None
    final_mode = msa.get("mode", "msa") if msa else "dense"
    chosen = final_mode if mode == "checkpoint" else mode
    if msa is None and chosen != "dense":
        raise ValueError(f"mode={mode!r} needs MSA layers; {step} trained dense attention (allowed: dense, checkpoint)")
    if msa is not None:
        set_attention_mode([model], chosen)
    info = {"run_dir": str(step.parent), "checkpoint": str(step), "mode": chosen, "precision": chosen_precision,
            "device": "cuda" if cuda else "cpu", "byte_tokens": False, "eod_id": None, "format": "megatron-lm",
            "iteration": common.get("iteration"), "tokenizer": getattr(args, "tokenizer_type", None)}
    return model, a, info


def _byte_tokens(cfg) -> bool:
    """Whether the run's token ids are UTF-8 bytes (the embedded corpus, or byte datasets)."""
    if cfg.data.source == "corpus":
        return True
    for entry in cfg.data.blend:
        meta = Path(entry.path + ".meta.json")
        if not meta.is_file() or json.loads(meta.read_text()).get("tokenizer") != "byte":
            return False
    return bool(cfg.data.blend)


def encode_bytes(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def decode_bytes(ids: List[int]) -> str:
    """Bytes 0-255 as UTF-8; generation stops at EOD (256); other ids are dropped."""
    out = []
    for t in ids:
        if t == BYTE_EOD:
            break
        if 0 <= t < 256:
            out.append(t)
    return bytes(out).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="msa-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="msa-train run dir, its checkpoints/ dir, or a step_N dir; or a Megatron-LM "
                    "checkpoint (--save dir or its iter_N dir)")
    ap.add_argument("--prompt", default=None, help="prompt text (byte-tokenized models)")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mode", default="checkpoint", choices=MODES,
                    help="attention of the MSA layers (checkpoint: the run's msa.mode)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1, help="sequences generated from the prompt (batch)")
    ap.add_argument("--precision", default=None, choices=PRECISIONS, help="default: the run's on CUDA, fp32 on CPU")
    ap.add_argument("--backend", default=None, choices=("auto", "reference", "triton"), help="msa.backend")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token (slow; checks)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.prompt_ids is None):
        ap.error("give exactly one of --prompt and --prompt-ids")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        ap.error("--max-new-tokens and --num-samples must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .megatron.parallel import shutdown_distributed

    try:
        model, cfg, info = load_model(args.checkpoint, args.mode, args.precision, args.backend)
        if args.prompt_ids is not None:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        elif info["byte_tokens"]:
            ids = encode_bytes(args.prompt)
        elif info.get("format") == "megatron-lm":
            raise ValueError(f"--prompt needs a tokenizer; this Megatron-LM checkpoint's ({info['tokenizer']}) is not "
                             "loaded by msa-generate: pass --prompt-ids")
        else:
            raise ValueError("--prompt needs a byte-tokenized model; this run's data uses another tokenizer: "
                             "pass --prompt-ids")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        device = next(model.parameters()).device
        prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
        gen_rng = torch.Generator(device=device).manual_seed(args.seed)
        res = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, gen_rng,
                       use_cache=not args.no_cache, stop_id=info["eod_id"])
        new = res.new_tokens.tolist()
        n_new = res.new_tokens.shape[1]
        tok_s = (n_new - 1) * len(new) / res.decode_s if n_new > 1 and res.decode_s > 0 else float("nan")
        result = dict(info, prompt_tokens=len(ids), new_tokens=n_new, prefill_s=round(res.prefill_s, 4),
                      decode_tokens_per_s=round(tok_s, 2), ids=new,
                      text=[decode_bytes(row) for row in new] if info["byte_tokens"] else None)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"# {info['checkpoint']} | mode {info['mode']} | {info['precision']} on {info['device']} | "
                  f"prefill {res.prefill_s:.3f}s, decode {tok_s:.1f} tok/s", file=sys.stderr)
            for row in new:
                print(args.prompt + decode_bytes(row) if info["byte_tokens"] and args.prompt is not None
                      else ",".join(map(str, row)))
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"msa-generate: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())

"""What a Hugging Face ``config.json`` describes, in our terms, and the tensor-name maps.

Supported families (the Llama/Qwen GQA decoder: RMSNorm, SwiGLU, RoPE in HF's
``rotate_half`` layout, which is Megatron's non-interleaved layout, so q/k need no
permutation): ``llama``, ``mistral``, ``qwen2`` (q/k/v bias), ``qwen3`` (per-head q/k
RMSNorm), and the MoE families ``mixtral``, ``qwen2_moe`` (+ a sigmoid-gated shared expert:
Megatron's ``moe_shared_expert_gate``) and ``qwen3_moe``. Softmax routers: top-k weights
renormalised (``norm_topk_prob``, Mixtral always) = Megatron's default top-k-then-softmax;
not renormalised = ``moe_router_pre_softmax`` (softmax, then top-k).
``glm`` (GLM-4) has partial RoPE (``partial_rotary_factor``, 0.5 in GLM-4) on interleaved
pairs (Megatron's ``rotary_percent`` + ``rotary_interleaved``), q/k/v biases and a fused
``gate_up_proj`` (already ``[gate; up]``). The other families apply RoPE to the whole head
in ``transformers``; a config of theirs with ``partial_rotary_factor`` != 1 is refused
rather than converted into another model.
RoPE: default, or Llama 3.x's frequency scaling (``rope_type: llama3``, any family: it only
changes the inverse frequencies), carried as ``model.extra.rope_llama3_scaling`` and applied
by ``build_gpt_model``; other ``rope_type`` values are refused.

Megatron's fused tensors: ``linear_qkv`` rows are grouped per KV head
``[q heads of the group, k, v]`` (TP shards are whole groups); ``linear_fc1`` is
``[gate; up]`` (SwiGLU). MSA index tensors are exported under MiniMax-M3's names
(``self_attn.index_{q,k}_proj``, ``self_attn.index_{q,k}_norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "glm", "mixtral", "qwen2_moe", "qwen3_moe")
#: Families whose transformers code applies partial RoPE (``partial_rotary_factor``).
PARTIAL_ROPE_FAMILIES = ("glm",)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
#: HF tensors that carry no weights of the model (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: MiniMax-M3 names of the MSA index tensors (vLLM's MiniMaxM3SparseAttention, see docs/conversion.md).
HF_INDEX = {"index_q": "index_q_proj.weight", "index_k": "index_k_proj.weight",
            "index_q_norm": "index_q_norm.weight", "index_k_norm": "index_k_norm.weight"}
#: rope_type 'llama3' parameters (transformers' _compute_llama3_parameters); = our rope_llama3_scaling keys.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The HF model uses something the conversion (or our model) does not support."""


@dataclass
class HFArch:
    """The architecture fields the conversion needs, read from config.json."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    initializer_range: float
    max_position_embeddings: int
    dtype: torch.dtype
    rotary_percent: float = 1.0
    #: Llama 3.x RoPE scaling (rope_type 'llama3'): factor, low/high_freq_factor, original_max_position_embeddings.
    rope_llama3: Optional[Dict[str, float]] = None
    #: RoPE on interleaved pairs (GLM) instead of rotate_half's halves.
    rotary_interleaved: bool = False
    num_experts: Optional[int] = None
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_first_dense_layers: int = 0
    #: Softmax over all experts before top-k, no renormalisation (norm_topk_prob=false).
    moe_pre_softmax: bool = False
    #: Qwen2-MoE's shared expert (width; always sigmoid-gated there).
    shared_expert_ffn: Optional[int] = None
    #: MSA layers / index dim recorded in the config (a checkpoint we exported), else None.
    index_layers: Optional[List[int]] = None
    index_dim: Optional[int] = None
    msa_extra: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.moe_first_dense_layers

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "HFArch":
        family = cfg.get("model_type")
        missing: List[str] = []
        if family not in FAMILIES:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"config.json model_type={family!r} (architectures {archs}) is not supported: allowed model_type values "
                f"are {', '.join(FAMILIES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            missing.append(f"hidden_act={cfg['hidden_act']!r} (only silu / SwiGLU)")
        rope = dict(cfg.get("rope_parameters") or {})
        legacy_scaling = cfg.get("rope_scaling")
        if legacy_scaling:  # transformers 4.x: rope_scaling ({"type" | "rope_type": ..., ...}) + rope_theta
            legacy_scaling = dict(legacy_scaling)
            legacy_scaling.setdefault("rope_type", legacy_scaling.pop("type", "default"))
            rope.update(legacy_scaling)
        rope_type = rope.get("rope_type", "default")
        llama3 = None
        if rope_type == "llama3":
            absent = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
            if absent:
                missing.append(f"rope_type='llama3' without {', '.join(absent)}")
            else:
                llama3 = {k: float(rope[k]) for k in LLAMA3_ROPE_KEYS}
        elif rope_type != "default":
            missing.append(f"rope_type={rope_type!r} (RoPE scaling: allowed rope_type values are default, llama3)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if float(theta) != int(theta):
            missing.append(f"rope_theta={theta} (model.rotary_base is an integer)")
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial != 1.0 and family not in PARTIAL_ROPE_FAMILIES:
            missing.append(f"partial_rotary_factor={partial} (the {family} family applies RoPE to the whole head in "
                           "transformers; a partial factor would describe another model)")
        if cfg.get("mlp_bias"):
            missing.append("mlp_bias=true (MLP biases)")
        attention_bias = bool(cfg.get("attention_bias", False))
        if family in ("qwen2", "qwen2_moe"):
            attention_bias = bool(cfg.get("qkv_bias", True))  # q/k/v biases (never on o_proj)
        elif family == "glm":
            attention_bias = bool(cfg.get("attention_bias", True))  # q/k/v only (o_proj has none)
        if attention_bias and family not in ("qwen2", "qwen2_moe", "glm"):
            missing.append(f"attention_bias=true for {family} (biases on o_proj too; Megatron has add_qkv_bias only)")
        window = cfg.get("sliding_window")
        if window is not None and cfg.get("use_sliding_window", family in ("mistral", "mixtral")):
            missing.append(f"sliding_window={window} (sliding-window attention; our dense layers attend to the whole "
                           "context)")
        if cfg.get("router_jitter_noise"):
            missing.append(f"router_jitter_noise={cfg['router_jitter_noise']} (router noise)")
        num_heads = cfg["num_attention_heads"]
        num_kv = cfg.get("num_key_value_heads") or num_heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        if num_heads % num_kv:
            missing.append(f"num_key_value_heads={num_kv} not dividing num_attention_heads={num_heads}")
        kw: Dict[str, Any] = {}
        if family == "mixtral":
            kw = dict(num_experts=cfg["num_local_experts"], moe_topk=cfg.get("num_experts_per_tok", 2),
                      moe_ffn_hidden_size=cfg["intermediate_size"])
        elif family in ("qwen2_moe", "qwen3_moe"):
            step = cfg.get("decoder_sparse_step", 1)
            only = sorted(cfg.get("mlp_only_layers") or [])
            n = cfg["num_hidden_layers"]
            moe_layers = [i for i in range(n) if i not in only and (i + 1) % step == 0] if step > 0 else []
            first = n - len(moe_layers)
            if moe_layers != list(range(first, n)):
                missing.append(f"MoE layers {moe_layers} (decoder_sparse_step={step}, mlp_only_layers={only}): only "
                               "leading dense layers then MoE (model.moe_first_dense_layers)")
            kw = dict(num_experts=cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"],
                      moe_topk=cfg.get("num_experts_per_tok", 2), moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                      moe_first_dense_layers=first, moe_pre_softmax=not cfg.get("norm_topk_prob", False))
            if family == "qwen2_moe":
                kw["shared_expert_ffn"] = cfg.get("shared_expert_intermediate_size") or None
            if kw["moe_topk"] == 1 and not kw["moe_pre_softmax"]:
                missing.append("num_experts_per_tok=1 with norm_topk_prob=true (a weight of 1; Megatron needs "
                               "moe_router_pre_softmax for top-1)")
        sparse = cfg.get("sparse_attention_config") or None
        if sparse:
            freq = list(sparse.get("sparse_attention_freq") or [])
            kw["index_layers"] = [i for i, f in enumerate(freq) if f]
            kw["index_dim"] = sparse.get("sparse_index_dim")
            if sparse.get("sparse_num_index_heads", num_kv) != num_kv:
                missing.append(f"sparse_num_index_heads={sparse['sparse_num_index_heads']} (one index head per KV "
                               f"head: {num_kv})")
            kw["msa_extra"] = dict(cfg.get("msa_megatron") or {})
        if missing:
            raise UnsupportedModelError(f"{family} config not supported, missing support for: " + "; ".join(missing))
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return cls(
            family=family, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"], num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
            vocab_size=cfg["vocab_size"], rope_theta=float(theta), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=attention_bias,
            qk_norm=family in ("qwen3", "qwen3_moe"), initializer_range=float(cfg.get("initializer_range", 0.02)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rotary_percent=float(partial), rotary_interleaved=family == "glm", rope_llama3=llama3,
            dtype=DTYPES.get(str(dtype_name).replace("torch.", ""), torch.float32), raw=dict(cfg), **kw)

    # ------------------------------------------------------------------ our config
    def vocab_divisor(self) -> int:
        """make_vocab_size_divisible_by: the largest power of two <= 128 dividing the
        vocabulary, so the padded vocabulary is the HF one (no extra softmax rows)."""
        return math.gcd(self.vocab_size, 128)

    def model_config(self, name: str, msa: Dict[str, int]) -> Dict[str, Any]:
        """The ``model:`` group (training/config.py ModelConfig) for this architecture."""
        extra: Dict[str, Any] = {"layernorm_epsilon": self.rms_norm_eps}
        if self.qkv_bias:
            extra["add_qkv_bias"] = True
        if self.rotary_interleaved:
            extra["rotary_interleaved"] = True
        if self.rope_llama3:
            extra["rope_llama3_scaling"] = dict(self.rope_llama3)
        if self.moe_pre_softmax:
            extra["moe_router_pre_softmax"] = True
        if self.shared_expert_ffn:
            extra["moe_shared_expert_gate"] = True
        out: Dict[str, Any] = dict(
            name=name, num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_heads, num_query_groups=self.num_kv_heads, kv_channels=self.head_dim,
            rotary_percent=self.rotary_percent, rotary_base=int(self.rope_theta), normalization="RMSNorm", swiglu=True,
            qk_layernorm=self.qk_norm, untie_embeddings_and_output_weights=not self.tie_embeddings,
            init_method_std=self.initializer_range, hidden_dropout=0.0, attention_dropout=0.0,
            make_vocab_size_divisible_by=self.vocab_divisor(),
            msa_block_size=msa["block_size"], msa_topk=msa["topk"], msa_index_dim=msa["index_dim"],
            msa_dense_layers=msa["first_dense_layers"], num_moe_experts=self.num_experts, use_te=False, extra=extra)
        if self.num_experts is not None:
            out.update(moe_router_topk=self.moe_topk, moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                       moe_shared_expert_intermediate_size=self.shared_expert_ffn, moe_first_dense_layers=self.moe_first_dense_layers,
                       moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
                       moe_aux_loss_coeff=float(self.raw.get("router_aux_loss_coef", 1e-2)),
                       moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False)
        return out


# ---------------------------------------------------------------------------- name maps
def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def _mlp_names(arch: HFArch) -> Tuple[str, str, str]:
    return ("gate_proj", "up_proj", "down_proj")


def _expert_prefix(arch: HFArch, i: int, j: int) -> Tuple[str, Tuple[str, str, str]]:
    if arch.family == "mixtral":
        return f"{_hf_layer(i)}block_sparse_moe.experts.{j}.", ("w1", "w3", "w2")
    return f"{_hf_layer(i)}mlp.experts.{j}.", ("gate_proj", "up_proj", "down_proj")


def _router_name(arch: HFArch, i: int) -> str:
    return f"{_hf_layer(i)}block_sparse_moe.gate.weight" if arch.family == "mixtral" else f"{_hf_layer(i)}mlp.gate.weight"


def fuse_qkv(arch: HFArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights [out, hidden] or biases [out]) -> Megatron's grouped linear_qkv."""
    g, d, G = arch.num_kv_heads, arch.head_dim, arch.group_size
    tail = q.shape[1:]
    return torch.cat([q.reshape(g, G * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], 1).reshape(-1, *tail)


def split_qkv(arch: HFArch, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, G = arch.num_kv_heads, arch.head_dim, arch.group_size
    tail = qkv.shape[1:]
    w = qkv.reshape(g, (G + 2) * d, *tail)
    q, k, v = w.split([G * d, d, d], 1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


Get = Callable[[str], torch.Tensor]


#: A model tensor as a function of the HF tensors (``get``): evaluated with meta tensors to
#: check shapes and which HF tensors are used, then with real ones when the tensor is written.
Source = Callable[[Get], torch.Tensor]


def _one(name: str) -> Source:
    return lambda get: get(name)


def _cat(*names: str) -> Source:
    return lambda get: torch.cat([get(n) for n in names], 0)


def _qkv(arch: HFArch, a: str, what: str) -> Source:
    return lambda get: fuse_qkv(arch, get(f"{a}q_proj.{what}"), get(f"{a}k_proj.{what}"), get(f"{a}v_proj.{what}"))


def hf_global_sources(arch: HFArch) -> Dict[str, Source]:
    """Embedding, final norm and output layer; keys of our GPTModel's state_dict."""
    out = {"embedding.word_embeddings.weight": _one("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": _one("model.norm.weight")}
    if not arch.tie_embeddings:
        out["output_layer.weight"] = _one("lm_head.weight")
    return out


def hf_layer_sources(arch: HFArch, i: int, has: Callable[[str], bool]) -> Dict[str, Source]:
    """Layer ``i``: our model's state_dict keys (local spec) -> how to make them from HF
    tensors. Index tensors come only if the HF checkpoint has them (``has``)."""
    h, m = _hf_layer(i), f"decoder.layers.{i}."
    a = f"{h}self_attn."
    out: Dict[str, Source] = {m + "input_layernorm.weight": _one(h + "input_layernorm.weight"),
                              m + "self_attention.linear_qkv.weight": _qkv(arch, a, "weight")}
    if arch.qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = _qkv(arch, a, "bias")
    out[m + "self_attention.linear_proj.weight"] = _one(a + "o_proj.weight")
    if arch.qk_norm:
        out[m + "self_attention.q_layernorm.weight"] = _one(a + "q_norm.weight")
        out[m + "self_attention.k_layernorm.weight"] = _one(a + "k_norm.weight")
    for ours, theirs in HF_INDEX.items():
        if has(a + theirs):
            out[f"{m}self_attention.indexer.{ours}.weight"] = _one(a + theirs)
    out[m + "pre_mlp_layernorm.weight"] = _one(h + "post_attention_layernorm.weight")
    if arch.is_moe_layer(i):
        out[m + "mlp.router.weight"] = _one(_router_name(arch, i))
        for j in range(arch.num_experts):
            p, (gate, up, down) = _expert_prefix(arch, i, j)
            e = f"{m}mlp.experts.local_experts.{j}."
            out[e + "linear_fc1.weight"] = _cat(f"{p}{gate}.weight", f"{p}{up}.weight")
            out[e + "linear_fc2.weight"] = _one(f"{p}{down}.weight")
        if arch.shared_expert_ffn:
            p = f"{h}mlp.shared_expert."
            out[m + "mlp.shared_experts.linear_fc1.weight"] = _cat(p + "gate_proj.weight", p + "up_proj.weight")
            out[m + "mlp.shared_experts.linear_fc2.weight"] = _one(p + "down_proj.weight")
            out[m + "mlp.shared_experts.gate_weight"] = _one(f"{h}mlp.shared_expert_gate.weight")
    elif arch.family == "glm":  # fused gate_up_proj, already [gate; up]
        out[m + "mlp.linear_fc1.weight"] = _one(f"{h}mlp.gate_up_proj.weight")
        out[m + "mlp.linear_fc2.weight"] = _one(f"{h}mlp.down_proj.weight")
    else:
        gate, up, down = _mlp_names(arch)
        out[m + "mlp.linear_fc1.weight"] = _cat(f"{h}mlp.{gate}.weight", f"{h}mlp.{up}.weight")
        out[m + "mlp.linear_fc2.weight"] = _one(f"{h}mlp.{down}.weight")
    return out


# Export reads the distributed checkpoint directly: its keys name layer norms the way TE
# does (fused into the next linear) and stack the experts of a layer.
def ckpt_globals_to_hf(arch: HFArch, get: Get) -> Iterator[Tuple[str, torch.Tensor]]:
    emb = get("embedding.word_embeddings.weight")
    yield "model.embed_tokens.weight", emb[: arch.vocab_size]
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not arch.tie_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[: arch.vocab_size]


def ckpt_layer_to_hf(arch: HFArch, i: int, get: Get, has: Callable[[str], bool]) -> Iterator[Tuple[str, torch.Tensor]]:
    h, m = _hf_layer(i), f"decoder.layers.{i}."
    a = f"{h}self_attn."
    yield h + "input_layernorm.weight", get(m + "self_attention.linear_qkv.layer_norm_weight")
    q, k, v = split_qkv(arch, get(m + "self_attention.linear_qkv.weight"))
    yield a + "q_proj.weight", q
    yield a + "k_proj.weight", k
    yield a + "v_proj.weight", v
    if arch.qkv_bias:
        q, k, v = split_qkv(arch, get(m + "self_attention.linear_qkv.bias"))
        yield a + "q_proj.bias", q
        yield a + "k_proj.bias", k
        yield a + "v_proj.bias", v
    yield a + "o_proj.weight", get(m + "self_attention.linear_proj.weight")
    if arch.qk_norm:
        yield a + "q_norm.weight", get(m + "self_attention.q_layernorm.weight")
        yield a + "k_norm.weight", get(m + "self_attention.k_layernorm.weight")
    for ours, theirs in HF_INDEX.items():
        key = f"{m}self_attention.indexer.{ours}.weight"
        if has(key):
            yield a + theirs, get(key)
    yield h + "post_attention_layernorm.weight", get(m + "mlp.linear_fc1.layer_norm_weight")
    if arch.is_moe_layer(i):
        yield _router_name(arch, i), get(m + "mlp.router.weight")
        fc1, fc2 = get(m + "mlp.experts.experts.linear_fc1.weight"), get(m + "mlp.experts.experts.linear_fc2.weight")
        for j in range(arch.num_experts):
            p, (gate, up, down) = _expert_prefix(arch, i, j)
            g_w, u_w = fc1[j].chunk(2, 0)
            yield f"{p}{gate}.weight", g_w
            yield f"{p}{up}.weight", u_w
            yield f"{p}{down}.weight", fc2[j]
        if arch.shared_expert_ffn:
            p = f"{h}mlp.shared_expert."
            g_w, u_w = get(m + "mlp.shared_experts.linear_fc1.weight").chunk(2, 0)
            yield p + "gate_proj.weight", g_w
            yield p + "up_proj.weight", u_w
            yield p + "down_proj.weight", get(m + "mlp.shared_experts.linear_fc2.weight")
            yield f"{h}mlp.shared_expert_gate.weight", get(m + "mlp.shared_experts.gate_weight")
    elif arch.family == "glm":
        yield f"{h}mlp.gate_up_proj.weight", get(m + "mlp.linear_fc1.weight")
        yield f"{h}mlp.down_proj.weight", get(m + "mlp.linear_fc2.weight")
    else:
        gate, up, down = _mlp_names(arch)
        g_w, u_w = get(m + "mlp.linear_fc1.weight").chunk(2, 0)
        yield f"{h}mlp.{gate}.weight", g_w
        yield f"{h}mlp.{up}.weight", u_w
        yield f"{h}mlp.{down}.weight", get(m + "mlp.linear_fc2.weight")


__all__ = ["DTYPES", "FAMILIES", "MOE_FAMILIES", "HFArch", "HF_INDEX", "UnsupportedModelError", "ckpt_globals_to_hf",
           "ckpt_layer_to_hf", "fuse_qkv", "hf_global_sources", "hf_layer_sources", "split_qkv", "Source"]

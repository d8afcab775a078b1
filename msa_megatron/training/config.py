"""Typed schema of the trainer's configuration, and its validation.

Hydra composes YAML groups into one mapping; :func:`load_config` turns it into these
dataclasses. Every problem is one :class:`ConfigError` whose message names the full
field path and the values it accepts, raised before any process group or model exists,
so a bad CLI override costs a second, not a start-up. Cross-field and layout checks live
in :func:`validate` (they need the number of processes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import ATTENTION_MODES, ConfigError, MSAConfig, MSAConfigError
from .corpus import ORDERS as CORPUS_ORDERS


class UsageError(ConfigError):
    """A setting that names something unusable (a run directory in use, a damaged
    checkpoint): ``<field>=<value>: <what is wrong>``; exit code 2 like a ConfigError."""

    def __init__(self, path: str, value: Any, problem: str):
        self.path, self.value, self.allowed = path, value, problem
        ValueError.__init__(self, f"{path}={value}: {problem}")


def _check(check, allowed: str) -> Dict[str, Any]:
    """Field metadata: a predicate on the (type-checked) value and the words for the error."""
    return {"check": check, "allowed": allowed}


def _f(default, check=None, allowed: str = "", **kw):
    meta = _check(check, allowed) if check else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_POS = (lambda v: v > 0, "an integer > 0")
_NONNEG = (lambda v: v >= 0, "an integer >= 0")
_POSF = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NONNEGF = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def _one_of(*values):
    return (lambda v: v in values, "one of " + ", ".join(map(str, values)))


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture (Megatron-Core TransformerConfig / GPTModel arguments)."""

    name: str = "custom"
    num_layers: int = _f(4, *_POS)
    hidden_size: int = _f(128, *_POS)
    #: Dense MLP width (per projection for SwiGLU).
    ffn_hidden_size: int = _f(512, *_POS)
    num_attention_heads: int = _f(4, *_POS)
    #: KV heads (GQA groups); = MSA index heads.
    num_query_groups: int = _f(2, *_POS)
    #: Head dim.
    kv_channels: int = _f(32, *_POS)
    rotary_percent: float = _f(1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    rotary_base: int = _f(10000, *_POS)
    normalization: str = _f("RMSNorm", *_one_of("RMSNorm", "LayerNorm"))
    swiglu: bool = True
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = _f(0.02, *_POSF)
    hidden_dropout: float = _f(0.0, *_UNIT)
    attention_dropout: float = _f(0.0, *_UNIT)
    make_vocab_size_divisible_by: int = _f(128, *_POS)
    # ---- the model's MSA shape (used with attention=msa; the attention group reads these
    # through interpolation, and attention.msa.* overrides them). MiniMax-M3: 128/16/128/3.
    msa_block_size: int = _f(128, *_POS)
    msa_topk: int = _f(16, *_POS)
    msa_index_dim: int = _f(128, *_POS)
    #: Leading layers kept dense (attention.msa.first_dense_layers).
    msa_dense_layers: int = _f(0, *_NONNEG)
    # ---- mixture of experts (num_moe_experts null = dense MLP everywhere)
    num_moe_experts: Optional[int] = _f(None, *_POS)
    moe_router_topk: int = _f(2, *_POS)
    moe_ffn_hidden_size: Optional[int] = _f(None, *_POS)
    moe_shared_expert_intermediate_size: Optional[int] = _f(None, *_POS)
    #: Leading layers with a dense MLP (the paper's 109B: 3 dense + 38 MoE).
    moe_first_dense_layers: int = _f(0, *_NONNEG)
    moe_aux_loss_coeff: float = _f(1e-2, *_NONNEGF)
    moe_router_load_balancing_type: str = _f("aux_loss", *_one_of("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    moe_router_score_function: str = _f("softmax", *_one_of("softmax", "sigmoid"))
    moe_token_dispatcher_type: str = _f("alltoall", *_one_of("allgather", "alltoall"))
    moe_grouped_gemm: bool = False
    # ---- kernels / memory
    use_te: bool = False
    recompute_granularity: Optional[str] = _f(None, *_one_of("full", "selective"))
    recompute_method: Optional[str] = _f(None, *_one_of("uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, *_POS)
    #: Any other TransformerConfig field, passed through (names checked against it).
    extra: Dict[str, Any] = _f({})


# --------------------------------------------------------------------------- attention
@dataclass
class WarmupConfig:
    """Full-attention warmup: mode ``msa_warmup`` (dense main branch, index learns from the
    dense teacher) for this many steps or tokens, then ``attention.msa.mode``."""

    steps: Optional[int] = _f(None, *_NONNEG)
    tokens: Optional[int] = _f(None, *_NONNEG)


@dataclass
class IndexerOnlyConfig:
    """Dense->MSA conversion: a first phase in which only index_* parameters train."""

    steps: Optional[int] = _f(None, *_NONNEG)
    tokens: Optional[int] = _f(None, *_NONNEG)
    #: LR multiplier of every non-index parameter during the phase (0 = frozen: its
    #: weights stay bit-identical, though its grads are still computed).
    backbone_lr_scale: float = _f(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    #: requires_grad=False on the backbone: no backbone grads or optimizer state at all.
    #: Only for a phase covering the whole run (a separate conversion stage).
    freeze_backbone: bool = False


@dataclass
class AttentionConfig:
    #: dense | msa | swa (sliding window: the FLOP-matched baseline of issue 10).
    type: str = _f("dense", *_one_of("dense", "msa", "swa"))
    #: MSAConfig fields (msa_megatron.config); validated by MSAConfig itself. For swa: the
    #: MSA settings the window is FLOP-matched to, and which layers get the window.
    msa: Dict[str, Any] = _f({})
    #: type=swa: keys per query (its own included); null: FLOP-matched to ``msa`` at
    #: train.seq_length (Eq. 12, msa_megatron.flops.flop_matched_window_for).
    window: Optional[int] = _f(None, *_POS)
    #: type=msa: index_* parameters keep their initial values (requires_grad=False): the
    #: "no KL teacher" ablation, selection from an untrained indexer.
    freeze_indexer: bool = False
    #: type=msa: after the last step, held-out selection recall of the trained model for each
    #: [block_size, topk] (main branch dense, selection by the trained indexer at that budget).
    recall_sweep: Optional[List[List[int]]] = None
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    #: Optional piecewise-linear KL coefficient: [[step, coeff], ...] (overrides msa.kl_coeff).
    kl_schedule: Optional[List[List[float]]] = None
    indexer_only: IndexerOnlyConfig = field(default_factory=IndexerOnlyConfig)


# --------------------------------------------------------------------------- parallel
@dataclass
class ParallelConfig:
    tp: int = _f(1, *_POS)
    pp: int = _f(1, *_POS)
    cp: int = _f(1, *_POS)
    ep: int = _f(1, *_POS)
    sp: bool = False
    #: Overlap DP grad reduce-scatter / param all-gather with compute (GPU).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


# --------------------------------------------------------------------------- data
@dataclass
class BlendEntry:
    #: Megatron indexed-dataset prefix (<path>.bin / <path>.idx).
    path: str = ""
    weight: float = _f(1.0, *_POSF)


@dataclass
class CorpusConfig:
    """The embedded default corpus: this Python's standard library sources, byte-level."""

    #: null: $MSA_CACHE_DIR, else ~/.cache/msa_megatron.
    cache_dir: Optional[str] = None
    include_tests: bool = False
    #: Files shorter than this (in bytes) are skipped: documents should exceed the MSA budget.
    min_doc_bytes: int = _f(2048, *_NONNEG)
    #: Installed Python packages whose .py sources join the stdlib's, in this order (e.g. [torch]:
    #: ~46M bytes where a distribution's stripped stdlib has ~10M, so long runs repeat less).
    packages: List[str] = _f([])
    #: Document order. path: sorted by path, so data.split's held-out range is the last files
    #: alphabetically (with torch: 43 files, 28% of their bytes one generated table); shuffled: a
    #: fixed order by a hash of the path, so the held-out range samples the whole corpus.
    order: str = _f("path", *_one_of(*CORPUS_ORDERS))


@dataclass
class AssocRecallConfig:
    """Multi-query associative recall (msa_megatron.experiments.assoc_recall): key-value pairs at
    the start of a sequence, queries at its end, ordinary text in between."""

    #: Fraction of training sequences replaced by recall examples (their own text as filler).
    train_fraction: float = _f(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    #: Held-out recall batches (micro-batches) evaluated at every evaluation (0: off);
    #: logged as val_assoc_recall_acc.
    eval_batches: int = _f(0, *_NONNEG)
    num_pairs: int = _f(16, *_POS)
    num_queries: int = _f(16, *_POS)
    #: Distance-bucket edges (issue 19): each queried pair planted at a distance from its query
    #: drawn from one bucket; eval logs val_assoc_recall_acc/d<lo>_<hi> per bucket. []: pairs at the start.
    distance_buckets: List[int] = _f([])
    #: Weight of the loss at a recall example's answers (the value after each query key) relative
    #: to its other tokens (1: plain LM loss). A query's answer is 1 token in ~500 at 8K, too rare
    #: a signal for dense attention to learn the task in a short run (run 12); > 1 strengthens it.
    #: The training lm_loss is then the weighted mean; held-out loss (plain text) is unaffected.
    answer_loss_weight: float = _f(1.0, lambda v: v >= 1, "a number >= 1")


@dataclass
class PasskeyConfig:
    """Passkey copy probe (msa_megatron.experiments.passkey), scored at every evaluation, trained on
    only with train_fraction > 0: records ``KEY_<name> = "<hex>"`` planted in held-out text and
    repeated at its end, the original at a distance drawn from a bucket; logs val_passkey_acc and
    val_passkey_acc/d<lo>_<hi> (per-digit accuracy, chance 1/16)."""

    #: Held-out micro-batches of probe examples per evaluation (0: off).
    eval_batches: int = _f(0, *_NONNEG)
    #: Fraction of training sequences replaced by probe examples (their own text as filler): 0
    #: keeps it a probe; > 0 trains on it (then it is a task, like data.assoc_recall).
    train_fraction: float = _f(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    #: Weight of the loss at the repeated records' digits relative to other tokens (train_fraction > 0).
    answer_loss_weight: float = _f(1.0, lambda v: v >= 1, "a number >= 1")
    num_keys: int = _f(12, *_POS)
    value_len: int = _f(8, *_POS)
    #: Edges of the distance buckets (repeated record start - original start), in
    #: [num_keys x 25, train.seq_length - num_keys x 25] with the default record of 25 tokens.
    distance_buckets: List[int] = _f([320, 1024, 2048, 3200, 4096, 6144, 7872])


@dataclass
class DataConfig:
    source: str = _f("corpus", *_one_of("corpus", "indexed"))
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    #: source=indexed: datasets and their sampling weights.
    blend: List[BlendEntry] = _f([])
    #: Train/valid/test split of each dataset's documents (Megatron's split string).
    split: str = "98,2,0"
    #: Token ids: read from <prefix>.meta.json (written by scripts/prepare_data.py) unless set.
    vocab_size: Optional[int] = _f(None, *_POS)
    eod_id: Optional[int] = _f(None, *_NONNEG)
    #: Where megatron.core.datasets caches its sample indices (null: <run_dir>/data_cache).
    index_cache_dir: Optional[str] = None
    num_workers: int = _f(0, *_NONNEG)
    #: Loss on the EOD token itself (Megatron's eod_mask_loss inverted).
    mask_eod_loss: bool = False
    #: Documents in a training sequence: none (attention crosses EOD, Megatron's default) or eod
    #: (a document mask at every EOD: every layer gets PackedSeqParams; docs/training.md).
    packing: str = _f("none", *_one_of("none", "eod"))
    assoc_recall: AssocRecallConfig = field(default_factory=AssocRecallConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)


# --------------------------------------------------------------------------- train
@dataclass
class DebugConfig:
    """Fault injection for tests of the failure paths."""

    nan_grad_step: Optional[int] = _f(None, *_POS)
    #: Substring of the parameter name whose gradient becomes NaN at nan_grad_step.
    nan_grad_param: str = "decoder.layers.0.mlp"
    #: Sleep this long after every step (lets a test deliver a signal mid-run).
    step_sleep_s: float = _f(0.0, *_NONNEGF)


@dataclass
class TrainConfig:
    #: Length of the run: exactly one of steps / tokens.
    steps: Optional[int] = _f(None, *_POS)
    tokens: Optional[int] = _f(None, *_POS)
    seq_length: int = _f(512, *_POS)
    global_batch_size: int = _f(8, *_POS)
    micro_batch_size: int = _f(4, *_POS)
    lr: float = _f(1e-3, *_NONNEGF)
    min_lr: float = _f(1e-4, *_NONNEGF)
    #: LR warmup: steps, or a fraction of the decay steps (Megatron-LM's two options).
    lr_warmup_steps: Optional[int] = _f(None, *_NONNEG)
    lr_warmup_fraction: Optional[float] = _f(None, *_UNIT)
    lr_decay_style: str = _f("cosine", *_one_of("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    #: null: the whole run.
    lr_decay_steps: Optional[int] = _f(None, *_POS)
    lr_wsd_decay_steps: Optional[int] = _f(None, *_POS)
    lr_wsd_decay_style: str = _f("linear", *_one_of("linear", "cosine", "exponential", "minus_sqrt"))
    weight_decay: float = _f(0.1, *_NONNEGF)
    adam_beta1: float = _f(0.9, *_UNIT)
    adam_beta2: float = _f(0.95, *_UNIT)
    adam_eps: float = _f(1e-8, *_POSF)
    #: Global grad-norm clip (0 = off).
    clip_grad: float = _f(1.0, *_NONNEGF)
    precision: str = _f("fp32", *_one_of("fp32", "bf16", "fp16"))
    seed: int = _f(1234, *_NONNEG)
    eval_interval: int = _f(0, *_NONNEG)
    eval_iters: int = _f(2, *_POS)
    #: What a non-finite loss or gradient does: stop (exit 1, last good checkpoint kept)
    #: or skip (drop the update, continue; stop after max_consecutive_skips).
    nan_policy: str = _f("stop", *_one_of("stop", "skip"))
    #: Refuse to start without a CUDA GPU (set by the GPU presets, e.g. train=gpu).
    requires_gpu: bool = False
    max_consecutive_skips: int = _f(5, *_POS)
    debug: DebugConfig = field(default_factory=DebugConfig)


# --------------------------------------------------------------------------- logging
@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = _f("offline", *_one_of("offline", "online", "disabled"))
    project: str = "msa_megatron"
    entity: Optional[str] = None
    #: null: the run directory's name.
    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = _f([])


@dataclass
class LoggingConfig:
    log_interval: int = _f(1, *_POS)
    progress_bar: bool = True
    jsonl: bool = True
    #: Per-layer MSA panels (msa/indexer_kl/layer_i, ...) in wandb / TensorBoard: opt-in, dozens
    #: of panels on large models. metrics.jsonl always holds them.
    per_layer: bool = False
    #: TensorBoard event files in <run_dir>/tensorboard (torch.utils.tensorboard; needs `tensorboard`).
    tensorboard: bool = True
    #: PNG plots (loss, KL, recall, entropy) in <run_dir>/plots at the end of every run.
    plots: bool = True
    #: Peak dense TFLOP/s of one device for MFU; null: known GPUs from a table; on CPU no
    #: MFU unless set (a measured CPU peak on a shared machine gave MFUs over 100%).
    peak_tflops: Optional[float] = _f(None, *_POSF)
    #: Print the whole resolved configuration at start (it is always in <run_dir>/config.yaml;
    #: by default the console shows the command-line overrides only).
    print_config: bool = False
    level: str = _f("INFO", *_one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    wandb: WandbConfig = field(default_factory=WandbConfig)


# --------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    #: Save every N steps (0 = only at the end / on SIGTERM).
    interval: int = _f(0, *_NONNEG)
    keep_last: int = _f(2, *_POS)
    save_at_end: bool = True
    save_on_sigterm: bool = True
    #: auto: continue from <run_dir>/checkpoints/latest if present; never: start fresh
    #: (refused if the run directory already holds checkpoints).
    #: last: with run_dir unset, continue the newest runs/<model>-<attention>-* run.
    resume: str = _f("auto", *_one_of("auto", "never", "last"))
    #: Resume the full training state from another checkpoint (a step dir, or a
    #: checkpoints dir with a `latest` marker) when the run directory has none.
    load: Optional[str] = None
    load_optimizer: bool = True
    #: Model weights only, fresh optimizer and step 0 (dense->MSA conversion: index_*
    #: parameters missing from the checkpoint are initialised per index_init).
    init_from: Optional[str] = None
    #: Index branch of a dense checkpoint loaded into an MSA model: mean (from the dense
    #: q/k projections, the backend's init_index_from_dense) | megatron (fresh init_method).
    index_init: str = _f("mean", *_one_of("mean", "megatron"))
    #: Check every file of a checkpoint against its manifest.json (sizes + sha256) before
    #: anything in it is read (torch's .metadata is a pickle: see docs/training.md).
    verify: bool = True
    #: resume=auto: when the newest checkpoint fails its check or its load, say so in one
    #: line and resume from the newest older complete one (false: stop with that line).
    fallback: bool = True


# --------------------------------------------------------------------------- root
@dataclass
class Config:
    #: null: a new runs/<model>-<attention>-<timestamp> (chosen by rank 0 at start-up).
    run_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ------------------------------------------------------------- derived values
    @property
    def msa(self) -> Optional[MSAConfig]:
        """The validated MSAConfig (None for dense attention)."""
        if self.attention.type != "msa":
            return None
        return build_msa_config(self.attention.msa)

    def swa_window(self) -> Optional[int]:
        """type=swa: the window in force (attention.window, or FLOP-matched when null)."""
        a, m = self.attention, self.model
        if a.type != "swa":
            return None
        if a.window is not None:
            return a.window
        from ..flops import flop_matched_window_for

        return flop_matched_window_for(build_msa_config(a.msa), m.num_attention_heads, m.kv_channels,
                                       m.num_query_groups, self.train.seq_length)

    def swa_layers(self) -> List[int]:
        """type=swa: 0-based layers with the window (those MSA would use)."""
        msa = build_msa_config(self.attention.msa)
        return [i for i in range(self.model.num_layers) if msa.is_msa_layer(i)]

    def assoc_recall_spec(self):
        """The recall task's spec over one training sample (seq_length + 1 tokens)."""
        from ..experiments.assoc_recall import AssocRecallSpec

        r = self.data.assoc_recall
        return AssocRecallSpec(seq_len=self.train.seq_length + 1, num_pairs=r.num_pairs, num_queries=r.num_queries,
                               distance_buckets=tuple(r.distance_buckets or ()))

    def passkey_spec(self):
        """The passkey probe's spec over one held-out sequence (train.seq_length tokens)."""
        from ..experiments.passkey import PasskeySpec

        k = self.data.passkey
        return PasskeySpec(seq_len=self.train.seq_length, num_keys=k.num_keys, value_len=k.value_len,
                           distance_buckets=tuple(k.distance_buckets or ()))

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tp * p.pp * p.cp)

    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.train.seq_length

    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return -(-self.train.tokens // self.tokens_per_step())

    def lr_decay_steps(self) -> int:
        return self.train.lr_decay_steps or self.total_steps()

    def lr_warmup_steps(self) -> int:
        t = self.train
        if t.lr_warmup_fraction is not None:
            return int(t.lr_warmup_fraction * self.lr_decay_steps())
        return t.lr_warmup_steps or 0

    def steps_from(self, steps: Optional[int], tokens: Optional[int]) -> int:
        """A phase given in steps or tokens, as a number of steps (tokens round up)."""
        if steps is not None:
            return steps
        if tokens is not None:
            return -(-tokens // self.tokens_per_step())
        return 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(path: str, value: Any, tp, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0], meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{path}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(path, value, meta.get("allowed") or "an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, meta.get("allowed") or "a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, meta.get("allowed") or "a string")
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(path, value, meta["allowed"])
    return value


def _build(cls, values: Mapping[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(path, values[unknown[0]], f"an existing field of {prefix or 'the config'}: one of "
                          + ", ".join(sorted(fields)))
    kwargs = {}
    for name, value in values.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(path, value, hints[name], fields[name].metadata)
    return cls(**kwargs)


def build_msa_config(values: Mapping[str, Any]) -> MSAConfig:
    """MSAConfig.from_dict, with its error re-addressed to attention.msa.<field>."""
    try:
        return MSAConfig.from_dict(dict(values))
    except MSAConfigError as e:
        raise ConfigError(f"attention.msa.{e.field_name}", e.value, e.allowed) from None
    except TypeError as e:  # e.g. a list where an int belongs, caught by dataclass init
        raise ConfigError("attention.msa", dict(values), f"valid MSAConfig fields ({e})") from None


def load_config(values: Mapping[str, Any]) -> Config:
    """Plain mapping (OmegaConf.to_container(resolve=True)) -> typed, field-checked Config."""
    values = dict(values)
    values.pop("hydra", None)
    return _build(Config, values, "")


# --------------------------------------------------------------------------- cross-field
def validate(cfg: Config, world_size: int) -> Config:
    """Checks that involve several fields or the number of processes. Raises ConfigError."""
    m, a, p, t, d = cfg.model, cfg.attention, cfg.parallel, cfg.train, cfg.data

    # ---- parallel layout vs processes
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel != 0:
        raise ConfigError("parallel", f"tp={p.tp} pp={p.pp} cp={p.cp}",
                          f"layouts with tp*pp*cp dividing the {world_size} processes (tp*pp*cp={model_parallel})")
    dp = world_size // model_parallel
    if p.ep > 1:
        if m.num_moe_experts is None:
            raise ConfigError("parallel.ep", p.ep, "1 for a model without experts (model.num_moe_experts is null)")
        if (dp * p.cp) % p.ep != 0:
            raise ConfigError("parallel.ep", p.ep, f"a divisor of dp*cp={dp * p.cp} with {world_size} processes")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp", p.sp, "false with parallel.tp=1 (sequence parallelism splits over TP)")
    if m.num_moe_experts is not None and p.tp > 1 and not p.sp:
        raise ConfigError("parallel.sp", p.sp, "true for an MoE model with parallel.tp > 1 (Megatron-Core requires it)")

    # ---- model vs layout
    for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups),
                        ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % p.tp != 0:
            raise ConfigError(f"model.{name}", value, f"multiples of parallel.tp={p.tp}")
    if m.make_vocab_size_divisible_by % p.tp != 0:
        raise ConfigError("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by,
                          f"multiples of parallel.tp={p.tp} (the padded vocabulary is split over TP)")
    if m.num_attention_heads % m.num_query_groups != 0:
        raise ConfigError("model.num_query_groups", m.num_query_groups,
                          f"divisors of model.num_attention_heads={m.num_attention_heads}")
    uneven = {"num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout"}
    if m.num_layers % p.pp != 0 and not uneven.intersection(m.extra):
        raise ConfigError("model.num_layers", m.num_layers, f"multiples of parallel.pp={p.pp} (or set an uneven split "
                          "in model.extra: num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage)")
    if m.rotary_percent * m.kv_channels % 2 != 0:
        raise ConfigError("model.rotary_percent", m.rotary_percent,
                          f"values making rotary_percent*kv_channels an even number (kv_channels={m.kv_channels})")
    if m.num_moe_experts is not None:
        if m.num_moe_experts % p.ep != 0:
            raise ConfigError("model.num_moe_experts", m.num_moe_experts, f"multiples of parallel.ep={p.ep}")
        if m.moe_router_topk > m.num_moe_experts:
            raise ConfigError("model.moe_router_topk", m.moe_router_topk, f"an integer in [1, {m.num_moe_experts}]")
        if m.moe_first_dense_layers >= m.num_layers:
            raise ConfigError("model.moe_first_dense_layers", m.moe_first_dense_layers, f"an integer in [0, {m.num_layers - 1}]")
    if p.cp > 1 and t.seq_length % (2 * p.cp) != 0:
        raise ConfigError("train.seq_length", t.seq_length, f"multiples of 2*parallel.cp={2 * p.cp} (Megatron's "
                          "load-balanced CP split)")
    if p.sp and t.seq_length % (p.cp * p.tp) != 0:
        raise ConfigError("train.seq_length", t.seq_length,
                          f"multiples of parallel.cp*parallel.tp={p.cp * p.tp} with sequence parallelism")
    if m.recompute_granularity == "full" and m.recompute_method is None:
        raise ConfigError("model.recompute_method", None, "uniform or block with recompute_granularity=full")
    _check_extra(m.extra)

    # ---- attention
    if a.type == "msa":
        msa = build_msa_config(a.msa)
        try:
            msa.validate_for_model(m.num_layers, m.num_query_groups, p.tp)
        except MSAConfigError as e:
            raise ConfigError(f"attention.msa.{e.field_name}", e.value, e.allowed) from None
        if msa.mode not in ("msa", "msa_warmup", "dense"):
            raise ConfigError("attention.msa.mode", msa.mode, ", ".join(ATTENTION_MODES))
    else:
        for name, ph in (("warmup", a.warmup), ("indexer_only", a.indexer_only)):
            if ph.steps or ph.tokens:
                raise ConfigError(f"attention.{name}.steps", ph.steps or ph.tokens, f"0 or null with attention.type={a.type}")
        if a.kl_schedule:
            raise ConfigError("attention.kl_schedule", a.kl_schedule, f"null with attention.type={a.type}")
        if a.freeze_indexer:
            raise ConfigError("attention.freeze_indexer", True, f"false with attention.type={a.type} (no index parameters)")
        if a.recall_sweep:
            raise ConfigError("attention.recall_sweep", a.recall_sweep, f"null with attention.type={a.type}")
    if a.type == "swa":
        if m.use_te:
            raise ConfigError("model.use_te", True, "false with attention.type=swa (local backend only)")
        if p.cp > 1:
            raise ConfigError("parallel.cp", p.cp, "1 with attention.type=swa")
        cfg.swa_window()  # validates attention.msa
    elif a.window is not None:
        raise ConfigError("attention.window", a.window, "null unless attention.type=swa")
    for i, pair in enumerate(a.recall_sweep or []):
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair) \
                or pair[0] % 16 != 0:
            raise ConfigError(f"attention.recall_sweep[{i}]", pair, "pairs [block_size (a multiple of 16), topk >= 1]")
    r, k = d.assoc_recall, d.passkey
    if k.train_fraction > 0 and r.train_fraction > 0:
        raise ConfigError("data.passkey.train_fraction", k.train_fraction, "0 while data.assoc_recall.train_fraction > 0 "
                          "(one task mixed into training at a time)")
    _check_held_out_task(cfg, "data.assoc_recall", r, cfg.assoc_recall_spec,
                         {"num_pairs": r.num_pairs, "num_queries": r.num_queries})
    _check_held_out_task(cfg, "data.passkey", k, cfg.passkey_spec, {"num_keys": k.num_keys, "value_len": k.value_len})
    for name, ph in (("warmup", a.warmup), ("indexer_only", a.indexer_only)):
        if ph.steps is not None and ph.tokens is not None:
            raise ConfigError(f"attention.{name}.tokens", ph.tokens, f"null when attention.{name}.steps is set (one of the two)")
    if a.kl_schedule is not None:
        _check_kl_schedule(a.kl_schedule)

    # ---- batch / length
    if (t.steps is None) == (t.tokens is None):
        raise ConfigError("train.steps", t.steps, "an integer > 0 with train.tokens=null, or null with train.tokens set (exactly one)")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"multiples of micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    total = cfg.total_steps()
    if t.min_lr > t.lr:
        raise ConfigError("train.min_lr", t.min_lr, f"a number <= train.lr={t.lr}")
    decay = t.lr_decay_steps or total
    if t.lr_warmup_steps is not None and t.lr_warmup_fraction is not None:
        raise ConfigError("train.lr_warmup_fraction", t.lr_warmup_fraction, "null when train.lr_warmup_steps is set (one of the two)")
    if cfg.lr_warmup_steps() >= decay:
        raise ConfigError("train.lr_warmup_steps", cfg.lr_warmup_steps(), f"an integer < the LR decay steps ({decay})")
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_steps is None:
        raise ConfigError("train.lr_wsd_decay_steps", None, "an integer > 0 with lr_decay_style=WSD")
    io = a.indexer_only
    io_steps = cfg.steps_from(io.steps, io.tokens)
    if io.freeze_backbone and io_steps < total:
        raise ConfigError("attention.indexer_only.freeze_backbone", True,
                          f"false unless the indexer-only phase covers the whole run ({io_steps} < {total} steps); "
                          "use backbone_lr_scale=0 for a phase that ends")
    if io_steps and a.type != "msa":
        raise ConfigError("attention.indexer_only.steps", io_steps, "0 with attention.type=dense (no index parameters)")

    # ---- data
    if d.packing == "eod":
        if m.use_te and (p.cp > 1 or (p.pp > 1 and t.micro_batch_size > 1)):
            raise ConfigError("data.packing", d.packing, "none with model.use_te=true and parallel.cp > 1 or "
                              "(parallel.pp > 1 and train.micro_batch_size > 1): Transformer Engine takes documents "
                              "only in the THD layout (cp=1, one packed row per pipeline message)")
        if d.assoc_recall.train_fraction > 0:
            raise ConfigError("data.packing", d.packing, "none with data.assoc_recall.train_fraction > 0 (recall "
                              "examples keep the replaced sample's document boundaries)")
        if d.passkey.train_fraction > 0:
            raise ConfigError("data.packing", d.packing, "none with data.passkey.train_fraction > 0 (probe "
                              "examples keep the replaced sample's document boundaries)")
    if d.source == "indexed":
        if not d.blend:
            raise ConfigError("data.blend", [], "a non-empty list of {path: <prefix>, weight: <w>} with data.source=indexed")
        for i, entry in enumerate(d.blend):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(entry.path + suffix):
                    raise ConfigError(f"data.blend[{i}].path", entry.path,
                                      f"prefixes of existing Megatron indexed datasets ({entry.path + suffix} not found)")
    _check_split(d.split)
    if (d.vocab_size is None) != (d.eod_id is None):
        raise ConfigError("data.eod_id" if d.eod_id is None else "data.vocab_size", None,
                          "set together with the other one (data.vocab_size and data.eod_id), or both null")
    if d.eod_id is not None and d.eod_id >= d.vocab_size:
        raise ConfigError("data.eod_id", d.eod_id, f"an integer < data.vocab_size={d.vocab_size}")

    # ---- checkpoint
    ck = cfg.checkpoint
    if ck.load is not None and ck.init_from is not None:
        raise ConfigError("checkpoint.init_from", ck.init_from, "null when checkpoint.load is set (one of the two)")
    for name in ("load", "init_from"):
        path = getattr(ck, name)
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"checkpoint.{name}", path, "an existing checkpoint directory")
    if cfg.logging.wandb.mode == "online" and not cfg.logging.wandb.enabled:
        raise ConfigError("logging.wandb.enabled", False, "true with logging.wandb.mode=online")
    return cfg


def _check_held_out_task(cfg: Config, path: str, task, make_spec, fields: Dict[str, Any]) -> None:
    """A data task (data.assoc_recall, data.passkey) that is trained on or scored must fit the
    sequence; scoring it needs the whole sequence on one rank (pp = cp = 1)."""
    if task.train_fraction <= 0 and task.eval_batches <= 0:
        return
    try:
        make_spec().validate()
    except ValueError as e:
        raise ConfigError(path, {**fields, "distance_buckets": list(task.distance_buckets or [])},
                          f"a task that fits train.seq_length={cfg.train.seq_length} ({e})") from None
    if task.eval_batches > 0 and (cfg.parallel.pp > 1 or cfg.parallel.cp > 1):
        raise ConfigError(f"{path}.eval_batches", task.eval_batches, "0 with parallel.pp > 1 or parallel.cp > 1")


def _check_split(split: str) -> None:
    parts = split.split(",")
    try:
        nums = [float(x) for x in parts]
    except ValueError:
        nums = []
    if len(nums) != 3 or any(x < 0 for x in nums) or nums[0] <= 0:
        raise ConfigError("data.split", split, "three comma-separated weights train,valid,test with train > 0 (e.g. 98,2,0)")


def _check_kl_schedule(points: List[List[float]]) -> None:
    last = -1
    for i, pt in enumerate(points):
        if len(pt) != 2 or not float(pt[0]).is_integer() or pt[0] < 0 or not math.isfinite(pt[1]) or pt[1] < 0:
            raise ConfigError(f"attention.kl_schedule[{i}]", pt, "pairs [step >= 0, coeff >= 0]")
        if pt[0] <= last:
            raise ConfigError(f"attention.kl_schedule[{i}]", pt, "pairs with strictly increasing steps")
        last = pt[0]
    if not points:
        raise ConfigError("attention.kl_schedule", points, "null or a non-empty list of [step, coeff]")


def _check_extra(extra: Mapping[str, Any]) -> None:
    if not extra:
        return
    from ..megatron.transformer_config import MSATransformerConfig  # TransformerConfig + rope_llama3_scaling

    known = {f.name for f in dataclasses.fields(MSATransformerConfig)}
    for key in extra:
        if key not in known:
            raise ConfigError(f"model.extra.{key}", extra[key], "TransformerConfig field names")


def kl_coeff_at(points: List[List[float]], step: int) -> float:
    """Piecewise-linear interpolation of [[step, coeff], ...]; constant outside the points."""
    if step <= points[0][0]:
        return float(points[0][1])
    for (s0, c0), (s1, c1) in zip(points, points[1:]):
        if step <= s1:
            return float(c0 + (c1 - c0) * (step - s0) / (s1 - s0))
    return float(points[-1][1])


__all__: Tuple[str, ...] = ("Config", "ConfigError", "load_config", "validate", "build_msa_config", "kl_coeff_at")

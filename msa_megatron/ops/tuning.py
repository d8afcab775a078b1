"""Kernel tuning knobs: one dataclass per kernel family, one ``"k=v,..."`` syntax, one
environment variable each.

* :class:`KernelConfig` (main branch, ``ops/triton_sparse_attn.py`` and ``ops/triton_union.py``):
  ``MSA_MAIN_KERNEL="fwd_rows=64,bwd_warps=4"``.
* :class:`IndexConfig` (index branch, ``ops/triton_index.py``):
  ``MSA_INDEX_KERNEL="sel_block_m=128,lazy_topk=0,fp8_prefill=1"``.

Both parse with :meth:`from_spec` (bools as 0/1/true/false/yes/no) and check every field; an
unknown key or a bad value is a :class:`KernelConfigError` (a :class:`~msa_megatron.config.ConfigError`)
naming the field and its allowed values. The old single-purpose index variables
(``MSA_INDEX_TILES``, ``MSA_KL_TILES``, ``MSA_INDEX_FP8``, ``MSA_INDEX_LAZY_TOPK``) still work for
one release and warn once with the new spelling (:func:`index_env_overrides`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional

from ..config import ConfigError

MAIN_IMPLS = ("auto", "union", "kv")
FWD_IMPLS = ("kv", "q")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_WARPS = (1, 2, 4, 8, 16)


class KernelConfigError(ConfigError):
    """A bad kernel knob: ``KernelConfig.fwd_rows=48: allowed values are a power of 2 >= 16``
    (the kernel configs' wording, kept from before they shared :class:`ConfigError`)."""

    def _message(self) -> str:
        return f"{self.field}={self.value!r}: allowed values are {self.allowed}"


def _parse(cls, name: str, raw: str, source: str) -> Any:
    """One ``k=v`` value -> the field's type (the dataclass annotations are strings here)."""
    kind = {f.name: f.type for f in fields(cls)}[name]
    where = f"{source}.{name}"
    if kind == "bool":
        low = raw.lower()
        if low not in _TRUE + _FALSE:
            raise KernelConfigError(where, raw, "0, 1, true, false, yes, no")
        return low in _TRUE
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise KernelConfigError(where, raw, "an integer") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise KernelConfigError(where, raw, "a number") from None
    return raw


class _Spec:
    """``from_spec`` / ``from_env`` shared by the kernel config dataclasses."""

    ENV = ""  # the process-wide override variable

    @classmethod
    def from_spec(cls, spec: str, base=None, source: Optional[str] = None):
        """``"fwd_rows=64,lpt_order=0"`` applied over ``base`` (default: the defaults)."""
        source = source or cls.__name__
        names = [f.name for f in fields(cls)]
        kw: Dict[str, Any] = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            name, eq, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name not in names:
                raise KernelConfigError(f"{source}: unknown field", name, ", ".join(names))
            if not eq:
                raise KernelConfigError(f"{source}.{name}", item.strip(), f"{name}=<value>")
            kw[name] = _parse(cls, name, value, source)
        try:
            return replace(base or cls(), **kw)
        except KernelConfigError as exc:  # a range check: name the variable the value came from
            if source == cls.__name__ or not exc.field.startswith(cls.__name__ + "."):
                raise
            raise KernelConfigError(source + exc.field[len(cls.__name__):], exc.value, exc.allowed) from None

    @classmethod
    def from_env(cls, base=None):
        """``base`` (default: the defaults) overridden by the class's environment variable."""
        return cls.from_spec(os.environ.get(cls.ENV, ""), base, source=cls.ENV)


def _pow2(cls_name: str, name: str, v: int) -> None:
    if v < 16 or v & (v - 1):
        raise KernelConfigError(f"{cls_name}.{name}", v, "a power of 2 >= 16")


# ----------------------------------------------------------------------------- main branch
@dataclass(frozen=True)
class KernelConfig(_Spec):
    """Tile sizes and launch knobs of the main-branch kernels. Override per call (``config=``)
    or for a process with ``MSA_MAIN_KERNEL="fwd_rows=64,bwd_warps=4"`` (benchmark sweeps)."""

    ENV = "MSA_MAIN_KERNEL"

    fwd_impl: str = "kv"  # "kv": KV-outer + combine; "q": the query-outer baseline (msa_megatron/bench/qouter.py)
    fwd_rows: int = 64  # H100 sweep at 128K (docs/gpu_logs/run3_tune): 64 rows x 4 warps 64.5 ms vs 73.7; MMA rows per tile in the KV-outer forward (positions x padded G)
    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_rows: int = 64  # MMA rows per tile in the KV-outer backward
    bwd_warps: int = 8
    bwd_stages: int = 2
    q_warps: int = 4  # query-outer forward (baseline)
    q_stages: int = 2
    q_block_n: int = 64  # keys per step of the query-outer forward
    dq_partial_lowp: bool = True  # run3 sweep: bwd 100 ms vs 123 (fp32 partials); deterministic dQ partials in q's dtype instead of fp32 (half the traffic)
    bwd_split: bool = False  # dV and dK+dQ by two launches: one accumulator each, 6 dots instead of 5
    fwd_block_n: int = 128  # keys per program: largest power of 2 dividing block_size, capped here
    bwd_block_n: int = 128  # same for the backward (64 halves the dK/dV registers, doubles dQ partials)
    items_per_sm: int = 8  # target work items per SM when splitting hot blocks
    item_pairs: int = 0  # (query, slot) pairs per work item; 0 = automatic
    partial_bytes: int = 0  # memory budget of the per-chunk partial buffers; 0 = auto (see triton_sparse_attn.partial_budget)
    mem_envelope_gib: float = 74.0  # auto partial budgets: what one layer's fwd+bwd may hold in all (an 80 GB card less 5 GiB); the budget is this less the call's resident tensors, in [512 MiB, 8 GiB]
    chunk_queries: int = 0  # cap on query positions per chunk (smaller: q rows more L2-resident); 0 = none
    lpt_order: bool = True  # launch the largest work items first
    kl_fused: bool = False  # msa op: indexer KL inside the main backward (one pass; values known after backward)
    kl_bwd_stages: int = 1  # pipeline depth of the backward with the fused KL (sm_90a: 2 stages = 225 KB of 227 KB smem)
    # --- v2: union-tile path (ops/triton_union.py; docs/kernels_main.md "v2: union tile")
    main_impl: str = "auto"  # "auto" | "union" | "kv": union tile (fwd + dQ [+ KL]) vs KV-outer; auto decides per call by the mean union size
    union_max_blocks: float = 22.0  # auto: union path when the mean union per tile < this x K/16; measured break-even of main fwd+bwd at 128K (run 9, H200, docs/gpu_logs/run9_h200: union 124.8/187.1 ms at U8 16/32 vs KV-outer 150-152)
    union_max_blocks_fwd: float = 30.0  # the same for calls without a backward (prefill/eval): measured forward crossover (union 30.5/58.8 ms at U8 16/32 vs KV-outer 56.3, run 9)
    union_max_blocks_kl: float = 27.0  # the same for the op's training path (union dQ + split KL): break-even of the op fwd+bwd interpolated from run 9 (union ~154/~238 ms at U8 16/32 with the KV-outer dK/dV vs KV-outer op 214-219)
    union_rows: int = 128  # MMA rows of a union tile: P positions x next_pow2(G) heads (P = 8 at G = 16)
    union_block_n: int = 64  # keys per step (study prototype: 64 beat 128, 23.6 vs 24.8 ms at 128K)
    union_fwd_block_n: int = 0  # the forward's keys per step; 0 = union_block_n. Run 12 (H100, 128K): 128 made the forward 15-17% faster on U8 ~20-32 (AOT: no spill, 164 KB) where the dQ + KL kernel spills at 128; not the default until measured in the whole op
    union_fwd_warps: int = 8
    union_fwd_stages: int = 2
    union_dq_warps: int = 8
    union_dq_stages: int = 2  # study: 2 stages 25.5 ms vs 1 stage 31.3 ms at U8 = 16
    union_kl_stages: int = 2  # the union KL kernel (student side of the indexer KL, 16 rows, 4 warps)
    union_dkdv: str = "kv"  # dK/dV of the union backward: "kv" (KV-outer, dK/dV only) | "union" (per key block over its union entries: run 9 measured it slower, 72.7 vs 64.1 ms at U8 16)
    union_dkdv_block_n: int = 128  # union dK/dV: keys per program (sub-tile of a block)
    union_dkdv_rows: int = 32  # union dK/dV: query rows per step (a tile's P x G rows in steps of this); sm_90a AOT (bf16, d 128): 128 keys x 32 rows, 8 warps = 246 regs, 0 spills, 99 KB smem; 64 rows spill
    union_dkdv_warps: int = 8
    union_dkdv_stages: int = 2
    union_dkdv_item_entries: int = 32  # union dK/dV: union entries per work item (hot blocks split, partials reduced in order); 0 = one program per block
    union_heavy_first: bool = True  # launch tiles with the largest unions first
    union_dik_item_entries: int = 256  # owner-side d_ik pass: union entries per work item (hot blocks split, partials reduced in order); 0 = one program per block
    union_lists_kernel: bool = False  # build the union lists with the Triton kernel (one program per tile) instead of torch ops; off until GPU-verified

    def __post_init__(self) -> None:
        n = "KernelConfig"
        if self.fwd_impl not in FWD_IMPLS:
            raise KernelConfigError(f"{n}.fwd_impl", self.fwd_impl, "'kv', 'q'")
        if self.main_impl not in MAIN_IMPLS:
            raise KernelConfigError(f"{n}.main_impl", self.main_impl, "'auto', 'union', 'kv'")
        if self.union_dkdv not in ("union", "kv"):
            raise KernelConfigError(f"{n}.union_dkdv", self.union_dkdv, "'union', 'kv'")
        for name in ("union_max_blocks", "union_max_blocks_fwd", "union_max_blocks_kl", "mem_envelope_gib"):
            if not getattr(self, name) > 0:
                raise KernelConfigError(f"{n}.{name}", getattr(self, name), "> 0")
        if self.union_fwd_block_n:
            _pow2(n, "union_fwd_block_n", self.union_fwd_block_n)
        for name in ("union_rows", "union_block_n", "union_dkdv_block_n", "union_dkdv_rows", "fwd_rows", "bwd_rows", "fwd_block_n", "bwd_block_n", "q_block_n"):
            _pow2(n, name, getattr(self, name))
        for name in ("union_fwd_warps", "union_dq_warps", "union_dkdv_warps", "fwd_warps", "bwd_warps", "q_warps"):
            if getattr(self, name) not in _WARPS:
                raise KernelConfigError(f"{n}.{name}", getattr(self, name), "1, 2, 4, 8, 16")
        for name in ("union_dik_item_entries", "union_dkdv_item_entries", "item_pairs", "partial_bytes", "chunk_queries"):
            if getattr(self, name) < 0:
                raise KernelConfigError(f"{n}.{name}", getattr(self, name), ">= 0 (0 = automatic)")
        for name in ("union_fwd_stages", "union_dq_stages", "union_kl_stages", "union_dkdv_stages", "kl_bwd_stages", "fwd_stages",
                     "bwd_stages", "q_stages", "items_per_sm"):
            if getattr(self, name) < 1:
                raise KernelConfigError(f"{n}.{name}", getattr(self, name), ">= 1")


def default_config() -> KernelConfig:
    """The defaults overridden by ``MSA_MAIN_KERNEL`` (read at every call: sweeps change it)."""
    return KernelConfig.from_env()


# ----------------------------------------------------------------------------- index branch
@dataclass(frozen=True)
class IndexConfig(_Spec):
    """Tile sizes of the index kernels. Defaults target H100 (sm_90); the interpreter uses larger,
    fewer tiles. Per process: ``MSA_INDEX_KERNEL="sel_block_m=128,sel_warps=8,lazy_topk=0"``
    (read at every call, applied on top of ``triton_index.DEFAULT_INDEX_CONFIG``)."""

    ENV = "MSA_INDEX_KERNEL"

    sel_block_m: int = 128
    sel_warps: int = 8
    #: Software-pipeline depth of the selection kernel. 2, not 3: the data-dependent top-k
    #: branch pipelines better with 2 stages (kernel study section 4, H100: 981 vs 1,247 ms
    #: at 1M, 15.5 vs 19.8 ms at 128K); the arithmetic is the same, so selections are identical.
    sel_stages: int = 2
    #: Update the running top-k only when some row of the tile has a block score above its
    #: current K-th best (0: on every key block; same selections).
    lazy_topk: bool = True
    items_block_q: int = 64  # rows per tile in the reverse-index kernels (LSE and KL)
    items_chunk: int = 256  # rows per reverse-index work item
    kl_warps: int = 8
    kl_stages: int = 2
    kl_block_n: int = 128  # key sub-tile of the KL kernels ([BLOCK_N, di] fp32 d_ik accumulator)
    lse_warps: int = 8
    #: Opt-in: selections that need no index LSE (prefill, ``compute_kl=False``) score with
    #: FP8 e4m3 copies of iq / ik (``triton_index.fp8_index_inputs``); training keeps the input dtype.
    fp8_prefill: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and v <= 0:
                raise KernelConfigError(f"IndexConfig.{f.name}", v, "a positive integer")
        for name in ("sel_warps", "kl_warps", "lse_warps"):
            if getattr(self, name) not in _WARPS:
                raise KernelConfigError(f"IndexConfig.{name}", getattr(self, name), "1, 2, 4, 8, 16")


#: Deprecated single-purpose index variables: (old name, fields it sets, new spelling of one value).
_OLD_INDEX_ENV = {
    "MSA_INDEX_TILES": ("sel_block_m", "sel_warps", "sel_stages"),
    "MSA_KL_TILES": ("items_block_q", "kl_block_n", "kl_warps", "kl_stages"),
    "MSA_INDEX_FP8": ("fp8_prefill",),
    "MSA_INDEX_LAZY_TOPK": ("lazy_topk",),
}
_warned: set = set()


def _old_index_spec(name: str, raw: str) -> str:
    """An old variable's value as ``k=v,...`` of MSA_INDEX_KERNEL (warned once per variable)."""
    names = _OLD_INDEX_ENV[name]
    vals = [x.strip() for x in raw.split(",")]
    if len(vals) != len(names):
        raise KernelConfigError(name, raw, f"{len(names)} comma-separated values ({','.join(names)})")
    spec = ",".join(f"{k}={v}" for k, v in zip(names, vals))
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name}={raw} is deprecated and goes in the next release: use "
                      f"MSA_INDEX_KERNEL=\"{spec}\"", DeprecationWarning, stacklevel=3)
    return spec


def index_env_overrides(include_tiles: bool = True) -> str:
    """The index-kernel overrides of this process as one ``k=v,...`` spec: the deprecated
    variables first (``include_tiles=False``: only MSA_INDEX_FP8, as the interpreter always
    read it), then ``MSA_INDEX_KERNEL`` (which wins)."""
    parts = []
    for name in _OLD_INDEX_ENV:
        raw = os.environ.get(name)
        if not raw or (not include_tiles and name != "MSA_INDEX_FP8"):
            continue
        if name == "MSA_INDEX_FP8" and raw != "1":
            continue  # old meaning: only "1" turned it on
        if name == "MSA_INDEX_LAZY_TOPK" and raw != "0":
            continue  # old meaning: only "0" turned it off
        parts.append(_old_index_spec(name, raw))
    new = os.environ.get(IndexConfig.ENV, "")
    if new and include_tiles:
        parts.append(new)
    elif new:  # interpreter: only the FP8 switch of the new variable, as of the old one
        fp8 = [it for it in new.split(",") if it.partition("=")[0].strip() == "fp8_prefill"]
        IndexConfig.from_spec(new, source=IndexConfig.ENV)  # still checked
        parts.extend(fp8)
    return ",".join(parts)


__all__ = ["FWD_IMPLS", "IndexConfig", "KernelConfig", "KernelConfigError", "MAIN_IMPLS", "default_config",
           "index_env_overrides"]

"""Selections the benchmark runs the sparse kernels on, and their measured locality.

Kinds (``msa-bench --selections``; every row records its kind and measured U8):

* ``random``: own block + K-1 distinct uniform earlier blocks per (query, group): the
  locality-free worst case (U8 ~ 100 at 128K).
* ``flex``: FlexAttention's per-128-query-tile pattern (every query of a tile shares the
  tile's blocks, all groups alike): the U8 = K limit; exactly what ``flex-blocksparse`` runs.
* ``trained``: the churn/pool generator (:mod:`msa_megatron.selection_stats`) with the
  parameters fitted to a trained model's recorded selections: the artifact
  ``$MSA_TRAINED_SELECTION`` (a ``selections_*.npz`` or ``selection_stats.json`` written by
  ``scripts/selection_stats.py``), else the committed ``docs/selections/selections_32K.npz``.
  Without either the rows are skipped, saying so.
* ``pool:C``: every 128-query tile draws C candidate blocks, each query picks its K-1 from
  them (r = 1): U8 grows with C from K (C = K-1) towards random.
* ``churn:R,C``: the generator with replacement probability R per position and pool C.

U8 = mean number of distinct blocks selected by 8 consecutive positions of one group
(aligned windows), the quantity the union-tile kernel's cost is linear in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .. import selection_stats as ss
from .registry import Case, Skip

#: Committed artifact (written by scripts/selection_stats.py, copied into docs/selections/).
DEFAULT_ARTIFACT = Path(__file__).resolve().parents[2] / "docs" / "selections" / "selections_32K.npz"

_CACHE: Dict[Tuple, torch.Tensor] = {}
_U8: Dict[Tuple, float] = {}


def parse_kind(kind: str) -> Tuple[str, Tuple[float, ...]]:
    """'pool:24' -> ('pool', (24.0,)); one clear error for anything else."""
    name, _, arg = kind.partition(":")
    try:
        if name in ("random", "flex", "trained") and not arg:
            return name, ()
        if name == "pool" and arg:
            c = float(arg)
            if c >= 1:
                return name, (c,)
        if name == "churn" and arg:
            r, c = (float(x) for x in arg.split(","))
            if 0 <= r <= 1 and c >= 1:
                return name, (r, c)
    except ValueError:
        pass
    raise ValueError(f"selection kind {kind!r} is invalid: allowed values are random, flex, trained, pool:C (C >= 1), "
                     "churn:R,C (0 <= R <= 1, C >= 1)")


def trained_params(case: Case) -> Tuple[ss.ChurnPool, str]:
    """The fitted churn/pool parameters and where they came from (Skip when unavailable)."""
    src = os.environ.get("MSA_TRAINED_SELECTION") or (str(DEFAULT_ARTIFACT) if DEFAULT_ARTIFACT.is_file() else "")
    if not src:
        raise Skip("no trained-selection artifact (run scripts/selection_stats.py; set MSA_TRAINED_SELECTION or "
                   f"commit {DEFAULT_ARTIFACT.relative_to(DEFAULT_ARTIFACT.parents[2])})")
    path = Path(src)
    if not path.is_file():
        raise Skip(f"MSA_TRAINED_SELECTION={src} does not exist")
    if path.suffix == ".json":
        meta = json.loads(path.read_text())
        fit, block, topk = meta["fit"]["params"], meta["block_size"], meta["topk"]
    else:
        _, meta = ss.load_artifact(path)
        fit, block, topk = meta["fit"], meta["block_size"], meta["topk"]
    if (block, topk) != (case.block, case.topk):
        raise Skip(f"trained selection was recorded at block {block} top-{topk}, the case is block {case.block} "
                   f"top-{case.topk}")
    return ss.ChurnPool(**fit), path.name


def make_selection(case: Case) -> torch.Tensor:
    """block_idx [batch, hkv, L, topk] int32 on case.device for ``case.selection`` (cached)."""
    key = (case.selection, case.L, case.batch, case.hkv, case.block, case.topk, case.seed, str(case.device))
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()  # one selection alive at a time: at 1M each is 256 MB
    name, args = parse_kind(case.selection)
    gen_kw = dict(batch=case.batch, groups=case.hkv, seed=case.seed, device=case.device)
    if name == "random":
        from .impls_main import random_token_selection

        sel = random_token_selection(case)
    elif name == "flex":
        from .impls_main import tile_token_selection

        sel = tile_token_selection(case)
    elif name == "trained":
        params, _ = trained_params(case)
        sel = ss.churn_pool_selection(case.L, case.block, case.topk, params, **gen_kw)
    elif name == "pool":
        sel = ss.churn_pool_selection(case.L, case.block, case.topk, ss.ChurnPool(1.0, args[0]), **gen_kw)
    else:
        sel = ss.churn_pool_selection(case.L, case.block, case.topk, ss.ChurnPool(args[0], args[1]), **gen_kw)
    _CACHE[key] = sel
    return sel


def measured_u8(case: Case, sel: Optional[torch.Tensor] = None) -> float:
    """Mean U8 of the case's selection (computed once per case)."""
    key = (case.selection, case.L, case.batch, case.hkv, case.block, case.topk, case.seed)
    if key not in _U8:
        sel = make_selection(case) if sel is None else sel
        _U8[key] = float(ss.union_sizes(sel, 8).double().mean())
    return _U8[key]


def describe(case: Case) -> str:
    name, _ = parse_kind(case.selection)
    if name == "trained":
        params, src = trained_params(case)
        sticky = f", sticky={params.sticky:g}" if params.sticky else ""
        return f"trained (churn/pool r={params.r:.3g}, C={params.pool:g}{sticky} from {src})"
    return case.selection


__all__ = ["DEFAULT_ARTIFACT", "describe", "make_selection", "measured_u8", "parse_kind", "trained_params"]

"""How local are MSA's block selections? Union sizes, a compact artifact, a fitted generator.

Why: the union-tile main kernel (issue 17, ../shared/kernel_study.md section 6) costs in
proportion to the number of *distinct* key blocks that W consecutive query positions of one
KV group select (its "union"). Random selections give the worst case (U8 ~ 100 at 128K);
what a trained indexer does decides which kernel wins. This module

* measures ``U_W`` (W = 8, 32, 128) from ``block_idx`` tensors (:func:`union_sizes`,
  :func:`union_summary`),
* stores a recorded selection compactly (:func:`save_artifact` / :func:`load_artifact`:
  int16, compressed npz, a few MB at 32K),
* generates selections with a given locality at any length (:func:`churn_pool_selection`)
  and fits its two parameters to measured union sizes (:func:`fit_churn_pool`).

The generator ("churn/pool", study section 6.2). Positions are grouped into tiles of
``tile`` positions (default 128: one key block of the paper layout, so the own block is
constant in a tile). Every tile draws a candidate pool of ~C earlier blocks (with
replacement); each of the K - 1 free slots draws from it at the tile's first position, then
keeps the previous position's block, or with probability ``r`` draws again; a fraction
``sticky`` of the slots never churns inside a tile (sinks, recent blocks). r = 0 (or
C = K - 1) is Flex's tile-constant pattern; r = 1 and a large C approach random selection. The own block is always selected (``local_blocks = 1``, ``init_blocks = 0``,
as the model's default); a query that sees at most K blocks selects all of them, as the
real selector does. Slot j only ever holds blocks with id = j (mod K - 1), so the picks of
one query are distinct by construction (no dedupe pass, exactly K - 1 + 1 blocks).

Windows for ``U_W`` are aligned (positions [W i, W (i + 1)) for each (batch, group)), as a
kernel tile would be; a trailing partial window is dropped.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: Window sizes (consecutive query positions of one KV group) whose union we report.
WINDOWS = (8, 32, 128)

#: Artifact format version (bump when the layout of the npz changes).
ARTIFACT_VERSION = 1


# ----------------------------------------------------------------------------- union sizes
def union_sizes(block_idx: Tensor, window: int) -> Tensor:
    """Distinct selected blocks per aligned window of ``window`` positions.

    ``block_idx`` [b, g, s, K] (any int dtype, -1 = unused slot) -> [b, g, s // window]
    int64 counts. Runs on the tensor's device, chunked over windows to bound memory."""
    if block_idx.dim() != 4:
        raise ValueError(f"block_idx must be [b, g, s, K], got shape {tuple(block_idx.shape)}")
    if window < 1:
        raise ValueError(f"window={window} is invalid: allowed values are integers >= 1")
    b, g, s, k = block_idx.shape
    n = s // window
    out = torch.empty(b, g, n, dtype=torch.int64, device=block_idx.device)
    if n == 0:
        return out
    x = block_idx[:, :, : n * window].reshape(b, g, n, window * k)
    step = max(1, (1 << 22) // max(1, b * g * window * k))  # ~4M elements per chunk
    for a in range(0, n, step):
        xs = torch.sort(x[:, :, a:a + step].long(), dim=-1).values
        valid = xs >= 0
        new = torch.ones_like(valid)
        new[..., 1:] = xs[..., 1:] != xs[..., :-1]
        out[:, :, a:a + step] = (valid & new).sum(-1)
    return out


def _mean_p90(x: Tensor) -> Dict[str, float]:
    x = x.reshape(-1).double()
    if x.numel() == 0:
        return {"mean": float("nan"), "p90": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "p90": float(torch.quantile(x.cpu(), 0.9)), "n": int(x.numel())}


def union_summary(block_idx: Tensor, windows: Sequence[int] = WINDOWS, per_group: bool = True) -> Dict:
    """{"U8": {"mean", "p90", "n"}, ..., "groups": {"U8": [mean per group], ...}} over all
    batches, groups and full windows of ``block_idx`` [b, g, s, K]."""
    out: Dict = {}
    groups: Dict[str, List[float]] = {}
    for w in windows:
        u = union_sizes(block_idx, w)
        out[f"U{w}"] = _mean_p90(u)
        if per_group:
            groups[f"U{w}"] = [float(v) for v in u.double().mean(dim=(0, 2)).cpu()] if u.numel() else []
    if per_group:
        out["groups"] = groups
    return out


def selection_overlap(a: Tensor, b: Tensor) -> Dict[str, float]:
    """Agreement of two selections [..., K] of the same queries: ``blocks`` = fraction of
    a's valid selected blocks that b also selects; ``rows`` = fraction of rows with the
    same set. Chunked over rows (K x K comparisons per row)."""
    if a.shape != b.shape:
        raise ValueError(f"selections differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    k = a.shape[-1]
    a2, b2 = a.reshape(-1, k).long(), b.reshape(-1, k).long()
    hit = total = same = 0
    step = max(1, (1 << 22) // (k * k))
    for i in range(0, a2.shape[0], step):
        x, y = a2[i:i + step], b2[i:i + step]
        valid = x >= 0
        found = ((x[:, :, None] == y[:, None, :]) & valid[:, :, None]).any(-1)
        hit += int(found.sum())
        total += int(valid.sum())
        same += int((torch.sort(x, -1).values == torch.sort(y, -1).values).all(-1).sum())
    return {"blocks": hit / max(total, 1), "rows": same / max(a2.shape[0], 1)}


# ----------------------------------------------------------------------------- generator
@dataclass(frozen=True)
class ChurnPool:
    """Parameters of the churn/pool generator (module docstring)."""

    r: float
    pool: float
    tile: int = 128
    #: Fraction of the K - 1 free slots that never churn inside a tile (sinks, recent blocks):
    #: they draw once at the tile's start. 0 = every slot churns with probability r.
    sticky: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r={self.r} is invalid: allowed values are 0 <= r <= 1")
        if not 0.0 <= self.sticky <= 1.0:
            raise ValueError(f"sticky={self.sticky} is invalid: allowed values are 0 <= sticky <= 1")
        if self.pool < 1:
            raise ValueError(f"pool={self.pool} is invalid: allowed values are >= 1 (it is raised to K - 1 if smaller)")
        if self.tile < 1:
            raise ValueError(f"tile={self.tile} is invalid: allowed values are integers >= 1")


def churn_pool_selection(seq_len: int, block_size: int, topk: int, params: ChurnPool, batch: int = 1,
                         groups: int = 1, seed: int = 0, device="cpu") -> Tensor:
    """A synthetic causal selection [batch, groups, seq_len, topk] int32 (ascending, -1 for
    unused slots) with the locality of ``params``; vectorised (no loop over positions)."""
    if topk < 2:
        raise ValueError(f"topk={topk} is invalid for the churn/pool generator: allowed values are >= 2")
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    i64 = dict(dtype=torch.int64, device=dev)
    m = topk - 1  # free slots (the own block is forced)
    n = batch * groups
    t = torch.arange(seq_len, **i64)
    own = t // block_size  # [S]
    tiles = (seq_len + params.tile - 1) // params.tile
    tile_of = t // params.tile
    # per-slot pool sizes: C spread over the m slots (at least one candidate per slot)
    c = max(float(params.pool), float(m))
    base, extra = int(c // m), int(round(c - m * int(c // m)))
    cj = torch.full((m,), base, **i64)
    cj[:extra] += 1
    cmax = int(base + (extra > 0))
    # pool[tile, slot, i]: a block id = slot (mod m) below the tile's first own block (drawn
    # with replacement, so small classes repeat candidates)
    own_tile = (torch.arange(tiles, **i64) * params.tile) // block_size  # [T]
    slot = torch.arange(m, **i64)
    count = torch.clamp((own_tile[:, None] - slot[None, :] + m - 1) // m, min=1)  # ids j, j+m, ... < own
    u = torch.rand(n, tiles, m, cmax, generator=gen, device=dev)
    pool = slot[None, None, :, None] + m * (u * count[None, :, :, None]).long()  # [n, T, m, cmax]
    # churn events: slot j draws a new pool block at t with probability r; always at the first
    # position of a tile (a new pool) and where the query first sees more than topk blocks
    first = topk * block_size  # first query with own >= topk (visible blocks > topk)
    ev = torch.rand(n, seq_len, m, generator=gen, device=dev) < params.r
    ev[:, :, : int(round(params.sticky * m))] = False  # sticky slots: only the forced draws below
    ev[:, : first + 1] = True
    ev[:, ::params.tile] = True
    last = torch.cummax(torch.where(ev, t[None, :, None], torch.zeros((), **i64)), dim=1).values
    pick = (torch.rand(n, seq_len, m, generator=gen, device=dev) * cj[None, None, :]).long()  # which pool entry
    flat = (tile_of[:, None] * m + slot[None, :]) * cmax  # [S, m] offsets into the flat pool
    cand = torch.gather(pool.reshape(n, -1), 1, (flat[None] + pick).reshape(n, -1)).view(n, seq_len, m)
    del ev, pick, pool
    val = torch.gather(cand, 1, last)  # the block drawn at the last event
    sel = torch.cat([val, own[None, :, None].expand(n, seq_len, 1)], dim=-1)
    # early queries (own + 1 <= topk): all visible blocks, -1 padded
    n_early = min(first, seq_len)
    if n_early:
        ids = torch.arange(topk, **i64)[None, :]
        sel[:, :n_early] = torch.where(ids <= own[:n_early, None], ids, torch.full_like(ids, -1))[None]
    big = 1 << 40
    sel = torch.sort(torch.where(sel < 0, torch.full_like(sel, big), sel), dim=-1).values
    sel = torch.where(sel == big, torch.full_like(sel, -1), sel)
    return sel.view(batch, groups, seq_len, topk).to(torch.int32)


def tile_shared_selection(seq_len: int, block_size: int, topk: int, batch: int = 1, groups: int = 1,
                          seed: int = 0, device="cpu", tile: int = 128) -> Tensor:
    """Flex's per-tile pattern: every query of a ``tile``-position tile selects the same
    blocks (its own + K - 1 earlier ones): churn/pool with r = 0 and a pool of K - 1."""
    return churn_pool_selection(seq_len, block_size, topk, ChurnPool(0.0, topk - 1, tile), batch, groups, seed, device)


def random_selection(seq_len: int, block_size: int, topk: int, batch: int = 1, groups: int = 1, seed: int = 0,
                     device="cpu") -> Tensor:
    """Locality-free worst case: own block + K - 1 distinct uniform earlier blocks per query."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    own = torch.arange(seq_len) // block_size
    nb = int(own[-1]) + 1 if seq_len else 0
    scores = torch.rand(batch * groups, seq_len, max(nb, 1), generator=gen) if seq_len * nb <= (1 << 26) else None
    if scores is None:  # long sequences: chunk over positions
        parts = []
        step = max(1, (1 << 26) // max(nb, 1))
        for a in range(0, seq_len, step):
            parts.append(_random_rows(torch.rand(batch * groups, min(step, seq_len - a), nb, generator=gen),
                                      own[a:a + step], topk))
        sel = torch.cat(parts, dim=1)
    else:
        sel = _random_rows(scores, own, topk)
    return sel.view(batch, groups, seq_len, topk).to(torch.int32).to(device)


def _random_rows(scores: Tensor, own: Tensor, topk: int) -> Tensor:
    nb = scores.shape[-1]
    blk = torch.arange(nb)
    s = scores.masked_fill(blk[None, None, :] > own[None, :, None], -1.0)
    s = s.masked_fill(blk[None, None, :] == own[None, :, None], 2.0)
    k = min(topk, nb)
    top = torch.topk(s, k, dim=-1)
    sel = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, 1 << 40))
    sel = torch.sort(sel, -1).values
    sel = torch.where(sel == (1 << 40), torch.full_like(sel, -1), sel)
    if k < topk:
        sel = torch.nn.functional.pad(sel, (0, topk - k), value=-1)
    return sel


# ----------------------------------------------------------------------------- fitting
#: Pool sizes tried by the fit, in units of the K - 1 free slots (1 = tile-constant).
DEFAULT_POOL_GRID = (1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 256.0)


def _log_err(u: Dict[str, float], target: Dict[str, float]) -> float:
    return sum(math.log(max(u[k], 1e-9) / max(target[k], 1e-9)) ** 2 for k in target)


def generator_unions(params: ChurnPool, seq_len: int, block_size: int, topk: int, sequences: int = 4,
                     seed: int = 0, windows: Sequence[int] = WINDOWS, device="cpu") -> Dict[str, float]:
    """Mean U_W of the generator at this length (``sequences`` independent groups)."""
    sel = churn_pool_selection(seq_len, block_size, topk, params, 1, sequences, seed, device)
    return {f"U{w}": float(union_sizes(sel, w).double().mean()) for w in windows}


#: Sticky fractions tried by the fit.
DEFAULT_STICKY_GRID = (0.0, 0.25, 0.5, 0.75)


def fit_churn_pool(target: Dict[str, float], seq_len: int, block_size: int, topk: int, tile: int = 128,
                   sequences: int = 4, seed: int = 0, pool_grid: Iterable[float] = DEFAULT_POOL_GRID,
                   bisect_steps: int = 10, device="cpu", sticky_grid: Iterable[float] = DEFAULT_STICKY_GRID) -> Dict:
    """Fit (r, C, sticky) of the churn/pool generator to measured mean unions ``target`` =
    {"U8": .., "U32": .., "U128": ..} at ``seq_len`` by simulation.

    U8 grows monotonically with r at fixed (C, sticky), so for each pool size C (``pool_grid``
    times K - 1) and sticky fraction r is bisected to match the smallest window's union; the
    (C, sticky) whose fit has the least squared log error over all windows wins. Returns
    {"params", "fitted", "target", "rel_err", ...}."""
    keys = sorted((k for k in target if k.startswith("U")), key=lambda k: int(k[1:]))
    windows = [int(k[1:]) for k in keys]
    tgt = {k: float(target[k]) for k in keys}
    first = keys[0]
    best = None
    for st in sorted(set(float(x) for x in sticky_grid)):
        best = _fit_pools(tgt, keys, windows, first, seq_len, block_size, topk, tile, sequences, seed, pool_grid,
                          bisect_steps, device, st, best)
    e, p, u = best
    return {"params": asdict(p), "fitted": u, "target": tgt, "loss": e,
            "rel_err": {k: (u[k] - tgt[k]) / tgt[k] for k in keys}, "seq_len": seq_len,
            "block_size": block_size, "topk": topk, "sequences": sequences}


def _fit_pools(tgt, keys, windows, first, seq_len, block_size, topk, tile, sequences, seed, pool_grid, bisect_steps,
               device, sticky, best):
    def unions(r: float, c: float) -> Dict[str, float]:
        return generator_unions(ChurnPool(r, c, tile, sticky), seq_len, block_size, topk, sequences, seed, windows,
                                device)

    for c in sorted({round(float(f) * (topk - 1), 2) for f in pool_grid}):
        lo, hi = 0.0, 1.0
        u_hi = unions(hi, c)
        if u_hi[first] <= tgt[first]:  # even full churn is too local for this pool: r = 1
            cand = (1.0, u_hi)
        else:
            u_lo = unions(lo, c)
            cand = (lo, u_lo)
            if u_lo[first] < tgt[first]:
                for _ in range(bisect_steps):
                    mid = (lo + hi) / 2 if hi - lo > 0.02 else math.sqrt(max(lo, 1e-4) * hi)
                    u = unions(mid, c)
                    if u[first] < tgt[first]:
                        lo = mid
                    else:
                        hi = mid
                    if abs(u[first] - tgt[first]) < abs(cand[1][first] - tgt[first]):
                        cand = (mid, u)
        e = _log_err(cand[1], tgt)
        if best is None or e < best[0]:
            best = (e, ChurnPool(cand[0], c, tile, sticky), cand[1])
    return best


# ----------------------------------------------------------------------------- artifact
def save_artifact(path, selections: Dict[str, Tensor], meta: Dict) -> int:
    """Write recorded selections (name -> [g, s, K] or [b, g, s, K] int tensors, ids < 32768)
    as int16 into a compressed npz with a JSON ``meta`` entry; returns the file size in bytes."""
    arrays = {}
    for name, sel in selections.items():
        a = sel.detach().cpu()
        if a.numel() and int(a.max()) >= 32768:
            raise ValueError(f"selection {name!r} holds block ids >= 32768: int16 cannot store them")
        arrays[name] = a.to(torch.int16).numpy()
    meta = dict(meta, version=ARTIFACT_VERSION, names=sorted(arrays))
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def load_artifact(path) -> Tuple[Dict[str, Tensor], Dict]:
    """(name -> int32 tensor, meta) from :func:`save_artifact`'s file."""
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"{path}: artifact version {meta.get('version')} is not supported "
                             f"(allowed: {ARTIFACT_VERSION})")
        sels = {name: torch.from_numpy(z[name].astype(np.int32)) for name in meta["names"]}
    return sels, meta


__all__ = [
    "ARTIFACT_VERSION", "ChurnPool", "WINDOWS", "churn_pool_selection", "fit_churn_pool", "generator_unions",
    "load_artifact", "random_selection", "save_artifact", "selection_overlap", "tile_shared_selection",
    "union_sizes", "union_summary",
]

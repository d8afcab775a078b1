#!/usr/bin/env python
"""Selections of a trained MSA model: union sizes, a compact artifact, a fitted generator,
FP8-vs-bf16 selection agreement and attention-mass recall (issue 17, item 1).

    python scripts/selection_stats.py --run-dir RUN [--out $OUT] [--lengths 32K,128K] [--sequences 1]

Loads RUN's config.yaml and its latest checkpoint (weights only; one process, no model
parallelism), runs the model forward (no grad, mode msa, the run's precision) on held-out
sequences of the embedded corpus / the run's data at each length, and captures every MSA
layer's selection with a forward pre-hook on its core attention (the hook reads the layer's
index inputs and re-runs the same selection the op runs: ``msa_megatron.ops.msa_select``).
Writes to --out:

* ``selection_stats.json``: per (length, layer) U8/U32/U128 (mean, p90, per-group means),
  the all-layer means, the churn/pool generator fitted at the artifact length and its check
  at every length (``validation``), FP8 agreement and recall for --probe-layers;
* ``selections_<L>.npz``: the artifact (--artifact-layers' selections of one sequence at the
  artifact length, int16, compressed; meta holds the fit), loadable by
  ``msa_megatron.selection_stats.load_artifact`` and used by ``msa-bench --selection trained``;
* ``selection_stats.md``: the tables, also printed.

Success: the JSON exists, ``validation[*].ok`` is true at the artifact length (fitted U8/U32
within 15% of the measured), every file < 16 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from msa_megatron import selection_stats as ss  # noqa: E402


def parse_length(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_list(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()] if s else []


# ----------------------------------------------------------------------------- FP8 selection
def fp8_selection(iq, ik, msa_cfg, q_pos=None):
    """(block_idx, how): the FP8 (e4m3) index-score selection. CUDA: the Triton kernel's FP8
    path; elsewhere the reference on the same quantised inputs (``how`` says which)."""
    from msa_megatron.ops import naive
    from msa_megatron.ops import triton_index as ti

    note = ""
    if iq.is_cuda and hasattr(ti, "index_select_fp8"):
        try:
            return ti.index_select_fp8(iq, ik, msa_cfg, q_pos), "triton fp8 kernel"
        except Exception as exc:  # noqa: BLE001 - recorded in the output, the statistics go on
            note = f" (the triton fp8 kernel failed: {type(exc).__name__}: {str(exc)[:200]})"
            print(f"selection_stats: FP8 kernel failed, using the reference on fp8-quantised inputs{note}", flush=True)
    iq8, ik8 = ti.fp8_index_inputs(iq, ik)[:2]
    return naive.select(iq8.float(), ik8.float(), msa_cfg, q_pos), "reference on fp8-quantised inputs" + note


# ----------------------------------------------------------------------------- capture
def module_kwargs_get(kwargs, name):
    if name not in kwargs:
        raise RuntimeError(f"core attention called without {name!r} (positional or keyword)")
    return kwargs[name]


class Capture:
    """Forward pre-hooks on every MSA core attention: per layer, union sizes of the selection;
    the selections of the artifact layers; FP8 agreement / recall on the probe layers."""

    def __init__(self, args, artifact_layers: List[int], probe_layers: List[int]):
        self.args = args
        self.artifact_layers, self.probe_layers = set(artifact_layers), set(probe_layers)
        self.length = 0
        self.seq = 0
        self.unions: Dict[int, Dict[int, Dict[int, List[torch.Tensor]]]] = {}  # L -> layer -> W -> [b,g,n]
        self.recorded: Dict[str, torch.Tensor] = {}
        self.probes: Dict[int, Dict[int, Dict]] = {}  # L -> layer -> stats
        self.seconds = 0.0
        self.meta: Dict = {}

    def hook(self, module, args, kwargs):
        from msa_megatron.ops import naive
        from msa_megatron.ops import msa_select

        t0 = time.time()
        self._kwargs = kwargs
        iq = kwargs.get("index_query")
        ik = kwargs.get("index_key")
        if iq is None:
            if module._index_inputs is None:
                raise RuntimeError(f"layer {module.layer_index}: no index inputs at the core attention")
            iq, ik = module._index_inputs
        iq = iq.transpose(0, 1).contiguous()  # [b, s, g, di]
        ik = ik.transpose(0, 1).contiguous()  # [b, s, di]
        cfg = module.msa
        layer = module.layer_index
        block_idx = msa_select(iq, ik, cfg)  # [b, g, s, K], the op's own selection
        self.meta.setdefault("block_size", cfg.block_size)
        self.meta.setdefault("topk", cfg.topk)
        self.meta.setdefault("groups", int(block_idx.shape[1]))
        per_w = self.unions.setdefault(self.length, {}).setdefault(layer, {})
        for w in ss.WINDOWS:
            per_w.setdefault(w, []).append(ss.union_sizes(block_idx, w).cpu())
        if self.seq == 0 and self.length == self.args.artifact_length and layer in self.artifact_layers:
            self.recorded[f"layer{layer}"] = block_idx[0].to(torch.int16).cpu()
        if self.seq == 0 and layer in self.probe_layers:
            try:
                probe = self._probe(module, args, iq, ik, block_idx, cfg, naive)
            except Exception as exc:  # noqa: BLE001 - one failed probe must not lose the union statistics
                probe = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"selection_stats: probe of layer {layer} at L={self.length} failed: {probe['error']}", flush=True)
            self.probes.setdefault(self.length, {})[layer] = probe
        self.seconds += time.time() - t0

    def _probe(self, module, args, iq, ik, block_idx, cfg, naive) -> Dict:
        """FP8 vs bf16 agreement on the rows that choose (position >= topk * block_size) and
        attention-mass recall of both selections on --recall-queries sampled rows."""
        s = iq.shape[1]
        first = min(cfg.topk * cfg.block_size, s)
        out: Dict = {"choosing_rows": s - first}
        if s - first <= 0:
            out["note"] = "no query chooses (every query sees <= topk blocks)"
            return out
        sel8, how = fp8_selection(iq, ik, cfg)
        agree = ss.selection_overlap(block_idx[:, :, first:], sel8[:, :, first:])
        out.update(fp8_how=how, fp8_block_agreement=agree["blocks"], fp8_identical_rows=agree["rows"])
        query = args[0] if len(args) > 0 else module_kwargs_get(self._kwargs, "query")
        key = args[1] if len(args) > 1 else module_kwargs_get(self._kwargs, "key")
        q = query.transpose(0, 1)  # [b, s, hq, d]
        k = key.transpose(0, 1)  # [b, s, g, d]
        n = min(self.args.recall_queries, s - first)
        rows = torch.linspace(first, s - 1, n, device=q.device).round().long().unique()
        scale = module.softmax_scale
        rec = naive.selection_recall(q[:, rows], k, block_idx[:, :, rows], cfg.block_size, q_pos=rows,
                                         softmax_scale=scale)
        rec8 = naive.selection_recall(q[:, rows], k, sel8[:, :, rows], cfg.block_size, q_pos=rows,
                                          softmax_scale=scale)
        out.update(recall_queries=int(rows.numel()), recall_bf16=float(rec), recall_fp8=float(rec8),
                   index_dtype=str(iq.dtype))
        return out


# ----------------------------------------------------------------------------- model + data
def load_run(args):
    import yaml

    from msa_megatron.training.config import ConfigError, load_config

    run_dir = Path(args.run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"selection_stats: --run-dir {run_dir} has no config.yaml (an msa-train run directory)")
    cfg = load_config(yaml.safe_load(cfg_path.read_text()))
    if cfg.attention.type != "msa":
        raise SystemExit(f"selection_stats: the run's attention.type is {cfg.attention.type!r}: allowed value is 'msa'")
    try:
        cfg = dataclasses.replace(
            cfg,
            run_dir=str(run_dir),  # the directory may have moved since training
            train=dataclasses.replace(cfg.train, seq_length=max(args.lengths)),
            parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, cp=1, ep=1, sp=False,
                                         overlap_grad_reduce=False, overlap_param_gather=False),
            data=dataclasses.replace(cfg.data, index_cache_dir=args.cache_dir, num_workers=0),
        )
    except ConfigError as e:
        raise SystemExit(f"selection_stats: {e}")
    return cfg


def build(cfg, args):
    from msa_megatron.megatron.modes import set_attention_mode
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed
    from msa_megatron.training.checkpoint import CheckpointManager, resolve_checkpoint
    from msa_megatron.training.data import ensure_dataset_helpers, resolve_sources
    from msa_megatron.training.model import build_model, make_transformer_config

    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = init_distributed(ParallelLayout(1, 1, 1, 1, False), seed=cfg.train.seed)
    ensure_dataset_helpers()
    sources = resolve_sources(cfg)
    tf_config = make_transformer_config(cfg)
    model = build_model(cfg, tf_config, sources.vocab_size)
    ckpt = CheckpointManager(cfg)
    path = resolve_checkpoint(args.checkpoint) if args.checkpoint else ckpt.latest()
    if path is None:
        raise SystemExit(f"selection_stats: {cfg.run_dir}/checkpoints has no complete checkpoint (pass --checkpoint)")
    ckpt.load_weights(Path(path), model)
    model[0].eval()
    n = set_attention_mode(model, "msa")
    if n == 0:
        raise SystemExit("selection_stats: the model has no MSA layer")
    return model[0], sources, device, str(path)


def held_out_sequences(cfg, sources, length: int, count: int):
    """``count`` held-out (validation split) samples of ``length`` tokens (tokens, position_ids)."""
    from msa_megatron.training.data import build_datasets

    cfg_l = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_length=length))
    _, valid = build_datasets(cfg_l, sources, 1, count)
    if valid is None:
        raise SystemExit(f"selection_stats: data.split {cfg.data.split!r} has no validation part: allowed values give "
                         "the second field > 0")
    out = []
    for i in range(count):
        sample = valid[i]
        out.append((torch.as_tensor(sample["tokens"]).long(), torch.as_tensor(sample["position_ids"]).long()))
    return out, len(valid)


# ----------------------------------------------------------------------------- report
def summarize(cap: Capture) -> Dict:
    per: Dict = {}
    for length, layers in sorted(cap.unions.items()):
        rows = {}
        all_layers = {w: [] for w in ss.WINDOWS}
        for layer, per_w in sorted(layers.items()):
            row = {}
            for w, parts in per_w.items():
                u = torch.cat(parts, dim=0)  # [sequences * b, g, n]
                all_layers[w].append(u.reshape(-1))
                stats = ss._mean_p90(u)
                stats["groups"] = [float(v) for v in u.double().mean(dim=(0, 2))]
                row[f"U{w}"] = stats
            rows[str(layer)] = row
        mean = {f"U{w}": ss._mean_p90(torch.cat(v)) for w, v in all_layers.items() if v}
        per[str(length)] = {"layers": rows, "all_layers": mean}
    return per


def markdown(result: Dict) -> str:
    lines = [f"# MSA selection statistics ({result['date']}, {result['device']}, commit {result['commit']})", "",
             f"run {result['run_dir']}, checkpoint {result['checkpoint']}; block {result['block_size']}, top-"
             f"{result['topk']}, {result['groups']} groups/layer; {result['sequences']} held-out sequence(s) per length",
             "", "| L | layer | U8 mean | U8 p90 | U32 mean | U32 p90 | U128 mean | U128 p90 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for length, block in result["unions"].items():
        items = list(block["layers"].items()) + [("all", block["all_layers"])]
        for layer, row in items:
            cells = " | ".join(f"{row[k]['mean']:.1f} | {row[k]['p90']:.0f}" for k in ("U8", "U32", "U128"))
            lines.append(f"| {length} | {layer} | {cells} |")
    fit = result.get("fit")
    if fit:
        p = fit["params"]
        lines += ["", f"Fitted churn/pool generator at L={fit['seq_len']}: r = {p['r']:.4f}, pool C = {p['pool']:g}, "
                      f"sticky {p.get('sticky', 0.0):g}, tile {p['tile']}", "", "| L | measured U8/U32/U128 | generator U8/U32/U128 | rel err U8/U32 | ok |",
                  "|---|---|---|---|---|"]
        for v in result.get("validation", []):
            m, g = v["measured"], v["generated"]
            lines.append(f"| {v['seq_len']} | {m['U8']:.1f} / {m['U32']:.1f} / {m['U128']:.1f} | "
                         f"{g['U8']:.1f} / {g['U32']:.1f} / {g['U128']:.1f} | "
                         f"{100 * v['rel_err']['U8']:+.1f}% / {100 * v['rel_err']['U32']:+.1f}% | {v['ok']} |")
    if result.get("probes"):
        lines += ["", "| L | layer | FP8 block agreement | FP8 identical rows | recall bf16 | recall FP8 | FP8 path |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for length, layers in result["probes"].items():
            for layer, p in layers.items():
                if "recall_fp8" not in p:
                    lines.append(f"| {length} | {layer} | n/a: {p.get('note', p.get('error', ''))} | | | | |")
                    continue
                lines.append(f"| {length} | {layer} | {100 * p['fp8_block_agreement']:.2f}% | "
                             f"{100 * p['fp8_identical_rows']:.1f}% | {100 * p['recall_bf16']:.2f}% | "
                             f"{100 * p['recall_fp8']:.2f}% | {p['fp8_how']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's latest)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default $OUT)")
    p.add_argument("--lengths", default="32K,128K")
    p.add_argument("--sequences", type=int, default=1, help="held-out sequences per length")
    p.add_argument("--artifact-length", default=None, help="length recorded in the artifact (default: the first)")
    p.add_argument("--artifact-layers", default=None, help="0-based layers to record (default: first and last MSA)")
    p.add_argument("--probe-layers", default=None, help="layers for FP8 agreement / recall (default: as artifact)")
    p.add_argument("--recall-queries", type=int, default=512)
    p.add_argument("--fit-sequences", type=int, default=8)
    p.add_argument("--max-artifact-mb", type=float, default=4.0)
    p.add_argument("--cache-dir", default=None, help="dataset index cache (default: a temporary directory)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out (or $OUT) is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    args.artifact_length = parse_length(args.artifact_length) if args.artifact_length else args.lengths[0]
    if args.artifact_length not in args.lengths:
        p.error(f"--artifact-length {args.artifact_length} must be one of --lengths {args.lengths}")
    tmp = tempfile.TemporaryDirectory(prefix="selstats-")
    args.cache_dir = args.cache_dir or tmp.name

    t_start = time.time()
    cfg = load_run(args)
    msa = cfg.msa
    msa_layers = [i for i in range(cfg.model.num_layers) if msa.is_msa_layer(i)]
    art_layers = _int_list(args.artifact_layers) or sorted({msa_layers[0], msa_layers[-1]})
    probe_layers = _int_list(args.probe_layers) or art_layers
    model, sources, device, ckpt_path = build(cfg, args)
    from msa_megatron.megatron.modes import msa_core_attentions

    cap = Capture(args, art_layers, probe_layers)
    handles = [core.register_forward_pre_hook(cap.hook, with_kwargs=True) for core in msa_core_attentions(model)]
    data_info = {}
    forward_s = {}
    for length in args.lengths:
        seqs, n_valid = held_out_sequences(cfg, sources, length, args.sequences)
        data_info[str(length)] = {"valid_samples": n_valid}
        cap.length = length
        t0 = time.time()
        for i, (tokens, pos) in enumerate(seqs):
            cap.seq = i
            with torch.no_grad():
                model(tokens[None].to(device), pos[None].to(device), None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s[str(length)] = time.time() - t0
        print(f"L={length}: {len(seqs)} sequence(s) in {forward_s[str(length)]:.1f}s", flush=True)
    for h in handles:
        h.remove()

    unions = summarize(cap)
    m = cap.meta
    result: Dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "commit": _commit(), "run_dir": str(args.run_dir), "checkpoint": ckpt_path,
        "model": cfg.model.name, "precision": cfg.train.precision, "block_size": m["block_size"], "topk": m["topk"],
        "groups": m["groups"], "msa_layers": msa_layers, "sequences": args.sequences, "lengths": args.lengths,
        "windows": list(ss.WINDOWS), "window_alignment": "aligned windows per (sequence, group); partial tail dropped",
        "data": data_info, "forward_s": forward_s, "hook_s": cap.seconds, "unions": unions,
    }

    # generator: fit to the all-layer means at the artifact length, check at every length
    fit_device = "cuda" if device.type == "cuda" else "cpu"
    target = {k: v["mean"] for k, v in unions[str(args.artifact_length)]["all_layers"].items()}
    t0 = time.time()
    fit = ss.fit_churn_pool(target, args.artifact_length, m["block_size"], m["topk"], sequences=args.fit_sequences,
                            device=fit_device)
    result["fit"] = fit
    result["fit_s"] = time.time() - t0
    params = ss.ChurnPool(**fit["params"])
    result["validation"] = []
    for length in args.lengths:
        meas = {k: v["mean"] for k, v in unions[str(length)]["all_layers"].items()}
        gen = ss.generator_unions(params, length, m["block_size"], m["topk"], args.fit_sequences, seed=1,
                                  device=fit_device)
        rel = {k: (gen[k] - meas[k]) / meas[k] for k in meas}
        result["validation"].append({"seq_len": length, "measured": meas, "generated": gen, "rel_err": rel,
                                     "ok": abs(rel["U8"]) <= 0.15 and abs(rel["U32"]) <= 0.15})
    # per-layer fits (the spread across layers) at the artifact length
    per_layer = {}
    for layer, row in unions[str(args.artifact_length)]["layers"].items():
        f = ss.fit_churn_pool({k: row[k]["mean"] for k in ("U8", "U32", "U128")}, args.artifact_length,
                              m["block_size"], m["topk"], sequences=max(2, args.fit_sequences // 2), device=fit_device,
                              sticky_grid=(0.0, 0.5))
        per_layer[layer] = {"params": f["params"], "rel_err": f["rel_err"]}
    result["fit_per_layer"] = per_layer
    result["probes"] = {str(L): {str(k): v for k, v in d.items()} for L, d in cap.probes.items()}

    # artifact: drop groups (then layers) until it fits the budget
    meta = {"model": cfg.model.name, "run_dir": str(args.run_dir), "checkpoint": ckpt_path,
            "seq_len": args.artifact_length, "block_size": m["block_size"], "topk": m["topk"], "fit": fit["params"],
            "unions": target, "date": result["date"], "commit": result["commit"]}
    art = out / f"selections_{_fmt(args.artifact_length)}.npz"
    recorded = dict(cap.recorded)
    size = ss.save_artifact(art, recorded, meta)
    while size > args.max_artifact_mb * 2**20 and recorded:
        name, sel = max(recorded.items(), key=lambda kv: kv[1].shape[0])
        if sel.shape[0] > 1:
            recorded[name] = sel[: sel.shape[0] // 2]
        else:
            recorded.pop(name)
        size = ss.save_artifact(art, recorded, meta)
    result["artifact"] = {"path": art.name, "bytes": size, "selections": {k: list(v.shape) for k, v in recorded.items()}}
    result["total_s"] = time.time() - t_start
    (out / "selection_stats.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "selection_stats.md").write_text(md + "\n")
    print(md)
    big = [f.name for f in out.iterdir() if f.is_file() and f.stat().st_size > 16 * 2**20]
    if big:
        print(f"selection_stats: files over 16 MB: {big}", file=sys.stderr)
        return 1
    print(f"selection_stats: wrote {out}/selection_stats.json, {art.name} ({size / 2**20:.2f} MB) in "
          f"{result['total_s']:.0f}s")
    return 0


def _fmt(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)


def _commit() -> str:
    import subprocess

    if os.environ.get("MSA_COMMIT"):
        return os.environ["MSA_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=REPO)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""The training run: set-up, the step, evaluation, logging, checkpointing, shutdown.

Every moving part is Megatron-Core's: parallel_state (through init_distributed), the
forward-backward schedules (1F1B with PP), DDP + distributed optimizer, the LR scheduler,
dist_checkpointing, megatron.core.datasets, the microbatch calculator, MoE metrics. This
module only sequences them and decides what a step logs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..patches.mcore_019_index_grad_norm_group import INDEX_GRAD_NORM_GROUP
from .checkpoint import CheckpointError, CheckpointManager, prepare_writer_queue, shutdown_writer_queue
from .config import Config, ConfigError, UsageError, validate
from .corpus import read_meta
from .data import (build_datasets, describe_held_out, ensure_dataset_helpers, held_out_composition, make_loader,
                   packed_micro_batch, packing_format, resolve_sources, samples_needed)
from .hooks import MSASchedule
from .logging import RunLogger, format_summary, setup_python_logging, summarize
from .metrics import Throughput, memory_gb, peak_flops_per_device
from .model import build_model, count_parameters, make_transformer_config, padded_vocab_size
from .numerics import NonFiniteError, bad_msa_layers, check_step, inject_nan_grad
from .optim import BACKBONE_KEY, build_optimizer, build_scheduler, current_lr, param_groups
from .preemption import PreemptionFlag
from .rundir import LR_FIELDS, RunDirLock, config_changes, flatten, new_run_dir
from .step import BATCH_KEYS, forward_step, global_mean_loss, local_batch

log = logging.getLogger("msa_megatron.training")

#: Exit codes of :func:`run`.
EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 0


def _moe_track_names(cfg: Config) -> List[str]:
    kind = cfg.model.moe_router_load_balancing_type
    return {"aux_loss": ["load_balancing_loss"], "seq_aux_loss": ["seq_load_balancing_loss"],
            "global_aux_loss": ["global_load_balancing_loss"]}.get(kind, [])


#: Longest failure text :func:`one_line_error` keeps (torch's state-dict errors list every key).
ERROR_TEXT_MAX = 1500


def one_line_error(e: BaseException, limit: int = ERROR_TEXT_MAX) -> str:
    """``Type: message`` on one line (all of the message's lines joined, cut at ``limit``
    characters): a multi-line error such as torch's "Error(s) in loading state_dict" keeps the
    key names that follow its first line."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    if len(text) > limit:
        text = text[:limit] + f" ... ({len(text) - limit} more characters)"
    return f"{type(e).__name__}: {text}"


class Trainer:
    """One training run. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, config_yaml: str = "", run_suffix: str = ""):
        self.cfg = cfg
        self.config_yaml = config_yaml
        self.run_suffix = run_suffix
        self.lock = RunDirLock(cfg.run_dir or ".")

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.num_microbatches_calculator import get_num_microbatches, init_num_microbatches_calculator

        from ..megatron.parallel import ParallelLayout, init_distributed

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world)
        if cfg.train.requires_gpu and not torch.cuda.is_available():
            raise ConfigError("train.requires_gpu", True,
                              "false on a machine without a CUDA GPU (torch.cuda.is_available() is False): this preset "
                              "(train=gpu) is sized for one GPU; use train=cpu, or train.requires_gpu=false to run it "
                              "on the CPU anyway")
        setup_python_logging(int(os.environ.get("RANK", "0")), cfg.logging.level)  # before the CPU-compat notice
        prepare_writer_queue()
        p = cfg.parallel
        self.device = init_distributed(ParallelLayout(p.tp, p.pp, p.cp, p.ep, p.sp), seed=cfg.train.seed)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        setup_python_logging(self.rank, cfg.logging.level)
        if cfg.run_dir is None:  # a new directory (or checkpoint.resume=last), chosen once by rank 0
            box: Dict[str, Any] = {}
            self._agree(lambda: box.update(d=choose_run_dir(cfg, self.run_suffix)) if self.rank == 0 else None)
            cfg.run_dir = self._broadcast_obj(box.get("d"))
            self.lock = RunDirLock(cfg.run_dir)
        if self.config_yaml:
            self.config_yaml = _with_run_dir(self.config_yaml, cfg.run_dir)
        # one owner per run directory, before anything in it is written or swept
        self._agree(lambda: self.lock.acquire() if self.rank == 0 else None)
        if self.lock.stale:
            log.warning("run_dir %s: took over a stale lock (%s, no longer running)", cfg.run_dir, self.lock.stale)
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.ckpt = CheckpointManager(cfg)
        # a resumed run must be the run its checkpoints came from: compare before writing anything
        box = {}
        self._agree(lambda: box.update(c=self._resume_changes()) if self.rank == 0 else None)
        self.changes: Dict[str, Any] = self._broadcast_obj(box.get("c", {}))
        if self.rank == 0 and self.config_yaml:
            _write_text(os.path.join(cfg.run_dir, "config.yaml"), self.config_yaml)

        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        init_num_microbatches_calculator(self.rank, None, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                         self.dp_size, decrease_batch_size_if_needed=False)
        self.num_microbatches = get_num_microbatches()
        self.total_steps = cfg.total_steps()

        # ---- data sources first: the corpus is built (and the C++ helpers compiled, if
        # needed) by one rank per node while the others wait; a failure stops every rank
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self._agree(lambda: self._prepare_data(cfg) if first_on_node else None)
        self._agree(lambda: None if first_on_node else self._prepare_data(cfg))

        # ---- model, optimizer, scheduler
        self.tf_config = make_transformer_config(cfg)
        self.model = build_model(cfg, self.tf_config, self.sources.vocab_size)
        # resumed with a changed learning rate / schedule: build as saved (Megatron keys the
        # optimizer's param groups by lr), load, then apply the new values (_apply_changes)
        saved_cfg = _with_saved(cfg, self.changes, LR_FIELDS + ("train.steps", "train.tokens"))
        self.optimizer = build_optimizer(saved_cfg, self.model)
        self.scheduler = build_scheduler(saved_cfg, self.optimizer)
        self.tf_config.grad_scale_func = self.optimizer.scale_loss
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.no_sync_func = self.model[0].no_sync
        if cfg.parallel.overlap_param_gather:
            self.tf_config.param_sync_func = self.model[0].start_param_sync
        self.params = count_parameters(cfg, self.model)

        # ---- state: resume / load / init / fresh
        self.state: Dict[str, Any] = {"consumed_train_samples": 0, "tokens": 0, "skipped_steps": 0, "wandb_id": None}
        self.start_step = 0
        while True:  # a resume whose load fails falls back to the next older checkpoint
            kind, path = self.ckpt.resume_source()
            if kind not in ("resume", "load"):
                break
            load_opt = kind == "resume" or cfg.checkpoint.load_optimizer
            box: Dict[str, Any] = {}
            failure = self._outcome(lambda: box.update(saved=self.ckpt.load(
                path, self.model, self.optimizer, self.scheduler, load_optimizer=load_opt)))
            if failure is None:
                saved = box["saved"]
                if kind == "resume":
                    self.ckpt.commit(path)
                break
            if kind == "load":
                raise CheckpointError("checkpoint.load", cfg.checkpoint.load, f"{path.name} failed to load: {failure}")
            self.ckpt.reject(path, f"failed to load: {failure}")
        if kind in ("resume", "load"):
            if load_opt:
                self.start_step = int(saved["step"])
                for key in self.state:
                    self.state[key] = saved.get(key, self.state[key])
            else:
                self.optimizer.reload_model_params()  # main (fp32) params <- the loaded weights
            self.resumed_from = f"{kind} {path} (step {saved['step']}{'' if load_opt else ', weights only'})"
        elif kind == "init":
            self.ckpt.load_weights(path, self.model)
            self.optimizer.reload_model_params()  # main (fp32) params <- the loaded weights
            self.resumed_from = f"weights from {path} (step 0, fresh optimizer)"
        else:
            self.resumed_from = "fresh start"
        if kind != "resume":
            self.state["wandb_id"] = None
        self._apply_changes(kind)

        # ---- data
        train_samples, valid_samples = samples_needed(cfg)
        self.train_ds, self.valid_ds = build_datasets(cfg, self.sources, train_samples, valid_samples)
        self._setup_assoc_recall()
        self._setup_passkey()
        self.train_iter = iter(make_loader(self.train_ds, self.state["consumed_train_samples"], cfg, self.dp_rank, self.dp_size))

        # ---- schedules, metrics, sinks
        self.schedule = MSASchedule(cfg)
        self.peak, self.peak_source = peak_flops_per_device(cfg)
        self.throughput = Throughput(cfg, self.params.active_matmul, self.world, self.peak)
        self.preempt = PreemptionFlag()
        self.logger = RunLogger(cfg, self.rank == 0, self.start_step, self.total_steps, self.state["wandb_id"])
        self.state["wandb_id"] = self._broadcast_obj(self.logger.wandb_id)
        self._announce()

    def _resume_changes(self) -> Dict[str, Any]:
        """Rank 0: {field: (old, new)} that may change on a resume of this run directory;
        any other difference from its config.yaml is one UsageError listing them all."""
        import yaml

        cfg = self.cfg
        if not self.ckpt.candidates():
            return {}
        if cfg.checkpoint.resume == "never":  # refused before config.yaml is rewritten
            self.ckpt.resume_source()
        path = os.path.join(cfg.run_dir, "config.yaml")
        if not os.path.isfile(path):
            log.warning("run_dir %s holds checkpoints but no config.yaml: the configuration is not compared", cfg.run_dir)
            return {}
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        current = yaml.safe_load(self.config_yaml) if self.config_yaml else cfg.to_dict()
        refused, allowed = config_changes(saved, current, flatten(Config().to_dict()))
        if refused:
            raise UsageError("run_dir", cfg.run_dir,
                             f"resuming it with a configuration that differs from its config.yaml in {len(refused)} "
                             f"field(s) that define the run: {'; '.join(refused)}. Resume with the same values, or "
                             "start a new run (no run_dir) with checkpoint.load=" + os.path.join(cfg.run_dir, "checkpoints")
                             + " to continue its weights under the new configuration")
        return allowed

    def _apply_changes(self, kind: str) -> None:
        """Resumed with allowed changes: say what changed; LR fields go into the restored
        scheduler (which otherwise continues exactly as saved, also when train.steps grew)."""
        if not self.changes or kind != "resume":
            return
        cfg, sch = self.cfg, self.scheduler
        listed = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in self.changes.items() if k != "run_dir")
        if listed and self.rank == 0:
            log.warning("resume: changed %s", listed)
        lr_changed = [k for k in self.changes if k in LR_FIELDS]
        if "train.lr" in self.changes:
            sch.max_lr = cfg.train.lr
        if "train.min_lr" in self.changes:
            sch.min_lr = cfg.train.min_lr
        if "train.lr_warmup_steps" in self.changes or "train.lr_warmup_fraction" in self.changes:
            sch.lr_warmup_steps = cfg.lr_warmup_steps()
        if "train.lr_decay_steps" in self.changes:
            sch.lr_decay_steps = cfg.lr_decay_steps()
        if "train.lr_decay_style" in self.changes:
            sch.lr_decay_style = cfg.train.lr_decay_style
        if "train.lr_wsd_decay_steps" in self.changes:
            sch.wsd_decay_steps = cfg.train.lr_wsd_decay_steps
        if "train.lr_wsd_decay_style" in self.changes:
            sch.lr_wsd_decay_style = cfg.train.lr_wsd_decay_style
        if "train.weight_decay" in self.changes:
            sch.start_wd = sch.end_wd = cfg.train.weight_decay
        for group in param_groups(self.optimizer):  # Megatron's groups carry their own max/min lr
            for key, name in (("max_lr", "train.lr"), ("min_lr", "train.min_lr")):
                if name in self.changes and key in group:
                    old, new = self.changes[name]
                    group[key] = group[key] * new / old if old else new
        if lr_changed:
            sch.step(0)  # the new values take effect at the current step
        if self.rank == 0 and ("train.steps" in self.changes or "train.tokens" in self.changes) \
                and "train.lr_decay_steps" not in self.changes:
            log.warning("resume: the LR schedule continues as saved (warmup %d, %s decay over %d steps to min_lr %g, "
                        "then constant); set train.lr_decay_steps to decay over the new length", sch.lr_warmup_steps,
                        sch.lr_decay_style, sch.lr_decay_steps, sch.min_lr)

    def _setup_assoc_recall(self) -> None:
        """data.assoc_recall: associative-recall examples mixed into training; held-out batches of them."""
        import dataclasses

        from .assoc_recall_task import AssocRecallMix, eval_batches

        cfg, r = self.cfg, self.cfg.data.assoc_recall
        self.assoc_recall_batches = None
        if r.train_fraction <= 0 and r.eval_batches <= 0:
            return
        spec = cfg.assoc_recall_spec()
        if spec.value_range[1] > self.sources.vocab_size:
            raise ConfigError("data.assoc_recall.train_fraction", r.train_fraction,
                              f"0 with a vocabulary of {self.sources.vocab_size} tokens (the task uses token ids "
                              f"{spec.key_range[0]}..{spec.value_range[1] - 1}, byte-level)")
        if r.train_fraction > 0:
            self.train_ds = AssocRecallMix(self.train_ds, spec, r.train_fraction, cfg.train.seed, r.answer_loss_weight)
        if r.eval_batches > 0:
            self.assoc_recall_batches = eval_batches(dataclasses.replace(spec, seq_len=cfg.train.seq_length),
                                                     r.eval_batches, cfg.train.micro_batch_size, cfg.train.seed,
                                                     self.valid_ds)

    def _setup_passkey(self) -> None:
        """data.passkey: held-out batches of the passkey copy probe; mixed into training only
        when train_fraction > 0 (then the probe is a trained task)."""
        import dataclasses

        from ..experiments.passkey import make_example
        from .assoc_recall_task import AssocRecallMix, eval_batches

        k = self.cfg.data.passkey
        self.passkey_batches = None
        if k.train_fraction > 0:  # training samples are seq_length + 1 tokens
            spec = dataclasses.replace(self.cfg.passkey_spec(), seq_len=self.cfg.train.seq_length + 1)
            self.train_ds = AssocRecallMix(self.train_ds, spec, k.train_fraction, self.cfg.train.seed,
                                           k.answer_loss_weight, make=make_example)
        if k.eval_batches > 0:
            self.passkey_batches = eval_batches(self.cfg.passkey_spec(), k.eval_batches, self.cfg.train.micro_batch_size,
                                                self.cfg.train.seed + 1, self.valid_ds, make=make_example)

    def assoc_recall_accuracy(self) -> Dict[str, float]:
        """Held-out associative-recall accuracy (same batches every time)."""
        edges = list(self.cfg.data.assoc_recall.distance_buckets or [])
        return self._probe_accuracy("val_assoc_recall_acc", self.assoc_recall_batches, edges)

    def passkey_accuracy(self) -> Dict[str, float]:
        """Held-out passkey-probe accuracy per digit, overall and per distance bucket, and
        (sparse modes) how often MSA selected the block holding the digit to copy."""
        return self._probe_accuracy("val_passkey_acc", self.passkey_batches, list(self.cfg.data.passkey.distance_buckets),
                                    needle_key="val_passkey_needle")

    def _probe_accuracy(self, key: str, batches, edges: List[int], needle_key: Optional[str] = None) -> Dict[str, float]:
        """Accuracy of next-token argmax at a probe's answer positions (the same batches every
        time), with ``key/d<lo>_<hi>`` per distance bucket when ``edges``; the MSA statistics
        these passes record are discarded. ``needle_key``: also the needle selection
        (training/needle.py) under that key, per bucket and per layer, while MSA layers select
        (mode msa or msa_warmup) and the batches carry distances."""
        if not batches:
            return {}
        from ..megatron import (collect_msa_metrics, get_attention_modes, set_selection_capture,
                                set_selection_recall_sampling)
        from .assoc_recall_task import assoc_recall_accuracy_of_model
        from .needle import NeedleTally

        for chunk in self.model:
            chunk.eval()
        set_selection_recall_sampling(self.model, False)
        needle = None
        if needle_key and len(batches[0]) == 3 and any(m != "dense" for m in get_attention_modes(self.model)):
            from megatron.core import parallel_state as ps

            needle = NeedleTally(edges, ps.get_tensor_model_parallel_group())
        captured: list = []

        def tally(mask, distance) -> None:  # after each batch's forward: only counts outlive it
            needle.add(captured, mask, distance)
            captured.clear()

        if needle is not None:
            set_selection_capture(self.model, captured)
        try:
            acc = assoc_recall_accuracy_of_model(self.model[0], batches, self.device, self.sources.vocab_size,
                                                 edges or None, after_forward=tally if needle is not None else None)
        finally:
            set_selection_capture(self.model, None)
        buckets = {}
        if edges:  # issue 19: accuracy per query-to-pair distance bucket
            acc, per = acc
            buckets = {f"{key}/{k}": v for k, v in per.items() if v is not None}
        if needle is not None:
            buckets.update(needle.metrics(needle_key))
        collect_msa_metrics(reset=True)
        set_selection_recall_sampling(self.model, self.schedule._applied.selection_recall if self.schedule._applied else False)
        for chunk in self.model:
            chunk.train()
        return {key: acc, **buckets}

    def selection_recall_sweep(self) -> Dict[str, float]:
        """attention.recall_sweep: held-out selection recall of the trained model for each
        [block_size, topk]; main branch dense (msa_warmup), so the mass is measured on the
        model's own dense attention, selection by its trained indexer at that budget."""
        sweep = self.cfg.attention.recall_sweep
        if not sweep or self.valid_ds is None:
            return {}
        from ..megatron import collect_msa_metrics, set_attention_mode, set_selection_recall_sampling
        from ..megatron.modes import msa_core_attentions

        cores = list(msa_core_attentions(self.model))
        saved = [(c.msa, c.mode) for c in cores]
        out: Dict[str, float] = {}
        for chunk in self.model:
            chunk.eval()
        collect_msa_metrics(reset=True)
        try:
            for block, topk in sweep:
                for c in cores:
                    c.msa = c.msa.replace(block_size=int(block), topk=int(topk))
                set_attention_mode(self.model, "msa_warmup")
                set_selection_recall_sampling(self.model, True)
                it = iter(make_loader(self.valid_ds, 0, self.cfg, self.dp_rank, self.dp_size))
                try:
                    with torch.no_grad():
                        for _ in range(self.cfg.train.eval_iters):
                            self._forward_backward(it, True, self.num_microbatches)
                except (RuntimeError, ValueError) as e:  # e.g. a budget the kernels refuse: record, go on
                    self.logger.event(self.total_steps, "recall_sweep_failed", f"block {block} top-{topk}: "
                                      f"{type(e).__name__}: {e}")
                    log.error("selection-recall sweep block %s top-%s failed: %s", block, topk, e)
                    collect_msa_metrics(reset=True)
                    continue
                m = collect_msa_metrics(reset=True)
                if "recall" in m:
                    out[f"recall_sweep/B{block}_k{topk}"] = m["recall"]
        finally:
            for c, (msa, mode) in zip(cores, saved):
                c.msa, c.mode = msa, mode
            set_selection_recall_sampling(self.model, False)
            for chunk in self.model:
                chunk.train()
        return out

    def _prepare_data(self, cfg: Config) -> None:
        self.helpers = ensure_dataset_helpers()
        self.sources = resolve_sources(cfg)

    def _agree(self, fn) -> None:
        """Run ``fn`` here, then make every rank share the outcome: if it failed on any rank,
        raise on all of them (a ConfigError with its message) instead of leaving the others
        waiting in the next collective."""
        error = None
        try:
            fn()
        except ConfigError as e:
            error = ("config", e.path, e.value, e.allowed, isinstance(e, UsageError))
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = ("other", f"{type(e).__name__}: {e}")
            local = e
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return
        if error is not None and error[0] == "other":
            raise local
        if first[0] == "config":
            raise (UsageError if first[4] else ConfigError)(*first[1:4])
        raise RuntimeError(f"another rank failed during set-up: {first[1]}")

    def _outcome(self, fn) -> Optional[str]:
        """Run ``fn`` on every rank; None if it succeeded everywhere, else the first failure
        (one line, :func:`one_line_error`), the same on every rank."""
        error = None
        try:
            fn()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - reported, then the caller decides
            error = one_line_error(e)
        errors: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e is not None), None)

    def _broadcast_obj(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _document_names(self) -> Optional[List[str]]:
        """Each document's source file (the embedded corpus records them), else None."""
        if self.cfg.data.source != "corpus" or not self.sources.prefixes:
            return None
        return (read_meta(self.sources.prefixes[0]) or {}).get("files")

    def _announce(self) -> None:
        cfg, lg = self.cfg, self.logger
        p = cfg.parallel
        lg.info(f"run dir      {os.path.abspath(cfg.run_dir)}")
        lg.info(f"metrics      {os.path.abspath(lg.jsonl_path)}" if cfg.logging.jsonl else "metrics      (jsonl off)")
        if lg.wandb_run is not None:
            where = lg.wandb_dir or "?"
            hint = f" (sync later: wandb sync {where})" if cfg.logging.wandb.mode == "offline" else ""
            url = getattr(lg.wandb_run, "url", None)
            lg.info(f"wandb        {cfg.logging.wandb.mode}: {url or where}{hint}")
        lg.info(f"checkpoints  {os.path.abspath(self.ckpt.root)} (every {cfg.checkpoint.interval or '-'} steps, keep "
                f"{cfg.checkpoint.keep_last}); {self.resumed_from}")
        lg.info(f"model        {cfg.model.name}: {self.params.total / 1e6:.2f}M params, {self.params.active_matmul / 1e6:.2f}M "
                f"active (matmul); vocab {self.sources.vocab_size} (padded {padded_vocab_size(self.sources.vocab_size, cfg)}); "
                f"attention {cfg.attention.type} via msa_megatron.megatron")
        if self.schedule.msa is not None:
            s = self.schedule
            warm = (f"warmup (msa_warmup) steps 1-{s.warmup_steps}, then {s.final_mode}" if s.warmup_steps < self.total_steps
                    else f"warmup (msa_warmup) for the whole run ({s.warmup_steps} >= {self.total_steps} steps)")
            lg.info(f"msa          block {s.msa.block_size} x top-{s.msa.topk} = {s.msa.budget_tokens} of {cfg.train.seq_length} "
                    f"tokens; {warm}"
                    + (f"; indexer-only steps 1-{s.indexer_only_steps}" if s.indexer_only_steps else ""))
        if self.rank == 0 and self.schedule.msa is not None and self.schedule.msa.budget_tokens >= cfg.train.seq_length:
            log.warning("attention.msa: block %d x top-%d = %d tokens >= train.seq_length %d: every query selects every "
                        "key, so MSA computes dense attention here (raise train.seq_length or lower attention.msa.topk)",
                        self.schedule.msa.block_size, self.schedule.msa.topk, self.schedule.msa.budget_tokens,
                        cfg.train.seq_length)
        lg.info(f"config       {os.path.abspath(os.path.join(cfg.run_dir, 'config.yaml'))}")
        lg.info(f"parallel     world {self.world}: tp {p.tp} pp {p.pp} cp {p.cp} ep {p.ep} sp {p.sp} dp {self.dp_size}; "
                f"{self.num_microbatches} x {cfg.train.micro_batch_size} sequences per step and rank")
        lg.info(f"data         {self.sources.description}; {cfg.tokens_per_step()} tokens/step; helpers {self.helpers or 'ok'}")
        held = held_out_composition(self.valid_ds, self._document_names()) if self.valid_ds is not None else None
        if held is not None:  # an event, so metrics.jsonl records what the held-out loss is measured on
            lg.event(self.start_step, "held_out", describe_held_out(held))
        if self.peak == self.peak:
            lg.info(f"mfu peak     {self.peak / 1e12:.3f} TFLOP/s per device ({self.peak_source})")
        else:
            lg.info(f"mfu          off ({self.peak_source})")

    # ------------------------------------------------------------------ step pieces
    def _forward_step(self, data_iterator: Iterator, model):
        """Megatron's forward_step_func: the next micro-batch, this rank's CP part, on the device;
        the forward and loss are :mod:`.step`'s, shared with the Megatron-LM loop and the validator."""
        sample = next(data_iterator)
        batch = {k: sample[k] for k in BATCH_KEYS}
        packed = None
        if self.cfg.data.packing == "eod":  # a document mask at every EOD, in every layer (docs/training.md)
            batch, packed = packed_micro_batch(batch, packing_format(self.cfg), self.device)
        batch = local_batch(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return forward_step(batch, model, packed_seq_params=packed)

    def _reduce_loss(self, losses: List[Dict[str, torch.Tensor]]) -> float:
        """Mean LM loss over the global batch, known on every rank (DP+CP, then PP)."""
        return global_mean_loss(losses, self.device)

    def _forward_backward(self, data_iterator, forward_only: bool, num_microbatches: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=num_microbatches, seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, decoder_seq_length=self.cfg.train.seq_length,
            forward_only=forward_only)

    def train_step(self, step: int) -> Dict[str, Any]:
        plan = self.schedule.apply(step, self.model, self.optimizer, self.scheduler)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(self.train_iter, False, self.num_microbatches)
        loss = self._reduce_loss(losses)
        dbg = self.cfg.train.debug
        if dbg.nan_grad_step == step:
            inject_nan_grad(self.model, dbg.nan_grad_param)
        report = check_step(step, loss, self.model, self.device)
        out: Dict[str, Any] = {"lm_loss": loss, "attention_mode": plan.attention_mode}
        if plan.kl_coeff is not None:
            out["kl_coeff"] = plan.kl_coeff
        if plan.indexer_only:
            out["indexer_only"] = 1.0
        if not report.ok:
            from ..megatron import collect_msa_metrics

            report.bad_layers = bad_msa_layers(collect_msa_metrics(reset=False))
            out["_nonfinite"] = report
            return out
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(1)
        else:
            self.state["skipped_steps"] += 1  # fp16 loss-scale overflow: Megatron skips the update
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        index_norm = (getattr(self.optimizer, "grad_norms_by_group", None) or {}).get(INDEX_GRAD_NORM_GROUP)
        if index_norm is not None:  # msa.index_grad_clip=separate: grad_norm is the backbone's alone
            out["index_grad_norm"] = float(index_norm)
        return out

    def evaluate(self) -> Dict[str, float]:
        """Held-out LM loss (and MSA statistics, selection recall sampled) on the same batches each time."""
        if self.valid_ds is None:
            return {}
        from ..megatron import collect_msa_metrics, set_selection_recall_sampling

        for chunk in self.model:
            chunk.eval()
        set_selection_recall_sampling(self.model, True)
        it = iter(make_loader(self.valid_ds, 0, self.cfg, self.dp_rank, self.dp_size))
        total = 0.0
        with torch.no_grad():
            for _ in range(self.cfg.train.eval_iters):
                total += self._reduce_loss(self._forward_backward(it, True, self.num_microbatches))
        set_selection_recall_sampling(self.model, self.schedule._applied.selection_recall if self.schedule._applied else False)
        for chunk in self.model:
            chunk.train()
        out = {"val_lm_loss": total / self.cfg.train.eval_iters}
        out["val_ppl"] = math.exp(min(out["val_lm_loss"], 50.0))
        out.update({f"val/{k}": v for k, v in collect_msa_metrics(reset=True).items()})
        out.update(self.assoc_recall_accuracy())
        out.update(self.passkey_accuracy())
        return out

    def _moe_scalars(self, steps: int) -> Dict[str, float]:
        cfg = self.cfg
        if cfg.model.num_moe_experts is None or not _moe_track_names(cfg):
            return {}
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        names = _moe_track_names(cfg)
        m = cfg.model
        totals: Dict[str, torch.Tensor] = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / (self.num_microbatches * max(steps, 1)), iteration=0, total_loss_dict=totals,
            force_initialize=True, track_names=names, num_layers=m.num_layers,
            moe_layer_freq=[0] * m.moe_first_dense_layers + [1] * (m.num_layers - m.moe_first_dense_layers),
        )
        return {"moe_aux_loss": float(totals[names[0]])} if names[0] in totals else {}

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        cfg = self.cfg
        log_every, eval_every = cfg.logging.log_interval, cfg.train.eval_interval
        ckpt_every = cfg.checkpoint.interval
        tps = cfg.tokens_per_step()
        interval_losses: List[float] = []
        interval_norms: List[float] = []
        interval_index_norms: List[float] = []
        steps_since_log = 0
        consecutive_skips = 0
        exit_code = EXIT_OK
        step = self.start_step
        if step >= self.total_steps:
            self.logger.info(f"nothing to do: the run is already at step {step} >= {self.total_steps}")
        for step in range(self.start_step + 1, self.total_steps + 1):
            t0 = time.perf_counter()
            out = self.train_step(step)
            self.state["consumed_train_samples"] += cfg.train.global_batch_size
            self.state["tokens"] += tps
            steps_since_log += 1
            report = out.pop("_nonfinite", None)
            if report is not None:
                self.state["skipped_steps"] += 1
                consecutive_skips += 1
                stop = cfg.train.nan_policy == "stop" or consecutive_skips > cfg.train.max_consecutive_skips
                action = "stopping" if stop else f"skipping the update ({consecutive_skips} in a row)"
                self.logger.event(step, "non_finite", f"{report.message()}; {action}")
                if stop:
                    log.error("%s; stopping (train.nan_policy=%s); last good checkpoint: %s",
                              report.message(), cfg.train.nan_policy, self.ckpt.latest())
                    exit_code = EXIT_NONFINITE
                    break
            else:
                consecutive_skips = 0
                interval_losses.append(out["lm_loss"])
                interval_norms.append(out["grad_norm"])
                if "index_grad_norm" in out:
                    interval_index_norms.append(out["index_grad_norm"])
            self.throughput.add(time.perf_counter() - t0, out["attention_mode"])
            if cfg.train.debug.step_sleep_s:
                time.sleep(cfg.train.debug.step_sleep_s)

            is_eval = eval_every > 0 and (step % eval_every == 0 or step == self.total_steps)
            switch = self.schedule.msa is not None and step == self.schedule.warmup_steps + 1  # first sparse step
            if step % log_every == 0 or is_eval or switch or step in (self.start_step + 1, self.total_steps):
                scalars = self._interval_scalars(out, interval_losses, interval_norms, steps_since_log,
                                                 interval_index_norms)
                if is_eval:
                    scalars.update(self.evaluate())
                self.logger.log_step(step, scalars)
                interval_losses, interval_norms, interval_index_norms, steps_since_log = [], [], [], 0
            self.logger.advance(step, out.get("lm_loss"))

            preempted = cfg.checkpoint.save_on_sigterm and self.preempt.any_rank(self.device)
            if (ckpt_every and step % ckpt_every == 0) or preempted:
                self.save(step)
            if preempted:
                self.logger.event(step, "preempted", f"{self.preempt.name} received: checkpoint saved at step {step}, "
                                  "exiting")
                exit_code = EXIT_PREEMPTED
                break
        else:
            if cfg.checkpoint.save_at_end and self.total_steps > self.start_step:
                self.save(self.total_steps)
            sweep = self.selection_recall_sweep()
            if sweep:
                self.logger.log_step(self.total_steps, sweep)
                if self.rank == 0:
                    import json

                    with open(os.path.join(cfg.run_dir, "recall_sweep.json"), "w") as f:
                        json.dump(sweep, f, indent=1)
        return self.finish(exit_code, step)

    def _interval_scalars(self, out: Dict[str, Any], losses: List[float], norms: List[float], steps: int,
                          index_norms: Sequence[float] = ()) -> Dict[str, Any]:
        from ..megatron import collect_msa_metrics

        s: Dict[str, Any] = {
            "lm_loss": sum(losses) / len(losses) if losses else float("nan"),
            "attention_mode": out["attention_mode"],
            "lr": current_lr(self.optimizer),
            "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            "consumed_samples": self.state["consumed_train_samples"],
            "tokens": self.state["tokens"],
            "skipped_steps": self.state["skipped_steps"],
        }
        if index_norms:
            s["index_grad_norm"] = sum(index_norms) / len(index_norms)
        for key in ("kl_coeff", "indexer_only"):
            if key in out:
                s[key] = out[key]
        backbone_lrs = [g["lr"] for g in param_groups(self.optimizer) if g.get(BACKBONE_KEY)]
        if backbone_lrs:
            s["lr_backbone"] = float(backbone_lrs[0])
        s.update(collect_msa_metrics(reset=True))  # per layer too: the sinks choose (logging.per_layer)
        s.update(self._moe_scalars(steps))
        s.update(self.throughput.scalars())
        self.throughput.reset()
        mem, what = memory_gb()
        mem_t = torch.tensor([mem], device=self.device)
        dist.all_reduce(mem_t, op=dist.ReduceOp.MAX)
        s["mem_gb"] = mem_t.item()
        s["mem_kind"] = what
        if what == "gpu_max_allocated":  # run-level peak (memory_gb resets the CUDA peak each interval)
            self.peak_mem_gib = max(getattr(self, "peak_mem_gib", 0.0), mem_t.item() * 1e9 / 2**30)
            s["peak_mem_gib"] = self.peak_mem_gib
        return s

    def _plots(self) -> None:
        """PNG plots of the run (rank 0, the end of every run); a failure is one warning."""
        try:
            from .logging import write_plots

            files = write_plots(self.logger.jsonl_path, os.path.join(self.cfg.run_dir, "plots"))
        except ImportError as e:
            log.warning("no plots: %s (pip install matplotlib, or logging.plots=false)", e)
            return
        except Exception as e:  # noqa: BLE001 - the run is done; plots must not fail it
            log.warning("no plots: %s: %s", type(e).__name__, e)
            return
        if files:
            where = os.path.abspath(os.path.dirname(files[0]))
            print(f"plots: {where}/ ({', '.join(os.path.basename(f) for f in files)})", flush=True)

    def save(self, step: int) -> None:
        self.ckpt.save(step, self.model, self.optimizer, self.scheduler, dict(self.state))

    def finish(self, exit_code: int, step: int) -> int:
        summary = {}
        if self.rank == 0 and self.cfg.logging.jsonl and self.logger.jsonl_path.exists():
            self.logger._jsonl.flush()
            summary = summarize(self.logger.jsonl_path)
            import json

            with open(os.path.join(self.cfg.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        self.logger.close({f"summary/{k}": v for k, v in summary.items()} if summary else None)
        if self.rank == 0 and summary:
            print(format_summary(summary), flush=True)
            print(f"logs: {os.path.abspath(self.logger.jsonl_path)}"
                  + (f" | wandb: {self.logger.wandb_dir}" if self.logger.wandb_dir else "")
                  + (f" | tensorboard: {os.path.abspath(os.path.join(self.cfg.run_dir, 'tensorboard'))}"
                     if self.logger._tb is not None else ""), flush=True)
            if self.cfg.logging.plots:
                self._plots()
        self.preempt.restore()
        if exit_code == EXIT_NONFINITE:
            raise NonFiniteError(f"training stopped on a non-finite value at step {step} (see {self.logger.jsonl_path})")
        return exit_code


def choose_run_dir(cfg: Config, suffix: str = "") -> str:
    """run_dir unset: a new runs/<model>-<attention>-<timestamp>[suffix]; with
    checkpoint.resume=last the newest existing one of that model and attention."""
    if cfg.checkpoint.resume == "last":
        import glob

        prefix = os.path.join("runs", f"{cfg.model.name}-{cfg.attention.type}-")
        runs = sorted(d for d in glob.glob(prefix + "*") if os.path.isfile(os.path.join(d, "checkpoints", "latest")))
        if not runs:
            raise UsageError("checkpoint.resume", "last", f"no earlier run with checkpoints matches {prefix}* "
                             "(relative to this directory); name the run with run_dir=<dir>")
        return runs[-1]
    return new_run_dir(cfg.model.name, cfg.attention.type, suffix)


def _with_run_dir(config_yaml: str, run_dir: str) -> str:
    from omegaconf import OmegaConf

    conf = OmegaConf.create(config_yaml)
    conf.run_dir = run_dir
    return OmegaConf.to_yaml(conf)


def _with_saved(cfg: Config, changes: Dict[str, Any], fields) -> Config:
    """``cfg`` with the saved (old) values of the changed ``train.*`` ``fields``."""
    import dataclasses

    old = {k.split(".", 1)[1]: o for k, (o, _n) in changes.items() if k in fields and k.startswith("train.")}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **old)) if old else cfg


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(cfg: Config, config_yaml: str = "", run_suffix: str = "") -> int:
    """Set up, train, shut down. Returns the exit code; NonFiniteError propagates."""
    from ..megatron.parallel import shutdown_distributed

    trainer = Trainer(cfg, config_yaml, run_suffix)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        try:
            from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

            destroy_num_microbatches_calculator()
        except Exception:  # noqa: BLE001
            pass
        shutdown_writer_queue()
        shutdown_distributed()
        trainer.lock.release()


__all__ = ["ERROR_TEXT_MAX", "Trainer", "one_line_error", "run"]

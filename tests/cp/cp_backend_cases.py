"""Worker side of tests/cp/test_cp_backend.py: a GPTModel with MSA layers under context
parallelism against the same model at CP = 1, inside spawned gloo processes.

Model: 3 layers (layer 0 dense attention, layers 1-2 MSA), hidden 64, 4 query heads in 2 KV
groups, block 16, top-3, sequences of 200 tokens (13 key blocks). CP = 2 cuts them into
chunks of 50 tokens, which are not block-aligned, so key blocks straddle chunk (and rank)
edges and queries select blocks owned by the other rank (both are asserted).

Every step goes through Megatron's own machinery: per-rank batches from
``megatron.core.utils.get_batch_on_this_cp_rank``, ``forward_backward_no_pipelining`` with
a Megatron-LM style loss function (sum of local token losses, local token count), which
sets the MSA KL's backward scale (``loss_scale * cp / num_microbatches``), Megatron DDP
(averages over DP x CP) and ``finalize_model_grads``. The CP = 1 reference runs in the same
world as pure data parallelism with the same batch on every rank (the DP average of equal
gradients is the gradient), so both layouts use the same code path.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

SEQ = 200
BATCH = 2
NUM_MICROBATCHES = 2
MODES = ("msa", "msa_warmup", "dense")


# ----------------------------------------------------------------------------- set-up
def cpu_shims() -> None:
    """The product covers what CP reaches on CPU: the local backend's dense layers use
    :class:`CPDotProductAttention` (Megatron's DotProductAttention refuses CP), and the
    compatibility layer drops ``pin_memory`` (Megatron's per-rank RoPE slicing pins)."""
    from msa_megatron.megatron.attention import CPDotProductAttention
    from msa_megatron.megatron.specs import MSALocalSpecProvider

    assert issubclass(MSALocalSpecProvider().core_attention(), CPDotProductAttention)


def start(tp: int = 1, cp: int = 1, sp: bool = False, seed: int = 1234) -> None:
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(tp=tp, cp=cp, sequence_parallel=sp), seed=seed)


def model_config(tp: int = 1, cp: int = 1, sp: bool = False, **overrides):
    from mcore_helpers import msa_settings, tiny_config

    return tiny_config(msa_settings(first_dense_layers=1, topk=3), num_layers=3, tensor_model_parallel_size=tp,
                       context_parallel_size=cp, sequence_parallel=sp, **overrides)


def full_batches(seed: int = 300) -> List[Dict[str, torch.Tensor]]:
    from mcore_helpers import batch

    out = []
    for i in range(NUM_MICROBATCHES):
        tokens, pos, labels = batch(seed=seed + i, seq=SEQ, b=BATCH)
        out.append({"tokens": tokens, "position_ids": pos, "labels": labels,
                    "loss_mask": torch.ones(BATCH, SEQ), "attention_mask": None})
    return out


def cp_batch(full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This rank's batch, cut by Megatron-Core's own helper (what the trainer must call)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    local = {k: (v.clone() if v is not None else None) for k, v in full.items()}
    return get_batch_on_this_cp_rank(local, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())


# ----------------------------------------------------------------------------- one training step
class SelectionProbe:
    """Wraps the op as called by the MSA core attention and records, per MSA call, how many
    (query, group, slot) selections point at key blocks holding tokens of another CP rank,
    and whether any selected block straddles two ranks."""

    def __init__(self) -> None:
        import msa_megatron.megatron.attention as attention

        self.attention = attention
        self.original = attention.msa_attention
        self.remote = 0
        self.straddling = 0
        self.preselected = 0  # MSA calls that received block_idx (the select-first overlap)

    def __enter__(self):
        from megatron.core import parallel_state

        from msa_megatron.megatron import context_parallel as cpl

        cp = parallel_state.get_context_parallel_world_size()
        rank = parallel_state.get_context_parallel_rank()

        def op(q, k, v, iq, ik, cfg, q_pos=None, mode=None, **kw):
            out, aux = self.original(q, k, v, iq, ik, cfg, q_pos=q_pos, mode=mode, **kw)
            self.preselected += kw.get("block_idx") is not None
            if cp > 1 and aux.block_idx is not None and iq is not None:
                chunk = k.shape[1] // (2 * cp)
                blk = aux.block_idx.long()
                first = cpl._chunk_owner((blk.clamp_min(0) * cfg.block_size) // chunk, cp)
                last_tok = torch.clamp((blk.clamp_min(0) + 1) * cfg.block_size - 1, max=k.shape[1] - 1)
                last = cpl._chunk_owner(last_tok // chunk, cp)
                valid = blk >= 0
                self.remote += int((valid & ((first != rank) | (last != rank))).sum())
                self.straddling += int((valid & (first != last)).sum())
            return out, aux

        self.attention.msa_attention = op
        return self

    def __exit__(self, *exc):
        self.attention.msa_attention = self.original
        return False


def loss_func(output_tensor: torch.Tensor, loss_mask: torch.Tensor):
    """Megatron-LM's GPT loss: (sum of local token losses, local token count, report)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}


def schedule_step(wrapped, config, batches: List[Dict[str, torch.Tensor]]) -> Dict:
    """Zero grads, one forward/backward over the micro-batches through Megatron's schedule
    (which also runs finalize_model_grads); returns per-token losses per micro-batch, the
    reduced gradients by name, the metrics and the KL scale the schedule set."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from msa_megatron.megatron import collect_msa_metrics
    from msa_megatron.megatron.kl_loss import MSAKLAutoScaler

    MSAKLAutoScaler.reset()
    collect_msa_metrics()
    wrapped.zero_grad_buffer()
    losses: List[torch.Tensor] = []
    data = iter(cp_batch(b) for b in batches)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        losses.append(out.detach().clone())
        return out, lambda o: loss_func(o, b["loss_mask"])

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=[wrapped],
                                num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
                                forward_only=False)
    module = wrapped.module
    grads = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}
    scale = MSAKLAutoScaler.main_loss_backward_scale
    return dict(losses=losses, grads=grads, metrics=collect_msa_metrics(),
                kl_scale=None if scale is None else float(scale))


def run_layout(tp: int, cp: int, sp: bool, full: Optional[Dict[str, torch.Tensor]], seed: int,
               select_first: bool = False, per_token_loss: bool = False, modes=MODES) -> Dict:
    """Build the model for this layout (weights from ``full`` when given) and run every mode."""
    from megatron.core.distributed import finalize_model_grads

    from mcore_helpers import ddp, full_params, gpt, load_full_state
    from msa_megatron.megatron import set_attention_mode, set_selection_recall_sampling
    from msa_megatron.megatron.modes import set_cp_select_overlap

    start(tp=tp, cp=cp, sp=sp, seed=seed)
    config = model_config(tp=tp, cp=cp, sp=sp, calculate_per_token_loss=per_token_loss)
    model = gpt(config)
    if full is not None:
        load_full_state(model, full)
    params = full_params(model)
    wrapped = ddp(config, model)
    config.finalize_model_grads_func = finalize_model_grads
    assert set_cp_select_overlap(model, select_first) == 2
    batches = full_batches()
    out = {"params": params, "model": model, "steps": {}, "probe": {}}
    for mode in modes:
        set_attention_mode(model, mode)
        set_selection_recall_sampling(model, mode == "msa")  # recall statistic under CP too
        t0 = time.perf_counter()
        with SelectionProbe() as probe:
            out["steps"][mode] = schedule_step(wrapped, config, batches)
        out["steps"][mode]["seconds"] = time.perf_counter() - t0
        out["probe"][mode] = (probe.remote, probe.straddling, probe.preselected)
    return out


# ----------------------------------------------------------------------------- comparison
def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def merged_losses(losses: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-token losses of every micro-batch over the whole sequence, from this CP rank's
    pieces (all-gathered over the CP group and put back in global order)."""
    from megatron.core import parallel_state

    from msa_megatron.megatron.context_parallel import merge_from_cp

    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return losses
    group = parallel_state.get_context_parallel_group()
    out = []
    for loss in losses:
        pieces = [torch.empty_like(loss) for _ in range(cp)]
        dist.all_gather(pieces, loss.contiguous(), group=group)
        out.append(merge_from_cp(pieces))
    return out


def compare(res: Dict, ref: Dict, what: str) -> Dict:
    """Largest deviations of ``res`` (this rank, any layout) from the CP=1 reference, per
    mode: per-token losses, every parameter's reduced gradient (this rank's TP shard of the
    reference), metrics; plus facts that make the comparison meaningful."""
    from mcore_helpers import tp_shard

    params = dict(res["model"].named_parameters())
    report = {}
    for mode, step in res["steps"].items():
        r = ref["steps"][mode]
        loss_err = max(_err(a, b) for a, b in zip(merged_losses(step["losses"]), r["losses"]))
        grad_errs = {n: _err(g, tp_shard(params[n], r["grads"][n])) for n, g in step["grads"].items()}
        index_grad_norm = sum(float(g.abs().sum()) for n, g in step["grads"].items() if ".indexer." in n)
        metric_errs = {k: abs(step["metrics"][k] - v) for k, v in r["metrics"].items() if k in step["metrics"]}
        report[mode] = dict(
            loss=loss_err, grads=grad_errs, worst_grad=max(grad_errs.items(), key=lambda kv: kv[1]),
            metric_keys_equal=sorted(step["metrics"]) == sorted(r["metrics"]), metrics=metric_errs,
            metric_names=sorted(step["metrics"]), index_grad_abs_sum=index_grad_norm,
            kl_scale=step["kl_scale"], ref_kl_scale=r["kl_scale"], probe=res["probe"][mode],
            seconds=step["seconds"], what=what,
        )
    return report


def strip(ref: Dict) -> Dict:
    return {"steps": ref["steps"], "probe": ref["probe"]}


# ----------------------------------------------------------------------------- the whole plan
def cp1_unchanged() -> Dict:
    """CP = 1 is the pre-CP code path: with the stock local spec (Megatron's
    DotProductAttention everywhere) and with the CP-capable one, the same weights give
    bit-identical per-token losses and gradients in every mode. Runs before the shims."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from mcore_helpers import gpt, load_full_state
    from msa_megatron.megatron import set_attention_mode
    from msa_megatron.megatron.attention import CPDotProductAttention, MSACoreAttention

    def run(model):
        outs = {}
        for mode in MODES:
            set_attention_mode(model, mode)
            model.zero_grad(set_to_none=True)
            b = full_batches()[0]
            loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            loss.sum().backward()
            outs[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return outs

    from msa_megatron.megatron.specs import MSALocalSpecProvider

    start(seed=41)
    product_core = MSALocalSpecProvider.core_attention
    MSALocalSpecProvider.core_attention = lambda self: DotProductAttention  # Megatron's stock choice
    try:
        stock = gpt(model_config())
    finally:
        MSALocalSpecProvider.core_attention = product_core
    cores = [m for m in stock.modules() if isinstance(m, (DotProductAttention, MSACoreAttention))]
    assert not any(isinstance(m, CPDotProductAttention) for m in cores)
    assert all(type(m.dense_attention) is DotProductAttention for m in cores if isinstance(m, MSACoreAttention))
    weights = {n: p.detach().clone() for n, p in stock.named_parameters()}
    base = run(stock)
    cpu_shims()
    # The CP-capable class itself (the product spec gives its SDPA subclass at CP = 1, which is
    # compared with DotProductAttention to a tolerance in tests/megatron/test_dense_attention.py).
    MSALocalSpecProvider.core_attention = lambda self: CPDotProductAttention
    try:
        shimmed = gpt(model_config())
    finally:
        MSALocalSpecProvider.core_attention = product_core
    # layer 0's core attention and the dense-mode children of the two MSA layers
    assert sum(type(m) is CPDotProductAttention for m in shimmed.modules()) == 3
    load_full_state(shimmed, weights)
    other = run(shimmed)
    same = all(torch.equal(base[m][0], other[m][0]) and base[m][1].keys() == other[m][1].keys()
               and all(torch.equal(base[m][1][n], other[m][1][n]) for n in base[m][1]) for m in MODES)
    return {"bit_identical": same}


#: (name, tp, cp, sp, select_first, per_token_loss, modes) run after the CP=1 references.
LAYOUTS = [
    ("cp2", 1, 2, False, False, False, MODES),  # DP=2 x CP=2: DDP averages over DP x CP
    ("cp2_select_first", 1, 2, False, True, False, ("msa", "msa_warmup")),
    ("cp2_per_token_loss", 1, 2, False, False, True, ("msa",)),
    ("cp2_tp2_sp", 2, 2, True, False, False, MODES),
    ("cp4", 1, 4, False, False, False, ("msa",)),  # chunks of 25 tokens
]


def backend_worker(rank: int, layouts=None) -> Dict:
    """Every check of tests/cp/test_cp_backend.py in one spawned run (4 processes)."""
    from mcore_helpers import quiet

    quiet()
    t0 = time.perf_counter()
    out: Dict = {"rank": rank, "cp1": cp1_unchanged(), "layouts": {}, "seconds": {}}
    refs = {}
    for per_token_loss in (False, True):
        t = time.perf_counter()
        modes = ("msa",) if per_token_loss else MODES
        refs[per_token_loss] = run_layout(1, 1, False, None if not refs else refs[False]["params"], seed=5,
                                          per_token_loss=per_token_loss, modes=modes)
        out["seconds"][f"cp1_ref_ptl{per_token_loss}"] = time.perf_counter() - t
    full = refs[False]["params"]
    for name, tp, cp, sp, select_first, ptl, modes in (layouts or LAYOUTS):
        t = time.perf_counter()
        res = run_layout(tp, cp, sp, full, seed=100 + cp * 10 + tp, select_first=select_first,
                         per_token_loss=ptl, modes=modes)
        report = compare(res, refs[ptl], name)
        config = res["model"].config
        report["validate_ok"] = config.validate_sequence_length(SEQ) == SEQ // cp
        out["layouts"][name] = report
        out["seconds"][name] = time.perf_counter() - t
    out["seconds"]["total"] = time.perf_counter() - t0
    return out

"""Worker side of the packed-sequence backend tests (tests/megatron/test_packed_backend.py,
tests/cp/test_packed_cp.py), run inside spawned gloo processes.

Model: a tiny GPT (mcore_helpers) with 3 layers, layer 0 dense attention, layers 1-2 MSA,
block 16, top-2. A packed run (``packed_seq_params``) must equal the same model run on each
document separately (no packing): per-token LM losses, and every parameter's gradient of
``sum(loss * w)`` (w a fixed random weight per token). The indexer KL is a mean over query
rows, so a packed run weights document i's KL by L_i / T: the separate runs use
``kl_coeff * L_i / T`` (the stop-gradient keeps the KL off the backbone, so this changes
only the index parameters' gradients).

In mode msa the selection of a document equals its separate run's only when it starts at a
block multiple (block ids shift by start / B); dense and msa_warmup are exact for any
layout. Layouts below say which they are.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

KL_COEFF = 1.0


def start(tp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    from msa_megatron.megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(tp=tp, cp=cp), seed=seed)


def build(tp: int = 1, cp: int = 1, seed: int = 1234, topk: int = 2):
    from mcore_helpers import gpt, msa_settings, quiet, tiny_config

    quiet()
    start(tp=tp, cp=cp, seed=seed)
    config = tiny_config(msa_settings(first_dense_layers=1, topk=topk, kl_coeff=KL_COEFF), num_layers=3,
                         tensor_model_parallel_size=tp, context_parallel_size=cp)
    return config, gpt(config)


def set_kl_coeff(model, value: float) -> None:
    from msa_megatron.megatron.modes import msa_core_attentions

    for core in msa_core_attentions(model):
        core.msa.kl_coeff = value


def doc_tokens(lengths: Sequence[int], seed: int = 3):
    """tokens, labels [1, T] and a per-token weight [1, T] for documents of these lengths."""
    from mcore_helpers import VOCAB

    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    tokens = torch.randint(0, VOCAB, (1, T + 1), generator=g)
    weight = torch.rand(1, T, generator=g) + 0.5
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), weight


def thd_params(lengths: Sequence[int], device=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths))


def sbhd_params(lengths: Sequence[int], seq: int):
    """msa_megatron's sbhd form: cu_seqlens over the rows laid end to end (each row ``seq``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq, max_seqlen_kv=seq)


def doc_positions(lengths: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def _grads(model) -> Dict[str, Optional[torch.Tensor]]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def run_separate(model, lengths: Sequence[int], tokens, labels, weight) -> Dict:
    """Each document alone ([1, L_i], positions 0..L_i-1); losses concatenated, gradients summed
    (KL weighted by L_i / T)."""
    _zero(model)
    T = sum(lengths)
    losses, a = [], 0
    for n in lengths:
        set_kl_coeff(model, KL_COEFF * n / T)
        loss = model(tokens[:, a:a + n], torch.arange(n, device=tokens.device)[None], None, labels=labels[:, a:a + n])
        (loss * weight[:, a:a + n]).sum().backward()
        losses.append(loss.detach())
        a += n
    set_kl_coeff(model, KL_COEFF)
    return {"loss": torch.cat(losses, dim=1), "grads": _grads(model)}


def run_packed_thd(model, lengths: Sequence[int], tokens, labels, weight) -> Dict:
    _zero(model)
    loss = model(tokens, doc_positions(lengths).to(tokens.device), None, labels=labels,
                 packed_seq_params=thd_params(lengths, tokens.device))
    (loss * weight).sum().backward()
    return {"loss": loss.detach(), "grads": _grads(model)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def compare(packed: Dict, separate: Dict) -> Dict:
    """{'loss': err, 'grads': {name: err}, 'missing': [names with a gradient on one side only]}."""
    grads, missing = {}, []
    for n, g in separate["grads"].items():
        p = packed["grads"][n]
        if (g is None) != (p is None):
            missing.append(n)
        elif g is not None:
            grads[n] = rel_err(p, g)
    return {"loss": rel_err(packed["loss"], separate["loss"]), "grads": grads, "missing": missing,
            "index_grad_norm": sum(float(g.abs().sum()) for n, g in packed["grads"].items()
                                   if g is not None and "indexer" in n)}


#: block-aligned document starts (msa mode exact), the last document of odd length
ALIGNED = (32, 48, 16, 21)
#: documents shorter than a block, several boundaries in one block (dense / msa_warmup exact)
UNALIGNED = (5, 3, 20, 37, 1, 30)
MODES = ("dense", "msa_warmup", "msa")


def tp_worker(rank: int) -> Dict:
    """TP = 1 (as DP = 2) and TP = 2: packed THD vs documents one by one, every mode; the
    sbhd form (two rows) likewise; THD in msa mode with a document split inside blocks vs the
    full-budget identity (topk >= blocks: MSA == dense with the document mask)."""
    from msa_megatron.megatron import set_attention_mode

    out: Dict[str, Dict] = {}
    for tp in (1, 2):
        config, model = build(tp=tp)
        out[f"tp{tp}/indexer_rope"] = indexer_rope_check(model)
        for mode in MODES:
            set_attention_mode(model, mode)
            for name, lengths in (("aligned", ALIGNED), ("unaligned", UNALIGNED)):
                if mode == "msa" and name == "unaligned":
                    continue
                tokens, labels, weight = doc_tokens(lengths)
                sep = run_separate(model, lengths, tokens, labels, weight)
                pk = run_packed_thd(model, lengths, tokens, labels, weight)
                out[f"tp{tp}/{mode}/thd/{name}"] = compare(pk, sep)
            # the sbhd form: two rows of 64 tokens, documents cut at the row boundary
            rows = (32, 32, 16, 48)
            tokens, labels, weight = doc_tokens(rows, seed=9)
            sep = run_separate(model, rows, tokens, labels, weight)
            _zero(model)
            loss = model(tokens.view(2, 64), None, None, labels=labels.view(2, 64), packed_seq_params=sbhd_params(rows, 64))
            (loss.reshape(1, -1) * weight).sum().backward()
            out[f"tp{tp}/{mode}/sbhd/rows"] = compare({"loss": loss.detach().reshape(1, -1), "grads": _grads(model)}, sep)
        # msa at full budget (top-8 >= 7 blocks of 100 tokens) on an unaligned layout == dense with documents
        set_attention_mode(model, "dense")
        tokens, labels, weight = doc_tokens(UNALIGNED, seed=5)
        dense = model(tokens, None, None, labels=labels, packed_seq_params=thd_params(UNALIGNED)).detach()
        nodocs = model(tokens, None, None, labels=labels).detach()  # the same run without the document mask
        from msa_megatron.megatron.modes import msa_core_attentions

        for core in msa_core_attentions(model):
            core.msa.topk = 8
        set_attention_mode(model, "msa")
        full = model(tokens, None, None, labels=labels, packed_seq_params=thd_params(UNALIGNED)).detach()
        for core in msa_core_attentions(model):
            core.msa.topk = 2
        out[f"tp{tp}/msa_full_budget"] = {"loss": rel_err(full, dense), "grads": {}, "missing": [],
                                          "docs_change": rel_err(nodocs, dense)}
    return out


def indexer_rope_check(model) -> Dict:
    """The index branch in THD uses per-document positions, as Megatron's main branch does: iq/ik
    of a packed row == those of each document alone (exactly), and != global positions."""
    layer = model.decoder.layers[1].self_attention  # an MSA layer (layer 0 is dense)
    lengths = UNALIGNED
    T = sum(lengths)
    cu = thd_params(lengths).cu_seqlens_q
    rope = model.rotary_pos_emb(max(lengths))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, 1, model.config.hidden_size, generator=g)
    with torch.no_grad():
        iq, ik = layer.indexer(x, rope, cu_seqlens=cu)
        parts, a = [], 0
        for n in lengths:
            parts.append(layer.indexer(x[a:a + n], rope[:n]))
            a += n
        iq_sep, ik_sep = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        iq_glob, _ = layer.indexer(x, model.rotary_pos_emb(T))
    return {"loss": max(rel_err(iq, iq_sep), rel_err(ik, ik_sep)), "grads": {}, "missing": [],
            "global_differs": rel_err(iq_glob, iq_sep)}


# ----------------------------------------------------------------------------- CP = 2
def cp_worker(rank: int) -> Dict:
    """CP = 2 with msa_megatron's sbhd form (zigzag cut of the packed row; documents cross CP
    chunks) vs the documents one by one at CP = 1 in the same world; with and without the
    select-first overlap."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from msa_megatron.megatron import set_attention_mode
    from msa_megatron.megatron.context_parallel import merge_from_cp, split_for_cp
    from msa_megatron.megatron.modes import set_cp_select_overlap

    lengths = (48, 16, 64, 32, 32, 16)  # one row of 208 tokens; CP chunks of 52: four documents cross one
    seq = sum(lengths)
    out: Dict[str, Dict] = {}
    _, model1 = build(cp=1)
    state = {n: p.detach().clone() for n, p in model1.named_parameters()}
    tokens, labels, weight = doc_tokens(lengths, seed=21)
    refs = {}
    for mode in MODES:
        set_attention_mode(model1, mode)
        refs[mode] = run_separate(model1, lengths, tokens, labels, weight)
    config, model = build(cp=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    cp_rank = ps.get_context_parallel_rank()
    group = ps.get_context_parallel_group()
    local = {k: split_for_cp(x, 2, cp_rank) for k, x in (("tokens", tokens), ("labels", labels), ("weight", weight))}
    pos = split_for_cp(torch.arange(seq)[None], 2, cp_rank)
    chunk = seq // 4
    out["layout"] = {"crossing_docs": sum(1 for a, n in zip([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()),
                                                             lengths) if a // chunk != (a + n - 1) // chunk)}
    for mode in ("dense", "msa"):  # THD under CP (Megatron's per-document split): one clear error, every mode
        set_attention_mode(model, mode)
        try:
            model(local["tokens"], pos, None, labels=local["labels"], packed_seq_params=thd_params(lengths))
            out[f"thd_error/{mode}"] = "no error"
        except ValueError as exc:
            out[f"thd_error/{mode}"] = str(exc)
    for select_first in (False, True):
        set_cp_select_overlap(model, select_first)
        for mode in MODES:
            set_attention_mode(model, mode)
            _zero(model)
            loss = model(local["tokens"], pos, None, labels=local["labels"],
                         packed_seq_params=sbhd_params(lengths, seq))
            (loss * local["weight"]).sum().backward()
            grads = _grads(model)
            for g in grads.values():
                if g is not None:
                    dist.all_reduce(g, group=group)  # the rank's local loss -> the whole sequence's
            pieces = [torch.empty_like(loss) for _ in range(2)]
            dist.all_gather(pieces, loss.detach().contiguous(), group=group)
            packed = {"loss": merge_from_cp(pieces), "grads": grads}
            out[f"cp2/{mode}/select_first={select_first}"] = compare(packed, refs[mode])
    return out


# ----------------------------------------------------------------------------- GPU (one process)
def gpu_worker(rank: int, device: str = "cuda") -> Dict:
    """The packed THD model vs documents one by one on CUDA: Triton MSA kernels, and for the
    dense layers torch varlen flash (bf16) or the Triton dense-with-documents path (fp32)."""
    from msa_megatron.megatron import set_attention_mode
    from msa_megatron.megatron.packed import varlen_eligible

    out: Dict[str, Dict] = {}
    _, model = build(tp=1)
    model = model.to(device)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        probe = torch.zeros(1, 4, 1, 16, device=device, dtype=dtype)
        out[f"dense_path/{dtype}"] = varlen_eligible(probe, torch.tensor([0, 4], device=device), None)[1]
        for mode in MODES:
            set_attention_mode(model, mode)
            for name, lengths in (("aligned", ALIGNED), ("unaligned", UNALIGNED)):
                if mode == "msa" and name == "unaligned":
                    continue
                tokens, labels, weight = (t.to(device) for t in doc_tokens(lengths))
                sep = run_separate(model, lengths, tokens, labels, weight.to(dtype))
                pk = run_packed_thd(model, lengths, tokens, labels, weight.to(dtype))
                out[f"{dtype}/{mode}/{name}"] = compare(pk, sep)
    return out


__all__: List[str] = ["cp_worker", "gpu_worker", "tp_worker"]

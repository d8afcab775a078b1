"""A stand-in MSA backend with the real backend's API, for trainer tests that must run
before msa_megatron.megatron.model is merged (selected with MSA_MEGATRON_BACKEND).

It is not MSA: it adds ``indexer.index_q`` / ``indexer.index_k`` to the MSA layers of a
stock GPTModel and distils their attention-like softmax towards a teacher computed from
the layer's *detached* input (KL, attached to the attention output by an auto-scaler),
so it has what the trainer cares about: index parameters recognised by name, a KL that
reaches the backward by itself and falls with training, per-layer statistics reduced
across ranks, and run-time mode / recall / KL-coefficient switches whose use shows up in
the collected metrics (``fake/mode_code``: 1 = msa_warmup, 2 = msa; ``fake/kl_coeff``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

_MODE_CODE = {"dense": 0.0, "msa_warmup": 1.0, "msa": 2.0}
#: layer -> [kl, index_entropy, main_entropy, count, recall, recall_count, mode_code, kl_coeff]
_TRACK: Dict[int, torch.Tensor] = {}
_NUM_LAYERS = [0]


class _Scaler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, loss):
        ctx.save_for_backward(loss)
        return out

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss) * _Scaler.scale

    scale = 1.0


def _set_scale(scale) -> None:
    _Scaler.scale = float(scale)


class FakeIndexer(torch.nn.Module):
    def __init__(self, hidden: int, groups: int, dim: int, layer: int, topk_tokens: int):
        super().__init__()
        self.index_q = torch.nn.Linear(hidden, groups * dim, bias=False)
        self.index_k = torch.nn.Linear(hidden, dim, bias=False)
        for lin in (self.index_q, self.index_k):
            torch.nn.init.normal_(lin.weight, std=0.02)
        self.groups, self.dim, self.layer, self.topk_tokens = groups, dim, layer, topk_tokens
        self.mode, self.recall, self.kl_coeff = "msa", False, 1.0

    def kl(self, x: torch.Tensor):
        """x: [s, b, h] detached layer input -> (scalar KL, stats)."""
        x_in = x.detach().transpose(0, 1).to(self.index_q.weight.dtype)  # [b, s, h]
        x = x_in.float()
        b, s, h = x.shape
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        teacher = (x @ x.transpose(1, 2)) / math.sqrt(h)
        p = torch.softmax(teacher.masked_fill(~causal, float("-inf")), -1)  # [b, s, s]
        q_idx = self.index_q(x_in).float().view(b, s, self.groups, self.dim).transpose(1, 2)  # [b, g, s, d]
        k_idx = self.index_k(x_in).float()  # [b, s, d]
        scores = (q_idx @ k_idx.unsqueeze(1).transpose(2, 3)) / math.sqrt(self.dim)
        logq = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), -1)  # [b, g, s, s]
        pg = p.unsqueeze(1)
        kl = (pg * (torch.log(pg.clamp_min(1e-20)) - logq.masked_fill(~causal, 0.0))).sum(-1).mean()
        with torch.no_grad():
            ent_q = -(logq.exp() * logq.masked_fill(~causal, 0.0)).sum(-1).mean()
            ent_p = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
            recall = None
            if self.recall:
                k = min(self.topk_tokens, s)
                top_q = scores.masked_fill(~causal, float("-inf")).topk(k, -1).indices
                recall = torch.gather(pg.expand_as(scores), -1, top_q).sum(-1).mean()
        return kl, ent_q, ent_p, recall


def _record(layer: int, kl, ent_q, ent_p, recall, mode: str, coeff: float) -> None:
    row = torch.tensor([kl.item(), ent_q.item(), ent_p.item(), 1.0, recall.item() if recall is not None else 0.0,
                        1.0 if recall is not None else 0.0, _MODE_CODE[mode], coeff], dtype=torch.float64)
    _TRACK[layer] = _TRACK.get(layer, torch.zeros(8, dtype=torch.float64)) + row


def _hook(indexer: FakeIndexer):
    def hook(module, args, kwargs, output):
        if indexer.mode == "dense":
            return output
        x = args[0] if args else kwargs["hidden_states"]
        kl, ent_q, ent_p, recall = indexer.kl(x)
        _record(indexer.layer, kl.detach(), ent_q, ent_p, recall, indexer.mode, indexer.kl_coeff)
        if not torch.is_grad_enabled():
            return output
        out, bias = output
        return _Scaler.apply(out, kl * indexer.kl_coeff), bias
    return hook


# --------------------------------------------------------------------------- backend API
def make_transformer_config(msa, **kwargs):
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(**kwargs)
    cfg.msa = msa.for_model(cfg.num_layers, cfg.num_query_groups, cfg.tensor_model_parallel_size) if msa else None
    if msa is not None:
        cfg.experimental_attention_variant_loss_scale_func = _set_scale
    return cfg


def build_gpt_model(config, vocab_size, max_sequence_length, pre_process=True, post_process=True, vp_stage=None,
                    use_te=False, **gpt_kwargs):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization,
                                      vp_stage=vp_stage)
    model = GPTModel(config, spec, vocab_size, max_sequence_length, pre_process=pre_process,
                     post_process=post_process, vp_stage=vp_stage, **gpt_kwargs)
    msa = getattr(config, "msa", None)
    _NUM_LAYERS[0] = config.num_layers
    if msa is None:
        return model
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        if msa.is_msa_layer(index):
            indexer = FakeIndexer(config.hidden_size, config.num_query_groups, msa.index_dim, index, msa.budget_tokens)
            layer.self_attention.indexer = indexer
            layer.self_attention.register_forward_hook(_hook(indexer), with_kwargs=True)
    return model


def _indexers(model_chunks) -> List[FakeIndexer]:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, FakeIndexer)]


def set_attention_mode(model_chunks, mode: str) -> None:
    for ix in _indexers(model_chunks):
        ix.mode = mode


def set_recall_sampling(model_chunks, enabled: bool) -> None:
    for ix in _indexers(model_chunks):
        ix.recall = bool(enabled)


def set_kl_coeff(model_chunks, coeff: float) -> None:
    for ix in _indexers(model_chunks):
        ix.kl_coeff = float(coeff)


def collect_msa_metrics(reset: bool = True) -> Dict[str, float]:
    n = max(_NUM_LAYERS[0], 1)
    table = torch.zeros(n, 8, dtype=torch.float64)
    for i, row in _TRACK.items():
        table[i] = row
    if dist.is_initialized():
        dist.all_reduce(table)
    if reset:
        _TRACK.clear()
    out: Dict[str, float] = {}
    means: Dict[str, List[float]] = {"indexer_kl": [], "index_entropy": [], "main_entropy": [], "recall": [],
                                     "fake/mode_code": [], "fake/kl_coeff": []}
    for i in range(n):
        r = table[i]
        if r[3] > 0:
            for key, col in (("indexer_kl", 0), ("index_entropy", 1), ("main_entropy", 2)):
                out[f"{key}/layer_{i}"] = float(r[col] / r[3])
                means[key].append(out[f"{key}/layer_{i}"])
            means["fake/mode_code"].append(float(r[6] / r[3]))
            means["fake/kl_coeff"].append(float(r[7] / r[3]))
        if r[5] > 0:
            out[f"recall/layer_{i}"] = float(r[4] / r[5])
            means["recall"].append(out[f"recall/layer_{i}"])
    for key, values in means.items():
        if values:
            out[key] = sum(values) / len(values)
    return out

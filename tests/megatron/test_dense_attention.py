"""SDPADotProductAttention (torch SDPA for dense layers at CP = 1) against Megatron's own
DotProductAttention: same module contract, same numbers, same checkpoints.

Tolerances: fp32 forward/backward atol 2e-5, rtol 1e-5 (summation order only). bf16: atol 5e-2,
rtol 2e-2 against Megatron's bf16 path elementwise (outputs and gradients are O(1); one bf16
rounding of a value ~1 is 4e-3 and the two paths round at different places: the unfused one
rounds the probabilities to bf16 before P @ V), and the RMS error against the exact fp32
result at most 1.5x Megatron's own bf16 RMS error (+1e-4).
Module-level cases run in-process; the GPT cases (spec wiring, whole-model gradients, dist
checkpoints written with the old spec) run in one spawned single-rank gloo process.
"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch

from tests.dist_harness import run_distributed
from mcore_helpers import ENV

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


class _Group:
    """A size-1 process group stand-in: the modules only ask for size() at CP = TP = 1."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


PGS = SimpleNamespace(tp=_Group(), cp=_Group())


class _CPUBuffer:
    def get_tensor(self, shape, dtype, name):
        return torch.empty(shape, dtype=dtype)


@pytest.fixture
def memory_buffer(monkeypatch):
    """Megatron's DotProductAttention on CPU, in-process: its score buffer and default masks are
    allocated on CUDA upstream; the same buffers/masks on CPU (copies of the upstream one-liners)."""
    from megatron.core import parallel_state
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import dot_product_attention

    def causal(sq):
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def window(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])

    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: _CPUBuffer())
    # attention_dropout is 0 in these cases: the RNG fork DotProductAttention always enters is a no-op.
    tracker = SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(dot_product_attention, "tensor_parallel", SimpleNamespace(get_cuda_rng_tracker=lambda: tracker))
    monkeypatch.setattr(fused_softmax, "get_default_causal_mask", causal)
    monkeypatch.setattr(fused_softmax, "get_sliding_window_causal_mask", window)


def _config(heads: int, groups: int, dtype=torch.float32, head_dim: int = 24, **overrides):
    from msa_megatron.megatron.model import make_transformer_config

    values = dict(num_layers=2, hidden_size=heads * head_dim, num_attention_heads=heads, num_query_groups=groups,
                  kv_channels=head_dim, ffn_hidden_size=64, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    values.update(overrides)
    return make_transformer_config(None, **values)


def _pair(cfg, mask_type=None, layer_number: int = 1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from msa_megatron.megatron.dense_attention import SDPADotProductAttention

    mask_type = AttnMaskType.causal if mask_type is None else mask_type
    ours = SDPADotProductAttention(cfg, layer_number, mask_type, "self", pg_collection=PGS)
    stock = DotProductAttention(cfg, layer_number, mask_type, "self", pg_collection=PGS)
    return ours, stock


def _qkv(s: int, b: int, heads: int, groups: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=g)
    k = torch.randn(s, b, groups, d, generator=g)
    v = torch.randn(s, b, groups, d, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(module, qkv, mask=None, **kwargs):
    q, k, v = [t.detach().clone().requires_grad_() for t in qkv]
    out = module(q, k, v, mask, **kwargs)
    g = torch.Generator().manual_seed(99)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 2)], ids=["gqa1", "gqa2", "gqa4"])
@pytest.mark.parametrize("seq", [37, 100])
def test_forward_backward_equal_megatron_dot_product_attention(memory_buffer, dtype, heads, groups, seq):
    cfg = _config(heads, groups, dtype)
    ours, stock = _pair(cfg)
    qkv = _qkv(seq, 2, heads, groups, cfg.kv_channels, dtype, seed=seq + heads + groups)
    out, grads = _run(ours, qkv)
    ref_out, ref_grads = _run(stock, qkv)
    assert out.shape == (seq, 2, heads * cfg.kv_channels)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name, a, e in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")
    if dtype == torch.bfloat16:  # and no further from the exact (fp32) result than Megatron's bf16 path is
        exact, exact_grads = _run(_pair(_config(heads, groups))[1], [t.float() for t in qkv])
        for a, e, x in zip([out, *grads], [ref_out, *ref_grads], [exact, *exact_grads]):
            ours_err, stock_err = (a - x).pow(2).mean().sqrt().item(), (e - x).pow(2).mean().sqrt().item()
            assert ours_err <= 1.5 * stock_err + 1e-4, (ours_err, stock_err)
    if dtype == torch.float32:  # the comparison is not vacuous: a wrong scale is far outside the tolerance
        from megatron.core.transformer.enums import AttnMaskType

        from msa_megatron.megatron.dense_attention import SDPADotProductAttention

        off = SDPADotProductAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=PGS,
                                      softmax_scale=0.9 / cfg.kv_channels ** 0.5)
        assert (_run(off, qkv)[0] - ref_out).abs().max() > 100 * TOL[dtype]["atol"]


def test_query_key_layer_scaling_and_explicit_scale(memory_buffer):
    # fp16 models use layer scaling; the effective scale is unchanged (divided, then multiplied back).
    cfg = _config(4, 2, apply_query_key_layer_scaling=True, fp16=False)
    ours, stock = _pair(cfg, layer_number=3)
    qkv = _qkv(29, 1, 4, 2, cfg.kv_channels, torch.float32, seed=5)
    torch.testing.assert_close(_run(ours, qkv)[0], _run(stock, qkv)[0], **TOL[torch.float32])
    from megatron.core.transformer.enums import AttnMaskType

    from msa_megatron.megatron.dense_attention import SDPADotProductAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    a = SDPADotProductAttention(_config(4, 2), 1, AttnMaskType.causal, "self", softmax_scale=0.05, pg_collection=PGS)
    b = DotProductAttention(_config(4, 2), 1, AttnMaskType.causal, "self", softmax_scale=0.05, pg_collection=PGS)
    torch.testing.assert_close(_run(a, qkv)[0], _run(b, qkv)[0], **TOL[torch.float32])


def test_padding_mask_and_no_mask(memory_buffer):
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _config(4, 2)
    qkv = _qkv(23, 2, 4, 2, cfg.kv_channels, torch.float32, seed=11)
    # Megatron's convention: True = masked out; every query keeps at least its first key.
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 23, 23, generator=g) < 0.4
    mask[..., 0] = False
    ours, stock = _pair(cfg, AttnMaskType.padding)
    out, grads = _run(ours, qkv, mask)
    ref_out, ref_grads = _run(stock, qkv, mask)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, **TOL[torch.float32])
    ours, stock = _pair(cfg, AttnMaskType.no_mask)
    torch.testing.assert_close(_run(ours, qkv)[0], _run(stock, qkv)[0], **TOL[torch.float32])
    # A causal layer ignores a passed mask (as TE and the fused causal softmax do) and says so.
    ours, _ = _pair(cfg)
    torch.testing.assert_close(_run(ours, qkv, mask)[0], _run(ours, qkv)[0], atol=0, rtol=0)


def test_one_decoding_query_sees_every_key(memory_buffer):
    cfg = _config(4, 2)
    ours, stock = _pair(cfg)
    q = torch.randn(1, 2, 4, cfg.kv_channels)
    k, v = torch.randn(2, 9, 2, 2, cfg.kv_channels).unbind(0)
    torch.testing.assert_close(ours(q, k, v, None), stock(q, k, v, None), **TOL[torch.float32])


def test_refusals_name_the_field_and_allowed_values(memory_buffer):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from msa_megatron.megatron.dense_attention import SDPADotProductAttention

    cfg = _config(4, 2)
    with pytest.raises(ValueError, match="attention_type='cross' is not supported .* allowed value is 'self'"):
        SDPADotProductAttention(cfg, 1, AttnMaskType.causal, "cross", pg_collection=PGS)
    with pytest.raises(ValueError, match="attn_mask_type=AttnMaskType.padding_causal .* allowed values are causal, "
                                         "no_mask, padding, arbitrary"):
        SDPADotProductAttention(cfg, 1, AttnMaskType.padding_causal, "self", pg_collection=PGS)
    ours, _ = _pair(cfg)
    q, k, v = _qkv(8, 1, 4, 2, cfg.kv_channels, torch.float32, seed=1)
    # packed sequences take the document path (tests/megatron/test_packed_backend.py); bad ones are one error
    with pytest.raises(ValueError, match="packed_seq_params.qkv_format='bshd' .* allowed values are 'thd', 'sbhd'"):
        ours(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="bshd"))
    with pytest.raises(NotImplementedError, match="attention_bias is not supported"):
        ours(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="causal SDPA attention needs as many queries as keys"):
        ours(q[:3], k, v, None)
    padded, _ = _pair(cfg, AttnMaskType.padding)
    with pytest.raises(ValueError, match="attn_mask_type=padding needs an attention_mask"):
        padded(q, k, v, None)
    with pytest.raises(ValueError, match="allowed dtype is torch.bool"):
        padded(q, k, v, torch.zeros(1, 1, 8, 8))


def test_unfused_settings_run_megatrons_attention_and_say_so(memory_buffer, caplog):
    from msa_megatron.megatron import dense_attention

    cfg = _config(4, 2, window_size=(4, 0))
    ours, stock = _pair(cfg)
    qkv = _qkv(19, 1, 4, 2, cfg.kv_channels, torch.float32, seed=2)
    dense_attention._announced.discard("unfused-window_size=(4, 0)")
    with caplog.at_level(logging.WARNING, logger="msa_megatron.megatron"):
        out = _run(ours, qkv)[0]
    assert "window_size=(4, 0) cannot run on torch SDPA; Megatron's unfused DotProductAttention runs" in caplog.text
    torch.testing.assert_close(out, _run(stock, qkv)[0], atol=0, rtol=0)


def test_logs_what_runs_once(memory_buffer, caplog):
    from msa_megatron.megatron import dense_attention

    ours, _ = _pair(_config(4, 2))
    qkv = _qkv(11, 1, 4, 2, 24, torch.float32, seed=4)
    dense_attention._announced.discard("sdpa-cpu-torch.float32")
    with caplog.at_level(logging.INFO, logger="msa_megatron.megatron"):
        _run(ours, qkv)
        _run(ours, qkv)
    lines = [r.getMessage() for r in caplog.records if "torch SDPA on cpu float32" in r.getMessage()]
    assert len(lines) == 1 and "causal, GQA 4:2, head dim 24" in lines[0], lines


# ----------------------------------------------------------------------------- whole GPT (spawned)
def _gpt_cases(rank: int, tmp: str):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from mcore_helpers import batch, gpt, load_full_state, msa_settings, quiet, start, tiny_config
    from msa_megatron.megatron import load_model_checkpoint, save_model_checkpoint, set_attention_mode
    from msa_megatron.megatron.dense_attention import SDPADotProductAttention
    from msa_megatron.megatron.specs import MSALocalSpecProvider

    quiet()
    start(seed=17)
    out = {}

    def stock_model(cfg):
        product = MSALocalSpecProvider.core_attention
        MSALocalSpecProvider.core_attention = lambda self: DotProductAttention  # Megatron's own choice
        try:
            return gpt(cfg)
        finally:
            MSALocalSpecProvider.core_attention = product

    def loss_and_grads(model, seq):
        model.zero_grad(set_to_none=True)
        tokens, pos, labels = batch(seed=seq, seq=seq)
        loss = model(tokens, pos, None, labels=labels)
        loss.float().mean().backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def compare(cfg, seq, modes=(None,)):
        new = gpt(cfg)
        old = stock_model(cfg)
        cores = [type(m) for m in new.modules() if isinstance(m, DotProductAttention)]
        assert cores and all(c is SDPADotProductAttention for c in cores), cores
        assert not any(isinstance(m, SDPADotProductAttention) for m in old.modules())
        assert list(new.state_dict()) == list(old.state_dict())
        load_full_state(new, {n: p.detach() for n, p in old.named_parameters()})
        worst = 0.0
        for mode in modes:
            if mode is not None:
                set_attention_mode(new, mode)
                set_attention_mode(old, mode)
            (la, ga), (lb, gb) = loss_and_grads(new, seq), loss_and_grads(old, seq)
            assert ga.keys() == gb.keys()
            worst = max([worst, (la - lb).abs().max().item()] + [(ga[n] - gb[n]).abs().max().item() for n in ga])
        return worst

    for groups in (4, 2, 1):  # GQA ratios 1, 2, 4 (4 query heads)
        out[f"dense_gqa{4 // groups}"] = compare(tiny_config(None, num_layers=2, num_query_groups=groups), seq=37)
    # MSA model: its first layer is dense (always SDPA); the MSA layers' 'dense' mode uses it too.
    out["msa_dense_mode"] = compare(tiny_config(msa_settings(first_dense_layers=1), num_layers=2), seq=45,
                                    modes=("dense", "msa"))

    # A dist checkpoint written by the old spec (DotProductAttention) loads into the new one, and back.
    def same(a, b):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        return pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)

    cfg = tiny_config(None, num_layers=2)
    old = stock_model(cfg)
    save_model_checkpoint(old, f"{tmp}/old")
    new = gpt(cfg)
    out["fresh_model_differs"] = not same(old, new)
    load_model_checkpoint(new, f"{tmp}/old")
    out["ckpt_old_to_new_equal"] = same(old, new)
    save_model_checkpoint(new, f"{tmp}/new")
    again = stock_model(cfg)
    load_model_checkpoint(again, f"{tmp}/new")
    out["ckpt_new_to_old_equal"] = same(new, again)
    return out


@pytest.mark.slow
def test_gpt_uses_sdpa_with_equal_losses_gradients_and_checkpoints(tmp_path):
    res = run_distributed(_gpt_cases, 1, str(tmp_path), env=ENV, timeout=300)[0]
    for case in ("dense_gqa1", "dense_gqa2", "dense_gqa4", "msa_dense_mode"):
        assert res[case] < 2e-5, (case, res[case])  # fp32 models: loss and every parameter gradient
    assert res["fresh_model_differs"] and res["ckpt_old_to_new_equal"] and res["ckpt_new_to_old_equal"], res


# ----------------------------------------------------------------------------- GPU (skipped on CPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sdpa_uses_a_fused_kernel_and_no_s_by_s_memory(monkeypatch, caplog):
    """At 8K tokens (16 heads of 64, GQA 4, bf16) Megatron's unfused attention allocates the
    16 x 8K x 8K scores (2 GiB in bf16, more with the fp32 softmax); SDPA must not: its peak
    above the inputs stays under 1/8 of the unfused path's, with the same output and gradients
    (relative L2 error < 2e-2 between the two bf16 paths)."""
    from megatron.core import parallel_state
    from megatron.core.transformer import dot_product_attention

    from msa_megatron.megatron import dense_attention

    class _CUDABuffer:
        def get_tensor(self, shape, dtype, name):
            return torch.empty(shape, dtype=dtype, device="cuda")

    tracker = SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: _CUDABuffer())
    monkeypatch.setattr(dot_product_attention, "tensor_parallel", SimpleNamespace(get_cuda_rng_tracker=lambda: tracker))
    cfg = _config(16, 4, torch.bfloat16, head_dim=64, masked_softmax_fusion=False)
    ours, stock = _pair(cfg)
    q, k, v = [t.cuda().detach().requires_grad_() for t in _qkv(8192, 1, 16, 4, 64, torch.bfloat16, seed=8)]
    cotangent = torch.randn(8192, 1, 16 * 64, generator=torch.Generator().manual_seed(9)).to("cuda", torch.bfloat16)

    def peak(module):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = module(q, k, v, None)
        out.backward(cotangent)
        torch.cuda.synchronize()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        return out.detach().float(), grads, torch.cuda.max_memory_allocated() - base

    dense_attention._announced.discard("sdpa-cuda-torch.bfloat16")
    with caplog.at_level(logging.INFO, logger="msa_megatron.megatron"):
        out, grads, ours_peak = peak(ours)
    out_ref, grads_ref, stock_peak = peak(stock)
    line = next(r.getMessage() for r in caplog.records if "torch SDPA on cuda" in r.getMessage())
    assert "NONE" not in line and ("flash" in line or "cudnn" in line or "efficient" in line), line
    assert ours_peak * 8 < stock_peak, (ours_peak / 2**20, stock_peak / 2**20)
    # relative L2 errors: both are bf16 paths over 8K keys (elementwise bf16 noise grows with the length)
    for name, a, e in zip(("out", "dq", "dk", "dv"), [out, *grads], [out_ref, *grads_ref]):
        rel = ((a.float() - e.float()).norm() / e.float().norm()).item()
        assert rel < 2e-2, (name, rel)

"""The op's one reverse index per selection (ops/csr.py, issue 16) on the GPU: with the CSR
shared by the index LSE, the KL and the main kernels vs each building its own (the former
behaviour), bf16, 8K tokens, block 128: out, lse and d(q, k, v) bit-identical (deterministic
kernels, same work items in the same order), the KL value (fp32 atomics) to 1e-5 and
d(iq, ik) (fp32 atomics, then rounded to bf16) to 1e-3 relative; and exactly one CSR build per op call. The CPU version at interpreter sizes
is tests/ops/test_csr.py."""

import pytest
import torch

from msa_megatron.config import MSAConfig

pytestmark = pytest.mark.gpu


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("spec", ["main_impl=kv", "main_impl=kv,kl_fused=1", "main_impl=union",
                                  "main_impl=kv,chunk_queries=1024"])
def test_shared_csr_is_bit_identical(monkeypatch, spec):
    from msa_megatron.ops import csr as C
    from msa_megatron.ops import triton_op as OP
    from msa_megatron.ops import triton_sparse_attn as T

    L, hq, g, d, di = 8192, 16, 2, 128, 64
    cfg = MSAConfig(block_size=128, topk=8, index_dim=di)
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen).bfloat16().requires_grad_()  # noqa: E731
    leaves = [mk(1, L, hq, d), mk(1, L, g, d), mk(1, L, g, d), mk(1, L, g, di), mk(1, L, di)]
    dout = torch.randn(1, L, hq, d, device="cuda", generator=gen).bfloat16()
    kc = T.KernelConfig.from_spec(spec)
    calls = []
    real_build = C.build_csr

    def counted(block_idx, nb):
        calls.append(1)
        return real_build(block_idx, nb)

    monkeypatch.setattr(C, "build_csr", counted)
    monkeypatch.setattr(OP, "build_csr", counted)

    def run():
        out, aux = OP.msa_attention_triton(*leaves, cfg, mode="msa", kernel_config=kc)
        gr = torch.autograd.grad((out.float() * dout.float()).sum() + 3.0 * aux.kl, leaves)
        torch.cuda.synchronize()
        return out, aux, gr

    out, aux, gr = run()
    assert len(calls) == 1, f"{len(calls)} CSR builds in one op call"
    real_select = OP._select
    monkeypatch.setattr(OP, "_select", lambda *a, **k: real_select(*a, **k)[:3] + (None,))
    out2, aux2, gr2 = run()
    assert torch.equal(aux.block_idx, aux2.block_idx)
    assert torch.equal(out, out2) and torch.equal(aux.lse, aux2.lse)
    for name, x, y in zip(["dq", "dk", "dv"], gr[:3], gr2[:3]):
        assert torch.equal(x, y), name
    assert rel(aux.kl, aux2.kl) < 1e-5
    for name, x, y in zip(["d_iq", "d_ik"], gr[3:], gr2[3:]):  # fp32 atomics, then one bf16 rounding
        assert rel(x, y) < 1e-3, name

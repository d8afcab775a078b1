"""ops/tuning.py: one k=v syntax and one env variable per kernel config family, clear errors,
the deprecated index variables still working (one warning each), old import paths intact."""

import warnings

import pytest

from msa_megatron.config import ConfigError
from msa_megatron.ops import tuning
from msa_megatron.ops.tuning import IndexConfig, KernelConfig, KernelConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("MSA_MAIN_KERNEL", "MSA_INDEX_KERNEL", "MSA_INDEX_TILES", "MSA_KL_TILES", "MSA_INDEX_FP8",
                 "MSA_INDEX_LAZY_TOPK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tuning, "_warned", set())


def test_old_import_paths_are_the_same_classes():
    from msa_megatron.ops import triton_index as TI
    from msa_megatron.ops import triton_sparse_attn as T

    assert T.KernelConfig is KernelConfig and TI.IndexConfig is IndexConfig
    assert T.default_config() == KernelConfig()


@pytest.mark.parametrize("cls", [KernelConfig, IndexConfig])
def test_from_spec_parses_every_type(cls):
    if cls is KernelConfig:
        c = cls.from_spec(" fwd_rows=32, lpt_order=0,union_max_blocks=12.5,main_impl=kv,kl_fused=yes ")
        assert (c.fwd_rows, c.lpt_order, c.union_max_blocks, c.main_impl, c.kl_fused) == (32, False, 12.5, "kv", True)
    else:
        c = cls.from_spec("sel_block_m=64,lazy_topk=false,fp8_prefill=1")
        assert (c.sel_block_m, c.lazy_topk, c.fp8_prefill) == (64, False, True)
    assert cls.from_spec("") == cls()
    assert cls.from_spec("", c) == c  # applied over a base


@pytest.mark.parametrize("spec, match", [
    ("fwd_rowz=64", r"KernelConfig: unknown field='fwd_rowz': allowed values are fwd_impl, fwd_rows"),
    ("fwd_rows=abc", r"KernelConfig.fwd_rows='abc': allowed values are an integer"),
    ("fwd_rows=48", r"KernelConfig.fwd_rows=48: allowed values are a power of 2 >= 16"),
    ("lpt_order=maybe", r"KernelConfig.lpt_order='maybe': allowed values are 0, 1, true, false, yes, no"),
    ("main_impl=bogus", r"KernelConfig.main_impl='bogus': allowed values are 'auto', 'union', 'kv'"),
    ("bwd_warps=3", r"KernelConfig.bwd_warps=3: allowed values are 1, 2, 4, 8, 16"),
    ("union_max_blocks=x", r"KernelConfig.union_max_blocks='x': allowed values are a number"),
    ("fwd_rows", r"KernelConfig.fwd_rows='fwd_rows': allowed values are fwd_rows=<value>"),
])
def test_kernel_config_errors_name_field_and_allowed(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        KernelConfig.from_spec(spec)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KernelConfigError)


def test_index_config_errors():
    with pytest.raises(ConfigError, match=r"IndexConfig: unknown field='tiles': allowed values are sel_block_m"):
        IndexConfig.from_spec("tiles=1")
    with pytest.raises(ConfigError, match=r"IndexConfig.sel_stages=0: allowed values are a positive integer"):
        IndexConfig(sel_stages=0)
    with pytest.raises(ConfigError, match=r"IndexConfig.kl_warps=3: allowed values are 1, 2, 4, 8, 16"):
        IndexConfig.from_spec("kl_warps=3")


def test_env_variables_use_the_same_syntax(monkeypatch):
    monkeypatch.setenv("MSA_MAIN_KERNEL", "bwd_rows=32,kl_fused=1")
    assert KernelConfig.from_env() == KernelConfig(bwd_rows=32, kl_fused=True)
    monkeypatch.setenv("MSA_MAIN_KERNEL", "bwd_rows=33")
    with pytest.raises(ConfigError, match=r"MSA_MAIN_KERNEL.bwd_rows=33: allowed values are a power of 2"):
        KernelConfig.from_env()
    monkeypatch.setenv("MSA_INDEX_KERNEL", "sel_warps=4,lazy_topk=0")
    assert IndexConfig.from_spec(tuning.index_env_overrides()) == IndexConfig(sel_warps=4, lazy_topk=False)


@pytest.mark.parametrize("name, value, expect", [
    ("MSA_INDEX_TILES", "64,4,3", dict(sel_block_m=64, sel_warps=4, sel_stages=3)),
    ("MSA_KL_TILES", "32,64,4,1", dict(items_block_q=32, kl_block_n=64, kl_warps=4, kl_stages=1)),
    ("MSA_INDEX_FP8", "1", dict(fp8_prefill=True)),
    ("MSA_INDEX_LAZY_TOPK", "0", dict(lazy_topk=False)),
])
def test_deprecated_index_variables_warn_once_with_the_new_spelling(monkeypatch, name, value, expect):
    monkeypatch.setenv(name, value)
    with pytest.warns(DeprecationWarning, match=f"{name}={value} is deprecated.*use MSA_INDEX_KERNEL=\""):
        spec = tuning.index_env_overrides()
    assert IndexConfig.from_spec(spec) == IndexConfig(**expect)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read is silent
        assert tuning.index_env_overrides() == spec


def test_deprecated_variables_keep_their_old_meaning(monkeypatch):
    monkeypatch.setenv("MSA_INDEX_FP8", "0")  # only "1" turned FP8 on
    monkeypatch.setenv("MSA_INDEX_LAZY_TOPK", "1")  # only "0" turned the lazy update off
    assert tuning.index_env_overrides() == ""
    monkeypatch.setenv("MSA_INDEX_TILES", "64,4")
    with pytest.raises(ConfigError, match=r"MSA_INDEX_TILES='64,4': allowed values are 3 comma-separated values"):
        tuning.index_env_overrides()


def test_new_variable_wins_over_the_old_one(monkeypatch):
    monkeypatch.setenv("MSA_INDEX_TILES", "64,4,3")
    monkeypatch.setenv("MSA_INDEX_KERNEL", "sel_stages=1")
    with pytest.warns(DeprecationWarning):
        cfg = IndexConfig.from_spec(tuning.index_env_overrides())
    assert (cfg.sel_block_m, cfg.sel_stages) == (64, 1)


def test_interpreter_takes_only_the_fp8_switch(monkeypatch):
    """Off CUDA the index kernels keep the interpreter's tiles (as before); fp8_prefill still applies."""
    import torch

    from msa_megatron.ops import triton_index as TI

    monkeypatch.setenv("MSA_INDEX_KERNEL", "sel_block_m=256,fp8_prefill=1")
    lc = TI._launch_config(torch.device("cpu"))
    assert lc.sel_block_m == 64 and lc.fp8_prefill
    monkeypatch.setenv("MSA_INDEX_KERNEL", "sel_block_m=0")
    with pytest.raises(ConfigError, match="sel_block_m"):  # still checked
        TI._launch_config(torch.device("cpu"))

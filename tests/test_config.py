"""MSAConfig: defaults are the paper's; every bad value names the field and the allowed values."""

import pytest

from msa_megatron import MSAConfig, MSAConfigError
from msa_megatron.config import msa_layer_pattern


def test_defaults_are_the_papers():
    c = MSAConfig()
    assert (c.block_size, c.topk, c.index_dim, c.init_blocks, c.local_blocks) == (128, 16, 128, 0, 1)
    assert c.budget_tokens == 2048 and c.mode == "msa"


@pytest.mark.parametrize("field,value,allowed", [
    ("block_size", 100, "multiple of 16"),
    ("block_size", 0, "multiple of 16"),
    ("topk", 0, ">= 1"),
    ("index_dim", 12, "multiple of 16"),
    ("mode", "sparse", "dense, msa_warmup, msa"),
    ("backend", "cuda", "auto, reference, triton"),
    ("kl_coeff", -1.0, ">= 0"),
    ("kl_coeff", float("nan"), ">= 0"),
    ("local_blocks", 0, ">= 1"),
    ("init_blocks", -1, ">= 0"),
    ("msa_layers", [1, 1], "repeated"),
    ("msa_layers", [-2], "0-based"),
    ("index_rope", "yes", "true or false"),
])
def test_invalid_values_name_field_and_allowed(field, value, allowed):
    with pytest.raises(MSAConfigError) as e:
        MSAConfig(**{field: value})
    assert f"msa.{field}=" in str(e.value) and allowed in str(e.value)
    assert e.value.field_name == field


def test_topk_must_cover_forced_blocks():
    with pytest.raises(MSAConfigError, match="init_blocks \\+ local_blocks"):
        MSAConfig(topk=2, init_blocks=1, local_blocks=2)


def test_model_dependent_checks():
    c = MSAConfig(msa_layers=[0, 5])
    with pytest.raises(MSAConfigError, match=r"msa.msa_layers.*\[0, 3\]"):
        c.validate_for_model(num_layers=4, num_kv_heads=4)
    with pytest.raises(MSAConfigError, match="num_index_heads.*4"):
        MSAConfig(num_index_heads=2).validate_for_model(num_layers=4, num_kv_heads=4)
    with pytest.raises(MSAConfigError, match="tensor-parallel size 8"):
        MSAConfig().validate_for_model(num_layers=4, num_kv_heads=4, tp_size=8)
    filled = MSAConfig(first_dense_layers=3).for_model(num_layers=41, num_kv_heads=4, tp_size=4)
    assert filled.num_index_heads == 4
    assert msa_layer_pattern(filled, 41) == [False] * 3 + [True] * 38


def test_from_dict_rejects_unknown_keys_and_roundtrips():
    c = MSAConfig(topk=8, msa_layers=[2, 1])
    assert c.msa_layers == [1, 2]
    assert MSAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(MSAConfigError, match="msa.top_k.*existing field"):
        MSAConfig.from_dict({"top_k": 8})


def test_one_config_error_family():
    """config.ConfigError is the package's one config error: MSAConfigError and the Megatron-LM
    flag error are subclasses with the same fields, so one ``except ConfigError`` catches all."""
    from msa_megatron.config import ConfigError
    from msa_megatron.megatron_lm.args import MSAArgumentError

    with pytest.raises(ConfigError) as info:
        MSAConfig(topk=0)
    e = info.value
    assert isinstance(e, MSAConfigError) and isinstance(e, ValueError)
    assert (e.field, e.path, e.field_name, e.value) == ("msa.topk", "msa.topk", "topk", 0)
    assert str(e).startswith("msa.topk=0 is invalid: allowed values are ")
    flag = MSAArgumentError("--msa-topk", 0, "an integer >= 1", "topk")
    assert isinstance(flag, ConfigError) and flag.field == "--msa-topk" and flag.msa_field == "topk"
    assert str(flag) == "--msa-topk=0 is invalid (MSAConfig.topk): allowed values are an integer >= 1"
    plain = ConfigError("data.seq_length", -1, "an integer > 0")
    assert str(plain) == "data.seq_length=-1 is invalid: allowed values are an integer > 0"
    plain.path = "data.seq_len"  # subclasses that set .path (msa-train's UsageError) keep working
    assert plain.field == "data.seq_len"

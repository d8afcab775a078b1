"""MSA on Megatron-LM's command line: the --msa-* flags are MSAConfig's fields, parsed and
validated by Megatron-LM's own parse_args/validate_args, and reach the config the MSA layers
read through Megatron-LM's core_transformer_config_from_args. Bad values fail naming the flag
and the allowed values. In-process (Megatron-LM's argument code needs no CUDA)."""

from __future__ import annotations

import dataclasses

import pytest

from mlm_helpers import BASE_ARGV, MSA_ARGV, megatron_parser, parse
from msa_megatron import MSAConfig
from msa_megatron.megatron_lm.args import FIELD_FLAGS, FLAGS, MSAArgumentError, option_of_field


def test_one_flag_per_msa_config_field():
    assert [fl.field for fl in FIELD_FLAGS] == [f.name for f in dataclasses.fields(MSAConfig)]
    options = {fl.field: fl.option for fl in FIELD_FLAGS}
    assert options["block_size"] == "--msa-block-size" and options["msa_layers"] == "--msa-layers"
    assert options["kl_coeff"] == "--msa-kl-coeff" and options["recall_interval"] == "--msa-recall-interval"
    assert {fl.option for fl in FLAGS} - set(options.values()) == {"--msa-warmup-iters", "--msa-warmup-tokens"}


def test_parser_has_the_msa_group_and_variant():
    parser = megatron_parser()
    variant = next(a for a in parser._actions if a.dest == "experimental_attention_variant")
    assert set(variant.choices) == {"gated_delta_net", "dsa", "msa"}
    text = parser.format_help()
    for fl in FLAGS:
        assert fl.option in text
    assert "--no-msa-index-rope" in text and "{dense,msa_warmup,msa}" in text
    assert "Selection recall needs a dense pass" in text  # help comes from MSAConfig's field comments


def test_flags_map_onto_the_config_the_layers_read(monkeypatch):
    from megatron.training.argument_utils import core_transformer_config_from_args

    from msa_megatron.megatron import MSATransformerConfig

    args = parse(BASE_ARGV + MSA_ARGV + [
        "--msa-block-size", "64", "--msa-topk", "4", "--msa-index-dim", "32", "--msa-init-blocks", "1",
        "--msa-local-blocks", "2", "--msa-kl-coeff", "0.5", "--msa-layers", "3", "1", "--msa-backend", "reference",
        "--msa-mode", "msa", "--msa-recall-interval", "7", "--no-msa-index-rope", "--no-msa-track-entropy",
        "--msa-warmup-iters", "5"], monkeypatch)
    expected = MSAConfig(block_size=64, topk=4, index_dim=32, init_blocks=1, local_blocks=2, kl_coeff=0.5,
                         msa_layers=[1, 3], backend="reference", mode="msa", recall_interval=7, index_rope=False,
                         track_entropy=False)
    assert args.msa == expected.to_dict() and isinstance(args.msa, dict)  # plain data in checkpoint args
    assert args.msa_warmup_iters == 5 and args.msa_warmup_tokens is None
    config = core_transformer_config_from_args(args, config_class=MSATransformerConfig)
    assert isinstance(config, MSATransformerConfig) and config.experimental_attention_variant == "msa"
    assert config.msa == expected.replace(num_index_heads=2)
    assert config.msa_layer_indices == [1, 3] and config.num_query_groups == 2


def test_defaults_are_msa_configs(monkeypatch):
    from msa_megatron.megatron_lm import transformer_config_from_args

    args = parse(BASE_ARGV + MSA_ARGV + ["--msa-first-dense-layers", "1"], monkeypatch)
    assert args.msa == MSAConfig(first_dense_layers=1).to_dict()
    assert transformer_config_from_args(args).msa_layer_indices == [1, 2, 3]


def test_without_msa_nothing_changes(monkeypatch):
    from msa_megatron.megatron_lm import transformer_config_from_args

    args = parse(BASE_ARGV, monkeypatch)
    assert args.msa is None and args.experimental_attention_variant is None
    config = transformer_config_from_args(args)
    assert config.msa is None and config.experimental_attention_variant is None
    assert config.experimental_attention_variant_loss_scale_func is None


@pytest.mark.parametrize("extra, name, allowed", [
    (["--msa-block-size", "100"], "--msa-block-size=100", "a positive multiple of 16"),
    (["--msa-topk", "0"], "--msa-topk=0", "an integer >= 1"),
    (["--msa-init-blocks", "2", "--msa-topk", "2"], "--msa-topk=2", "an integer >= init_blocks + local_blocks = 3"),
    (["--msa-kl-coeff", "-1"], "--msa-kl-coeff=-1.0", "a finite float >= 0"),
    (["--msa-layers", "1", "4"], "--msa-layers=[1, 4]", "layer indices in [0, 3] (the model has 4 layers)"),
    (["--msa-first-dense-layers", "5"], "--msa-first-dense-layers=5", "an integer in [0, 4]"),
    (["--msa-num-index-heads", "8"], "--msa-num-index-heads=8", "2 (one index head per KV group) or null"),
    (["--msa-warmup-iters", "-1"], "--msa-warmup-iters=-1", "an integer >= 0"),
    (["--msa-warmup-iters", "3", "--msa-warmup-tokens", "9"], "--msa-warmup-tokens=9",
     "unset when --msa-warmup-iters is given"),
])
def test_bad_values_name_the_flag_and_the_allowed_values(extra, name, allowed, monkeypatch):
    with pytest.raises(MSAArgumentError) as err:
        parse(BASE_ARGV + MSA_ARGV + extra, monkeypatch)
    assert str(err.value).startswith(name + " is invalid") and allowed in str(err.value)


def test_msa_flags_need_the_variant(monkeypatch):
    with pytest.raises(MSAArgumentError, match=r"--msa-topk=4 is invalid: allowed values are unset unless "
                                                r"--experimental-attention-variant msa \(it is None\)"):
        parse(BASE_ARGV + ["--msa-topk", "4"], monkeypatch)
    with pytest.raises(MSAArgumentError, match="--msa-warmup-iters=3 is invalid"):
        parse(BASE_ARGV + ["--msa-warmup-iters", "3"], monkeypatch)


@pytest.mark.parametrize("extra, message", [
    (["--msa-mode", "sparse"], "argument --msa-mode: invalid choice: 'sparse' (choose from dense, msa_warmup, msa)"),
    (["--msa-backend", "cuda"], "argument --msa-backend: invalid choice: 'cuda' (choose from auto, reference, triton)"),
    (["--msa-block-size", "big"], "argument --msa-block-size: invalid int value: 'big'"),
    (["--experimental-attention-variant", "nsa"], "argument --experimental-attention-variant: invalid choice: 'nsa'"),
])
def test_argparse_level_errors(extra, message, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(BASE_ARGV + extra, monkeypatch)
    assert message in capsys.readouterr().err.replace("'dense', 'msa_warmup', 'msa'", "dense, msa_warmup, msa") \
        .replace("'auto', 'reference', 'triton'", "auto, reference, triton")


def test_megatron_settings_msa_refuses_name_their_flag(monkeypatch):
    # Megatron-LM's default --attention-dropout is 0.1; MSATransformerConfig refuses it at
    # argument time, restated with the flag.
    with pytest.raises(ValueError, match=r"^--attention-dropout: attention_dropout=0.1 is not supported with msa"):
        parse(BASE_ARGV + ["--experimental-attention-variant", "msa"], monkeypatch)


def test_option_of_field_round_trip():
    for fl in FIELD_FLAGS:
        assert option_of_field(fl.field) == fl.option


def test_config_errors_are_restated_with_their_flag():
    from types import SimpleNamespace

    from msa_megatron import MSAConfigError
    from msa_megatron.megatron_lm.args import explain_config_error

    args = SimpleNamespace(attention_dropout=0.1)
    restated = explain_config_error(MSAConfigError("topk", 0, "an integer >= 1"), args)
    assert isinstance(restated, MSAArgumentError) and str(restated).startswith("--msa-topk=0 is invalid")
    assert str(explain_config_error(ValueError("attention_dropout=0.1 is not supported"), args)) == \
        "--attention-dropout: attention_dropout=0.1 is not supported"
    other = MSAConfigError("msa", None, "an MSAConfig")  # not a flag: left as it is
    assert explain_config_error(other, args) is other
    unrelated = AssertionError("num_layers must be divisible")
    assert explain_config_error(unrelated, args) is unrelated


def test_sequence_length_is_checked_against_the_sp_layout(monkeypatch):
    import megatron.training.arguments as arguments

    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)  # asked at TP > 1 (Hopper)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    argv = list(BASE_ARGV)
    argv[argv.index("--seq-length") + 1] = argv[argv.index("--max-position-embeddings") + 1] = "511"
    with pytest.raises(ValueError, match=r"^--seq-length: seq_length=511 cannot be split with context_parallel_size=1, "
                                         r"tensor_model_parallel_size=2, sequence_parallel=True"):
        parse(argv + MSA_ARGV + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], monkeypatch, world_size=2)

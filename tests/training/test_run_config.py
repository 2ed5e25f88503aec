"""The typed run config: every bad value is refused at load time with its dotted path."""

from pathlib import Path

import pytest

from keras_transformer.decoding.settings import DecodeSettings
from training.run_config import ConfigError, dump_run_config, load_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "training" / "configs"
TINY = CONFIGS / "tiny.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=2k", "train.max_steps: expected an integer, got '2k'"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.save_every_steps=0", "train.save_every_steps: must be at least 1, got 0"),
        ("train.log_every_steps=-5", "train.log_every_steps: must be at least 1, got -5"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch: must be at least 1, got 0"),
        ("train.warmup_steps=0", "train.warmup_steps: must be at least 1, got 0"),
        ("train.eval_every_steps=-1", "train.eval_every_steps: must be at least 0, got -1"),
        ("train.max_minutes=0", "train.max_minutes: must be greater than 0, got 0.0"),
        ("train.max_minutes=-3", "train.max_minutes: must be greater than 0, got -3.0"),
        ("train.learning_rate_scale=0", "train.learning_rate_scale: must be greater than 0"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience: must be at least 1"),
        (
            "train.mixed_precision=fp16",
            "train.mixed_precision: expected one of 'mixed_bfloat16', 'mixed_float16', 'auto' or "
            "null, "
            "got 'fp16'",
        ),
        ("train.strategy=multi_worker", "train.strategy: expected one of 'default', 'mirrored'"),
        ("train.jit_compile=maybe", "train.jit_compile: expected true or false or 'auto'"),
        ("data.batch_tokens=lots", "data.batch_tokens: expected an integer, got 'lots'"),
        ("data.vocab_model_type=char", "data.vocab_model_type: expected one of 'unigram', 'bpe'"),
        ("data.cache=3", "data.cache: expected true or false or a string, got 3"),
        (
            "data.length_multiple=fast",
            "data.length_multiple: expected an integer or 'auto' or null, got 'fast'",
        ),
        ("data.length_multiple=0", "data.length_multiple: must be at least 1, got 0"),
        ("data.train={split: train}", "data.train: a corpus mapping needs a 'spec' key"),
        ("model.d_model=2k", "model.d_model: expected an integer, got '2k'"),
        ("model.dropout=high", "model.dropout: expected a number, got 'high'"),
        ("model.d_model=30", "divisible by num_heads"),
        ("model.preset=huge", "Unknown preset 'huge'"),
        ("decode.beam_size=2.5", "decode.beam_size: expected an integer, got 2.5"),
        ("decode.beam_size=0", "decode section .*beam_size must be a positive integer, got 0"),
        ("decode.length_penalty_alpha=-1", "decode section .*length_penalty_alpha must be"),
        ("decode.extra_length=-1", "decode section .*extra_length must be a non-negative"),
        ("decode.nbest=5", r"decode section .*nbest must be in \[1, beam_size=4\], got 5"),
        ("train.max_stepz=3", "Unknown config key 'train.max_stepz' in --set"),
        ("decode.beam=3", "Unknown config key 'decode.beam'"),
        ("model.d_modle=32", "Unknown config key 'model.d_modle'"),
        ("optimizer.beta=0.9", "Unknown config section 'optimizer'"),
        ("max_steps=3", "--set expects section.key=value"),
    ],
)
def test_a_bad_value_is_refused_naming_its_path_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config([TINY], [override])


def test_an_unknown_key_in_a_file_names_the_file(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  eval_evry_steps: 5\n")
    with pytest.raises(ConfigError, match=f"'train.eval_evry_steps' in {extra}"):
        load_run_config([TINY, extra])
    extra.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_run_config([TINY, extra])


def test_values_take_their_field_types():
    config = load_run_config(
        [TINY],
        [
            "train.max_steps=1e3",
            "train.max_minutes=2",
            "model.dropout=0",
            "train.jit_compile=false",
        ],
    )
    assert config.train.max_steps == 1000 and type(config.train.max_steps) is int
    assert config.train.max_minutes == 2.0 and type(config.train.max_minutes) is float
    assert type(config.transformer_config().dropout) is float
    assert config.train.jit_compile is False


def test_zero_eval_interval_turns_dev_evaluation_off():
    assert load_run_config([TINY]).dev_evaluation
    assert not load_run_config([TINY], ["train.eval_every_steps=0"]).dev_evaluation
    assert not load_run_config([TINY], ["train.eval_sentences=0"]).dev_evaluation
    assert not load_run_config([TINY], ["data.dev=null"]).dev_evaluation


def test_early_stopping_without_dev_evaluation_is_refused():
    assert load_run_config(
        [TINY], ["train.early_stopping_patience=3"]
    ).train.early_stopping_patience
    with pytest.raises(ConfigError, match="early_stopping_patience is 3 but dev evaluation is off"):
        load_run_config([TINY], ["train.early_stopping_patience=3", "train.eval_every_steps=0"])


def test_null_budget_and_patience_mean_off():
    config = load_run_config([TINY], ["train.max_minutes=null", "train.early_stopping_patience=~"])
    assert config.train.max_minutes is None and config.train.early_stopping_patience is None


def test_data_longer_than_the_model_is_refused_naming_both():
    # tiny.yaml sets model.max_length 64: 65 does not fit.
    with pytest.raises(ConfigError, match=r"data.max_length \(65\) .* model.max_length \(64"):
        load_run_config([TINY], ["data.max_length=65"])
    # The preset's max_length counts when the model section does not set one.
    with pytest.raises(ConfigError, match=r"data.max_length \(100\) .* model.max_length \(40"):
        load_run_config(
            [TINY], ["model.max_length=40", "data.max_length=100", "data.batch_tokens=4096"]
        )


def test_data_max_length_defaults_to_the_model():
    config = load_run_config([TINY], ["data.max_length=null", "model.max_length=32"])
    assert config.data.max_length == 32


def test_a_batch_must_hold_one_pair_of_max_length():
    with pytest.raises(ConfigError, match=r"data.batch_tokens \(40\) .* data.max_length \(48\)"):
        load_run_config([TINY], ["data.batch_tokens=40"])


def test_layers_override_in_order(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  max_steps: 7\nmodel:\n  d_model: 16\ndecode:\n  beam_size: 8\n")
    config = load_run_config([TINY, extra], ["train.max_steps=9", "decode.length_penalty_alpha=1"])
    assert config.train.max_steps == 9
    assert config.model.to_dict() == {"preset": "tiny", "max_length": 64, "d_model": 16}
    assert config.transformer_config().d_model == 16
    assert config.decode == DecodeSettings(beam_size=8, length_penalty_alpha=1.0)
    assert config.train.warmup_steps == 20  # from tiny.yaml, untouched


def test_written_config_reads_back_equal(tmp_path):
    config = load_run_config(
        [TINY], ["decode.beam_size=6", "decode.nbest=2", "data.max_length=null", "model.d_model=16"]
    )
    dump_run_config(config, tmp_path / "run_config.yaml")
    assert load_run_config([tmp_path / "run_config.yaml"]) == config
    config.decode.to_json(tmp_path / "decode_settings.json")
    assert DecodeSettings.from_json(tmp_path / "decode_settings.json") == config.decode


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_decode_as_the_paper(path):
    """Beam 4, outputs up to source + 50 (§6.1); the paper's alpha 0.6 except the Multi30k
    recipe, whose alpha 1.0 was chosen on val (benchmarks/results/averaging_study_*.json)."""
    config = load_run_config([path])
    alpha = 1.0 if path.name == "multi30k_en_de_small.yaml" else 0.6
    assert config.decode == DecodeSettings(beam_size=4, length_penalty_alpha=alpha, extra_length=50)
    assert config.data.max_length <= config.transformer_config().max_length


def test_callbacks_refuse_a_zero_interval(tmp_path):
    from training.callbacks import BleuEvaluator, StepCheckpoints

    with pytest.raises(ValueError, match="every_steps must be a positive number of steps, got 0"):
        BleuEvaluator(tmp_path, None, [], [], every_steps=0)
    with pytest.raises(ValueError, match="got 0"):
        StepCheckpoints(tmp_path, 0)


@pytest.mark.parametrize(
    "backend, length_multiple, jit_compile, devices, expected",
    [
        # Nothing compiles per shape: each batch padded to its longest pair.
        ("tensorflow", "auto", False, 1, None),
        # XLA, JAX and data parallel training need fixed shapes.
        ("tensorflow", "auto", True, 1, 8),
        ("tensorflow", "auto", False, 2, 8),
        ("jax", "auto", True, 1, 8),
        ("jax", "auto", False, 1, 8),
        # A value the config names is kept as it is.
        ("tensorflow", 16, False, 1, 16),
        ("jax", None, True, 1, None),
    ],
)
def test_auto_length_multiple_pads_to_the_longest_pair_only_where_nothing_compiles_per_shape(
    monkeypatch, backend, length_multiple, jit_compile, devices, expected
):
    import keras

    from training.train import resolve_length_multiple

    monkeypatch.setattr(keras.config, "backend", lambda: backend)
    assert resolve_length_multiple(length_multiple, jit_compile, devices) == expected


def test_length_multiple_defaults_to_auto_and_loads_from_yaml():
    assert load_run_config([TINY]).data.length_multiple == "auto"
    assert load_run_config([TINY], ["data.length_multiple=auto"]).data.length_multiple == "auto"
    assert load_run_config([TINY], ["data.length_multiple=null"]).data.length_multiple is None


@pytest.mark.parametrize(
    ("value", "flags", "accelerator_bf16", "expected"),
    [
        ("auto", {"avx2", "avx512f", "avx512_bf16"}, None, "mixed_bfloat16"),
        ("auto", {"avx2", "amx_bf16", "amx_tile"}, None, "mixed_bfloat16"),
        ("auto", {"avx2", "fma", "avx512f"}, None, None),
        ("auto", set(), None, None),
        # An accelerator decides, whatever the host CPU has.
        ("auto", {"avx512_bf16"}, False, None),
        ("auto", set(), True, "mixed_bfloat16"),
        # An explicit setting is kept.
        (None, {"avx512_bf16"}, None, None),
        ("mixed_float16", {"avx512_bf16"}, None, "mixed_float16"),
        ("mixed_bfloat16", set(), None, "mixed_bfloat16"),
    ],
)
def test_auto_mixed_precision_is_bfloat16_only_on_native_bfloat16_hardware(
    value, flags, accelerator_bf16, expected
):
    from training.train import resolve_mixed_precision

    assert resolve_mixed_precision(value, flags, accelerator_bf16) == expected


def test_mixed_precision_loads_auto_and_refuses_other_names():
    assert load_run_config([TINY]).train.mixed_precision is None
    loaded = load_run_config([TINY], ["train.mixed_precision=auto"])
    assert loaded.train.mixed_precision == "auto"
    with pytest.raises(ConfigError, match="train.mixed_precision.*'bf16'"):
        load_run_config([TINY], ["train.mixed_precision=bf16"])

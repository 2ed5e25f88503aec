"""Typed run configs from layered YAML: later files and `--set section.key=value` win.

A run config has four sections: `model` (a preset plus any `TransformerConfig` field), `data`,
`train` and `decode` (a `DecodeSettings`). Every value is checked when the config is loaded: a
wrong type, an unknown key or an out-of-range value is a `ConfigError` naming its dotted path and
the value, before any data is read or any step is trained.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from keras_transformer import TransformerConfig
from keras_transformer.decoding.settings import DecodeSettings
from training.vocab import MODEL_TYPES


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and value."""


def _field(
    default: Any,
    minimum: int | float | None = None,
    exclusive: bool = False,
    below: int | float | None = None,
):
    """A dataclass field whose value must be >= `minimum` (> when `exclusive`) and, when given,
    < `below`; `None` passes."""
    return dataclasses.field(
        default=default, metadata={"minimum": minimum, "exclusive": exclusive, "below": below}
    )


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`model:`: a preset name and the `TransformerConfig` fields that differ from it.

    `vocab_size` is replaced by the tokenizer's at training time.
    """

    preset: str = "small"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def transformer_config(self, vocab_size: int | None = None) -> TransformerConfig:
        fields = dict(self.overrides)
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        return TransformerConfig.preset(self.preset, **fields)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **self.overrides}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`data:`: corpora, vocabulary and batching.

    Attributes:
        train, dev: a corpus spec string (`text:PREFIX`, `tfds:NAME`, ...) or a mapping
            `{spec: ..., options}` for `training.corpus.corpus_from_config`; no `dev`, no dev BLEU.
        vocab: an existing `spm.model` to copy; `None` trains one into the model directory.
        max_length: longest `source_ids`/`target_ids` (special tokens included) kept for
            training; `None` means the model's `max_length`, and more than it is an error.
        cache: `True` caches tokenized ids in memory, a string on disk under that prefix.
        length_multiple: bucket lengths are rounded up to a multiple of this (the last bucket
            ends at `max_length`) and every batch is padded to its bucket's length and batch
            size, so batches come in one fixed shape per bucket and XLA (JAX, `jit_compile`)
            compiles a bounded number of programs; `None` pads each batch to its longest pair
            (variable shapes: fine for TensorFlow without XLA, one compilation per shape on JAX).
            `"auto"` (the default) is `None` where nothing compiles per shape (TensorFlow, the
            train step not XLA-compiled, one device) and 8 otherwise: on Multi30k, padding to
            the bucket takes real target tokens from 95% to 78% of a batch's positions.
    """

    source_lang: str = "en"
    target_lang: str = "de"
    train: str | dict | None = None
    dev: str | dict | None = None
    vocab: str | None = None
    vocab_size: int = _field(8000, minimum=1)
    vocab_model_type: Literal[MODEL_TYPES] = "unigram"
    vocab_sample_size: int = _field(2_000_000, minimum=1)
    batch_tokens: int = _field(4096, minimum=1)
    max_length: int | None = _field(None, minimum=1)
    shuffle_buffer: int = _field(100_000, minimum=1)
    cache: bool | str = True
    length_multiple: int | Literal["auto"] | None = _field("auto", minimum=1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`train:`: the training loop, its budget, checkpoints and dev evaluation.

    Attributes:
        max_minutes: wall-clock budget of the training loop across resumes; `None`: no budget.
        steps_per_epoch: how often Keras "epochs" (logs, callbacks) happen.
        mixed_precision: `None` (float32), `"mixed_bfloat16"`, `"mixed_float16"` or `"auto"`:
            `mixed_bfloat16` where the hardware multiplies bfloat16 natively (a CPU with
            AVX512_BF16 or AMX, a GPU of compute capability 8.0 or newer, a TPU), else float32
            (`training.train.resolve_mixed_precision`).
        cooldown_fraction: the last fraction of the budget (steps or minutes, whichever ends
            first) over which the learning rate falls linearly to 0 (0: no cooldown, the
            paper's schedule to the end). `training.callbacks.Cooldown`.
        jit_compile: `"auto"`, `True` or `False` (`model.compile`'s argument).
        strategy: `"default"` (one device) or `"mirrored"` (every local GPU).
        eval_every_steps: dev BLEU every N steps; 0 turns dev evaluation off.
        eval_sentences: dev sentences decoded for the BLEU callback; 0 turns it off.
        early_stopping_patience: dev evaluations without a BLEU gain before training stops;
            `None`: never stop early.
    """

    model_dir: str | None = None
    seed: int = _field(1, minimum=0)
    max_steps: int = _field(100_000, minimum=1)
    max_minutes: float | None = _field(None, minimum=0, exclusive=True)
    steps_per_epoch: int = _field(1000, minimum=1)
    warmup_steps: int = _field(4000, minimum=1)
    learning_rate_scale: float = _field(1.0, minimum=0, exclusive=True)
    cooldown_fraction: float = _field(0.0, minimum=0, below=1)
    gradient_accumulation_steps: int = _field(1, minimum=1)
    mixed_precision: Literal["mixed_bfloat16", "mixed_float16", "auto"] | None = None
    jit_compile: bool | Literal["auto"] = "auto"
    strategy: Literal["default", "mirrored"] = "default"
    save_every_steps: int = _field(500, minimum=1)
    keep_checkpoints: int = _field(10, minimum=1)
    log_every_steps: int = _field(100, minimum=1)
    eval_every_steps: int = _field(2000, minimum=0)
    eval_sentences: int = _field(500, minimum=0)
    eval_batch_size: int = _field(64, minimum=1)
    early_stopping_patience: int | None = _field(None, minimum=1)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, as loaded by `load_run_config` and written to `run_config.yaml`."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    decode: DecodeSettings = dataclasses.field(default_factory=DecodeSettings)

    @property
    def dev_evaluation(self) -> bool:
        """Whether the dev-BLEU callback runs (a dev corpus, sentences and an interval)."""
        train = self.train
        return bool(self.data.dev) and train.eval_sentences > 0 and train.eval_every_steps > 0

    def transformer_config(self, vocab_size: int | None = None) -> TransformerConfig:
        """The model this run trains (`vocab_size` from the tokenizer wins)."""
        return self.model.transformer_config(vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "decode": self.decode.to_dict(),
        }


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "decode": DecodeSettings}
_MODEL_FIELDS = {field.name for field in dataclasses.fields(TransformerConfig)}


def _known_keys(section: str) -> set[str]:
    if section == "model":
        return _MODEL_FIELDS | {"preset"}
    return {field.name for field in dataclasses.fields(_SECTIONS[section])}


def _check_layer(layer: Any, source: str) -> None:
    """Refuses unknown sections and keys of one YAML file or `--set`, naming where it came from."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{source} must hold a mapping, got {type(layer).__name__}")
    for section, values in layer.items():
        if section not in ("model", *_SECTIONS):
            raise ConfigError(
                f"Unknown config section '{section}' in {source} "
                f"(known: {sorted(('model', *_SECTIONS))})"
            )
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a mapping in {source}, got {values!r}")
        known = _known_keys(section)
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"Unknown config key '{section}.{key}' in {source} (known: {sorted(known)})"
                )


def _describe(hint: Any) -> str:
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        names = [repr(value) for value in typing.get_args(hint)]
        return names[0] if len(names) == 1 else "one of " + ", ".join(names)
    return " or ".join(_describe(arg) for arg in typing.get_args(hint))


def _convert(value: Any, hint: Any, path: str) -> Any:
    """`value` as the type `hint` names, or a ConfigError "path: expected ..., got value"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
    elif origin is Literal:
        # `type(...) is` so that True does not pass for 1 nor 1 for True.
        if any(type(value) is type(v) and value == v for v in typing.get_args(hint)):
            return value
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        # 1e5 reads as a float; a whole float is the integer it spells.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        raise TypeError(f"{path}: no conversion for type {hint!r}")
    raise ConfigError(f"{path}: expected {_describe(hint)}, got {value!r}")


def _typed_fields(cls: type, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Converts each of `values` to its field's type in `cls` and checks its minimum."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    converted = {}
    for key, value in values.items():
        path = f"{section}.{key}"
        value = _convert(value, hints[key], path)
        minimum = fields[key].metadata.get("minimum")
        # Only numbers have a minimum: a Literal alongside (e.g. "auto") passes as it is.
        if minimum is not None and isinstance(value, (int, float)):
            exclusive = fields[key].metadata.get("exclusive")
            if value < minimum or (exclusive and value == minimum):
                bound = f"greater than {minimum}" if exclusive else f"at least {minimum}"
                raise ConfigError(f"{path}: must be {bound}, got {value!r}")
        below = fields[key].metadata.get("below")
        if below is not None and isinstance(value, (int, float)) and value >= below:
            raise ConfigError(f"{path}: must be below {below}, got {value!r}")
        converted[key] = value
    return converted


def _corpus_entry(value: Any, path: str) -> None:
    if isinstance(value, dict) and "spec" not in value:
        raise ConfigError(f"{path}: a corpus mapping needs a 'spec' key, got {value!r}")


def build_run_config(values: Mapping[str, Any]) -> RunConfig:
    """A `RunConfig` from a merged `{section: {key: value}}` mapping; every check of a load."""
    _check_layer(values, "the run config")
    sections = {name: dict(values.get(name) or {}) for name in ("model", *_SECTIONS)}

    model_values = dict(sections["model"])
    preset = _convert(model_values.pop("preset", "small"), str, "model.preset")
    model = ModelSection(preset, _typed_fields(TransformerConfig, model_values, "model"))
    try:
        transformer = model.transformer_config()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model section {model.to_dict()}: {error}") from error

    data = DataConfig(**_typed_fields(DataConfig, sections["data"], "data"))
    train = TrainConfig(**_typed_fields(TrainConfig, sections["train"], "train"))
    decode_values = _typed_fields(DecodeSettings, sections["decode"], "decode")
    try:
        decode = DecodeSettings(**decode_values)
    except ValueError as error:
        raise ConfigError(f"decode section {decode_values}: {error}") from error

    if train.model_dir is None:
        raise ConfigError("train.model_dir is not set (in a config file or --set)")
    if data.train is None:
        raise ConfigError("data.train is not set: give a corpus spec such as 'text:PREFIX'")
    _corpus_entry(data.train, "data.train")
    _corpus_entry(data.dev, "data.dev")
    if data.max_length is None:
        data = dataclasses.replace(data, max_length=transformer.max_length)
    elif data.max_length > transformer.max_length:
        raise ConfigError(
            f"data.max_length ({data.max_length}) is more than model.max_length "
            f"({transformer.max_length}, preset {preset!r}): the model cannot hold such pairs"
        )
    if data.batch_tokens < data.max_length:
        raise ConfigError(
            f"data.batch_tokens ({data.batch_tokens}) cannot hold one pair of "
            f"data.max_length ({data.max_length}) tokens"
        )
    run_config = RunConfig(model=model, data=data, train=train, decode=decode)
    if train.early_stopping_patience is not None and not run_config.dev_evaluation:
        raise ConfigError(
            f"train.early_stopping_patience is {train.early_stopping_patience} but dev "
            f"evaluation is off (data.dev {data.dev!r}, train.eval_every_steps "
            f"{train.eval_every_steps}, train.eval_sentences {train.eval_sentences}); "
            "set it to null"
        )
    return run_config


def _merge(base: dict, layer: Mapping) -> dict:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in layer.items():
        merged.setdefault(section, {}).update(values or {})
    return merged


def _parse_value(text: str) -> Any:
    # YAML's scalars: "3" -> 3, but "1e-3" is a str in YAML 1.1, so try float too.
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _override(item: str) -> dict[str, dict[str, Any]]:
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    return {section: {name: _parse_value(text)}}


def load_run_config(paths: list[str | Path], overrides: list[str] = ()) -> RunConfig:
    """Merges the defaults, each YAML file in order, then each `section.key=value` override.

    Raises:
        ConfigError: naming the dotted key and the value, for an unknown section or key, a value
            of the wrong type or out of range, or sections that disagree.
    """
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        layer = yaml.safe_load(path.read_text()) or {}
        _check_layer(layer, str(path))
        merged = _merge(merged, layer)
    for item in overrides:
        layer = _override(item)
        _check_layer(layer, f"--set {item}")
        merged = _merge(merged, layer)
    return build_run_config(merged)


def dump_run_config(run_config: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML; `load_run_config([path])` reads it back."""
    Path(path).write_text(yaml.safe_dump(run_config.to_dict(), sort_keys=False))

"""Layered YAML run configs: later files and `--set key=value` override earlier ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from keras_transformer import TransformerConfig

# Every key a run config may hold, with its default. Unknown keys are errors, so a typo in a
# YAML file or a --set never silently does nothing.
DEFAULTS: dict[str, Any] = {
    "model": {"preset": "small"},  # plus any TransformerConfig field
    "data": {
        "source_lang": "en",
        "target_lang": "de",
        "train": None,  # a corpus spec string or {"spec": ..., options}
        "dev": None,
        "vocab": None,  # an existing spm.model; None trains one into the model dir
        "vocab_size": 8000,
        "vocab_model_type": "unigram",
        "vocab_sample_size": 2_000_000,
        "batch_tokens": 4096,
        "max_length": 128,
        "shuffle_buffer": 100_000,
        "cache": True,
    },
    "train": {
        "model_dir": None,
        "seed": 1,
        "max_steps": 100_000,
        "max_minutes": None,  # wall-clock budget of the training loop, across resumes
        "steps_per_epoch": 1000,  # how often Keras "epochs" (logs, callbacks) happen
        "warmup_steps": 4000,
        "learning_rate_scale": 1.0,
        "gradient_accumulation_steps": 1,
        "mixed_precision": None,  # None, "mixed_bfloat16" or "mixed_float16"
        "jit_compile": "auto",
        "strategy": "default",  # "default" or "mirrored"
        "save_every_steps": 500,
        "keep_checkpoints": 10,
        "log_every_steps": 100,
        "eval_every_steps": 2000,
        "eval_sentences": 500,  # dev sentences decoded for the BLEU callback (0 = none)
        "eval_batch_size": 64,
        "early_stopping_patience": None,  # evaluations without a BLEU gain before stopping
    },
}


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and value."""


def _merge(base: dict, override: dict, where: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in merged and where != "model":
            raise ConfigError(f"Unknown config key '{where}.{key}' (known: {sorted(merged)})")
        if isinstance(merged.get(key), dict) and isinstance(value, dict) and where == "":
            merged[key] = _merge(merged[key], value, key)
        else:
            merged[key] = value
    return merged


def _parse_value(text: str) -> Any:
    # YAML's scalars: "3" -> 3, "1e-3" -> 0.001 is a str in YAML 1.1, so try float too.
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_run_config(paths: list[str | Path], overrides: list[str] = ()) -> dict[str, Any]:
    """Merges DEFAULTS, then each YAML file in order, then each `section.key=value` override."""
    config = copy.deepcopy(DEFAULTS)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
        config = _merge(config, data, "")
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in config:
            raise ConfigError(
                f"--set expects section.key=value with section in {sorted(config)}, got {item!r}"
            )
        config = _merge(config, {section: {name: _parse_value(text)}}, "")
    if config["train"]["model_dir"] is None:
        raise ConfigError("train.model_dir is not set (in a config file or --set)")
    if config["data"]["train"] is None:
        raise ConfigError("data.train is not set: give a corpus spec such as 'text:PREFIX'")
    transformer_config(config)  # validates the model section early
    return config


def transformer_config(run_config: dict[str, Any], vocab_size: int | None = None):
    """The `TransformerConfig` a run config describes (`vocab_size` from the tokenizer wins)."""
    model = dict(run_config["model"])
    preset = model.pop("preset", "small")
    if vocab_size is not None:
        model["vocab_size"] = vocab_size
    try:
        return TransformerConfig.preset(preset, **model)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model section {run_config['model']}: {error}") from error


def dump_run_config(run_config: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(run_config, sort_keys=False))

"""The layout of a model directory, and rebuilding a model and tokenizer from one."""

from __future__ import annotations

import re
from pathlib import Path

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding.settings import DecodeSettings

RUN_CONFIG = "run_config.yaml"
TRANSFORMER_CONFIG = "transformer_config.json"
DECODE_SETTINGS = "decode_settings.json"
VOCAB = "spm.model"
CHECKPOINTS = "checkpoints"
BACKUP = "backup"
LOGS = "logs"
BEST = "best.weights.h5"
AVERAGED = "averaged.weights.h5"
FINAL = "final.weights.h5"
EVAL_HISTORY = "bleu_history.jsonl"
PROGRESS = "progress.jsonl"
# Written last by a training run that finished (its summary and why it stopped).
COMPLETE = "complete.json"

_STEP = re.compile(r"step-(\d+)\.weights\.h5$")


def step_checkpoint(model_dir: str | Path, step: int) -> Path:
    return Path(model_dir) / CHECKPOINTS / f"step-{step:08d}.weights.h5"


def list_step_checkpoints(model_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every saved step checkpoint, oldest first."""
    folder = Path(model_dir) / CHECKPOINTS
    found = []
    for path in folder.glob("step-*.weights.h5"):
        match = _STEP.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_weights(model_dir: str | Path, checkpoint: str = "auto") -> Path:
    """A weights file: `auto` (averaged, else best, else final, else last step), a name, a path."""
    model_dir = Path(model_dir)
    named = {"averaged": AVERAGED, "best": BEST, "final": FINAL}
    if checkpoint == "auto":
        for name in (AVERAGED, BEST, FINAL):
            if (model_dir / name).is_file():
                return model_dir / name
        checkpoint = "last"
    if checkpoint == "last":
        steps = list_step_checkpoints(model_dir)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {model_dir / CHECKPOINTS}")
        return steps[-1][1]
    path = model_dir / named[checkpoint] if checkpoint in named else Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} not found (looked for {path})")
    return path


def load_tokenizer(model_dir: str | Path):
    """The `SubwordTokenizer` of the run's `spm.model`."""
    from keras_transformer.translation.tokenizer import SubwordTokenizer

    return SubwordTokenizer(Path(model_dir) / VOCAB)


# Decoding precisions: float32, or the weights kept in float32 and the matrix products computed
# in bfloat16 (Keras' `mixed_bfloat16` policy), faster on CPUs with AVX512_BF16 or AMX.
PRECISIONS = ("float32", "bfloat16")


def _build_in_precision(config, precision: str):
    """`build_transformer(config)` whose layers compute in `precision` (see `PRECISIONS`)."""
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return build_transformer(config)
    # Layers take the global policy when built; restore it so nothing else is affected.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        return build_transformer(config)
    finally:
        keras.config.set_dtype_policy(previous)


def load_transformer(model_dir: str | Path, checkpoint: str = "auto", precision: str = "float32"):
    """Rebuilds the model of `model_dir` from its `TransformerConfig` and loads its weights.

    `precision`: `"float32"`, or `"bfloat16"` for float32 weights with bfloat16 computation.

    A config that disagrees with the directory's `spm.model` (special ids, vocabulary size) is
    refused (`check_vocabulary`).

    Returns:
        `(model, weights_path)`.
    """
    from keras_transformer.translation.tokenizer import check_vocabulary

    model_dir = Path(model_dir)
    config_path = model_dir / TRANSFORMER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: no {TRANSFORMER_CONFIG}")
    config = TransformerConfig.from_json(config_path)
    if (model_dir / VOCAB).is_file():
        check_vocabulary(config, load_tokenizer(model_dir), config_name=TRANSFORMER_CONFIG)
    model = _build_in_precision(config, precision)
    weights = resolve_weights(model_dir, checkpoint)
    model.load_weights(weights)
    return model, weights


def load_translator(
    model_dir: str | Path,
    checkpoint: str = "auto",
    settings: DecodeSettings | None = None,
    precision: str = "float32",
    **translator_options,
):
    """The `Translator` of `model_dir`: its model (computing in `precision`, see
    `load_transformer`), its tokenizer, and its decode settings (`load_decode_settings`) unless
    `settings` is given.

    Returns:
        `(translator, weights_path)`.
    """
    from keras_transformer.translation.translator import Translator

    model, weights = load_transformer(model_dir, checkpoint, precision)
    settings = settings or load_decode_settings(model_dir)
    return Translator(model, load_tokenizer(model_dir), settings, **translator_options), weights


def load_decode_settings(model_dir: str | Path) -> DecodeSettings:
    """The run's decoding (`decode_settings.json`, from the run config's `decode:` section);
    the paper's defaults for a model directory written before runs stored it."""
    path = Path(model_dir) / DECODE_SETTINGS
    return DecodeSettings.from_json(path) if path.is_file() else DecodeSettings()

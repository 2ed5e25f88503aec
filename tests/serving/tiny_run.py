"""A model directory with a real vocabulary and a tiny model trained for a few seconds.

Shared by the export and parity tests (built once per test session). It is written here rather
than by `training.train` so that these tests depend only on the model-directory layout, and
trained just enough that outputs differ in length and content (random weights never emit eos).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding.settings import DecodeSettings
from keras_transformer.translation import model_dir as layout

# Small batches so that a few dozen sentences make several length-sorted batches; beam 3 with
# 2 returned so that a test can tell the run's decode settings from the paper's defaults.
SETTINGS = DecodeSettings(beam_size=3, nbest=2, batch_size=8, extra_length=10)
MAX_LENGTH = 64
_BUILT: dict[str, Path] = {}


def _batches(tokenizer, sources, targets, batch_size=32):
    """Teacher-forcing batches `({"source_ids", "target_ids"}, labels)` of 0-padded ids."""
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    source = [list(ids[: MAX_LENGTH - 1]) + [eos] for ids in tokenizer.tokenize(sources).numpy()]
    target = [list(ids[: MAX_LENGTH - 1]) for ids in tokenizer.tokenize(targets).numpy()]
    x_source = np.zeros((len(source), MAX_LENGTH), "int32")
    x_target = np.zeros((len(target), MAX_LENGTH), "int32")
    labels = np.zeros((len(target), MAX_LENGTH), "int32")
    for row, (s, t) in enumerate(zip(source, target, strict=True)):
        x_source[row, : len(s)] = s
        x_target[row, : len(t) + 1] = [bos] + t
        labels[row, : len(t) + 1] = t + [eos]
    return {"source_ids": x_source, "target_ids": x_target}, labels


def write_model_dir_files(model_dir: Path, data_dir: Path):
    """Everything of a model directory but its weights: `spm.model` (300 pieces, trained on
    Multi30k val), `transformer_config.json` (`tiny`), `decode_settings.json` (`SETTINGS`).

    Returns:
        `(tokenizer, config, sources, targets)`: the last two are Multi30k val's sentences.
    """
    from training.vocab import train_vocab

    sources = (data_dir / "multi30k" / "val.en").read_text().splitlines()
    targets = (data_dir / "multi30k" / "val.de").read_text().splitlines()
    train_vocab(sources + targets, model_dir / "spm", vocab_size=300, seed=1)
    tokenizer = layout.load_tokenizer(model_dir)
    config = TransformerConfig.preset(
        "tiny", vocab_size=tokenizer.vocab_size, max_length=MAX_LENGTH
    )
    config.to_json(model_dir / layout.TRANSFORMER_CONFIG)
    SETTINGS.to_json(model_dir / layout.DECODE_SETTINGS)
    return tokenizer, config, sources, targets


def tiny_model_dir(tmp_path_factory, data_dir: Path) -> Path:
    """`spm.model` (300 pieces, Multi30k val), `transformer_config.json` (`tiny`, max length
    64), `final.weights.h5` (4 epochs over Multi30k val), `decode_settings.json` (`SETTINGS`)."""
    if "dir" in _BUILT:
        return _BUILT["dir"]
    # Seed first: `tf.random.set_seed` clears TensorFlow's kernel cache, and with it the
    # SentencePiece resource of a tokenizer created before.
    keras.utils.set_random_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_run")
    tokenizer, config, sources, targets = write_model_dir_files(model_dir, data_dir)
    model = build_transformer(config)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=config.pad_id
        ),
    )
    x, y = _batches(tokenizer, sources, targets)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    model.save_weights(model_dir / layout.FINAL)
    _BUILT["dir"] = model_dir
    return model_dir


def tiny_export(tmp_path_factory, data_dir: Path) -> Path:
    """`BASE/transformer` holding version 1, `serving.export` of `tiny_model_dir`."""
    if "export" not in _BUILT:
        from serving.export import export

        base = tmp_path_factory.mktemp("tiny_exports") / "transformer"
        export(tiny_model_dir(tmp_path_factory, data_dir), base / "1")
        _BUILT["export"] = base
    return _BUILT["export"]

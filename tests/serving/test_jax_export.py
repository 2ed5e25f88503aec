"""Weights trained on JAX export on TensorFlow: a `tiny` model trained with KERAS_BACKEND=jax (in a
subprocess), saved as a model directory, exported by `serving.export` in this TensorFlow process;
the SavedModel's greedy translations and ids equal JAX's own greedy decoding."""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_run import _batches, write_model_dir_files

from serving.export import export
from tests.subprocess_report import run_script

# Trains on JAX, saves final.weights.h5, then decodes with greedy_search under jax.jit,
# tokenizing and detokenizing with SentencePiece's own Python processor (no TensorFlow here).
# argv: model directory, training batches (.npz), sentences (.json).
SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, keras, numpy as np, sentencepiece
from keras_transformer import (MaskedLabelSmoothingLoss, TransformerConfig, build_transformer,
                               greedy_search)
from keras_transformer.translation import model_dir as layout
model_dir, data = Path(sys.argv[1]), np.load(sys.argv[2])
sentences = json.loads(Path(sys.argv[3]).read_text())
keras.utils.set_random_seed(0)
config = TransformerConfig.from_json(model_dir / layout.TRANSFORMER_CONFIG)
settings = layout.load_decode_settings(model_dir)
model = build_transformer(config)
model.compile(optimizer=keras.optimizers.Adam(3e-3),
              loss=MaskedLabelSmoothingLoss(config.label_smoothing, pad_id=config.pad_id))
x = {"source_ids": data["source_ids"], "target_ids": data["target_ids"]}
history = model.fit(x, data["labels"], batch_size=32, epochs=8, verbose=0)
model.save_weights(model_dir / layout.FINAL)

processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / layout.VOCAB))
rows = [processor.encode(s)[: config.max_length - 1] + [config.eos_id] for s in sentences]
source_ids = np.full((len(rows), max(map(len, rows))), config.pad_id, "int32")
for index, row in enumerate(rows):
    source_ids[index, : len(row)] = row
search = jax.jit(lambda ids: greedy_search(model, ids, extra_length=settings.extra_length))
target_ids = np.asarray(search(source_ids)["target_ids"])

def text(ids):
    ids = list(ids)
    ids = ids[: ids.index(config.eos_id)] if config.eos_id in ids else ids
    return processor.decode([i for i in ids if i not in (config.pad_id, config.bos_id)])

print(json.dumps({"backend": keras.config.backend(), "losses": history.history["loss"],
                  "source_ids": source_ids.tolist(), "target_ids": target_ids.tolist(),
                  "translations": [text(row) for row in target_ids]}))
"""


TRAIN_LENGTH = 32


def _until_eos(rows, eos_id):
    """Each row up to and including its first eos (what follows is padding)."""
    rows = [list(map(int, row)) for row in rows]
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_trained_weights_export_and_translate_like_jax(tmp_path, shared_data_dir):
    if keras.config.backend() != "tensorflow":
        pytest.skip(f"exports run on the TensorFlow backend, not {keras.config.backend()}")
    multi30k = shared_data_dir / "multi30k"
    sentences = (multi30k / "test_2016_flickr.en").read_text().splitlines()[:12]

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    tokenizer, config, sources, targets = write_model_dir_files(model_dir, shared_data_dir)
    x, labels = _batches(tokenizer, sources, targets)
    # One batch shape, so XLA compiles the train step once: the pairs that fit in
    # TRAIN_LENGTH tokens per side, in whole batches of 32.
    arrays = {**x, "labels": labels}
    fits = np.all([(a[:, TRAIN_LENGTH:] == config.pad_id).all(axis=1) for a in arrays.values()], 0)
    rows = np.flatnonzero(fits)[: fits.sum() // 32 * 32]
    np.savez(tmp_path / "batches.npz", **{k: a[rows, :TRAIN_LENGTH] for k, a in arrays.items()})
    (tmp_path / "sentences.json").write_text(json.dumps(sentences))

    jax_run = run_script(
        SCRIPT,
        str(model_dir),
        str(tmp_path / "batches.npz"),
        str(tmp_path / "sentences.json"),
        backend="jax",
    )
    assert jax_run["backend"] == "jax"
    assert jax_run["losses"][-1] < jax_run["losses"][0]
    expected = jax_run["translations"]
    # Trained enough that most sentences get their own non-empty translation, ended by eos
    # (random weights run to the length limit), so a mismatch cannot hide behind identical,
    # empty or cut-off outputs.
    assert len(set(expected)) >= len(sentences) // 2 and all(expected), expected
    assert sum(config.eos_id in row for row in jax_run["target_ids"]) >= len(sentences) // 2

    version = export(model_dir, tmp_path / "exports" / "transformer" / "1")
    served = tf.saved_model.load(str(version))
    greedy = served.signatures["greedy"](text=tf.constant(sentences))
    assert [t.decode("utf-8") for t in greedy["translations"].numpy()] == expected
    greedy_ids = served.signatures["greedy_ids"](
        source_ids=tf.constant(jax_run["source_ids"], tf.int32)
    )
    eos = config.eos_id
    assert _until_eos(greedy_ids["target_ids"].numpy(), eos) == _until_eos(
        jax_run["target_ids"], eos
    )

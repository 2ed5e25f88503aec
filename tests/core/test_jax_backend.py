"""The same model builds, trains and decodes with KERAS_BACKEND=jax (in a subprocess): the
default decode step leaves its state unchanged, and the searches' in-place opt-in agrees."""

import importlib.util

import pytest

from tests.subprocess_report import run_script

SCRIPT = r"""
import json, numpy as np, keras
from keras_transformer import (MaskedLabelSmoothingLoss, MaskedTokenAccuracy, TransformerConfig,
                               build_transformer, transformer_optimizer)
from tests.core.copy_task import copy_task_batch
keras.utils.set_random_seed(0)
config = TransformerConfig.preset("tiny", norm_placement="pre")
model = build_transformer(config)
model.compile(optimizer=transformer_optimizer(config.d_model, warmup_steps=10),
              loss=MaskedLabelSmoothingLoss(0.1), metrics=[MaskedTokenAccuracy()])
x, y = copy_task_batch(config, 64)
before = [w.copy() for w in model.get_weights()]
losses = [float(model.train_on_batch(x, y)[0]) for _ in range(3)]
changed = sum(int(not np.array_equal(a, b)) for a, b in zip(before, model.get_weights()))
full = keras.ops.convert_to_numpy(model(x))
memory, mask = model.encode(x["source_ids"])
state = model.init_decoder_state(memory, mask, max_length=12)
logits, state = model.decode_step(x["target_ids"][:, 0], 0, state)
step_error = float(np.abs(keras.ops.convert_to_numpy(logits) - full[:, 0]).max())
# Decoding twice from one state: the default path must leave that state's caches alone.
tokens = x["target_ids"][:, 1]
first, _ = model.decode_step(tokens, 1, state)
other, _ = model.decode_step(tokens + 1, 1, state)
again, _ = model.decode_step(tokens, 1, state)
cache = keras.ops.convert_to_numpy(state["key_caches"][0])
# The opt-in path (what the searches use) gives the same logits.
opt_state = model.init_decoder_state(memory, mask, max_length=12, in_place=True)
_, opt_state = model.decode_step(x["target_ids"][:, 0], 0, opt_state, in_place=True)
opt_logits, _ = model.decode_step(tokens, 1, opt_state, in_place=True)
numpy = keras.ops.convert_to_numpy
print(json.dumps({"backend": keras.config.backend(), "losses": losses, "changed": changed,
                  "weights": len(before), "step_error": step_error,
                  "repeat_error": float(np.abs(numpy(again) - numpy(first)).max()),
                  "other_gap": float(np.abs(numpy(other) - numpy(first)).max()),
                  "later_rows_written": bool(cache[:, :, 1:].any()),
                  "in_place_error": float(np.abs(numpy(opt_logits) - numpy(first)).max())}))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_train_step_and_decode_step_on_jax():
    report = run_script(SCRIPT, backend="jax")
    assert report["backend"] == "jax"
    assert all(map(lambda v: v == v and v < 10, report["losses"]))
    assert report["losses"][-1] < report["losses"][0]
    assert report["changed"] == report["weights"]
    assert report["step_error"] < 1e-4
    assert report["repeat_error"] < 1e-6 and report["other_gap"] > 1e-4
    assert not report["later_rows_written"]
    assert report["in_place_error"] < 1e-5

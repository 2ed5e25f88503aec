"""Text in, text out: the runtime that training, evaluation, the benchmarks and the export share.

Needs TensorFlow and tensorflow-text (`pip install keras-transformer[tf]`): tokenization runs
as graph ops so that the exported SavedModel carries it. The layer library
(`keras_transformer.layers`, `.model`, `.decoding`) does not import this package.
"""

import importlib.util

# Checked before any submodule imports them, so that a JAX-only install gets the fix, not a bare
# "No module named 'tensorflow'" from deep inside the tokenizer.
_missing = [
    name
    for name in ("tensorflow", "tensorflow_text", "sentencepiece")
    if importlib.util.find_spec(name) is None
]
if _missing:
    raise ImportError(
        "keras_transformer.translation needs TensorFlow, tensorflow-text and sentencepiece "
        f"(not installed: {', '.join(_missing)}); install the `tf` extra: "
        "pip install 'keras-transformer[tf]'"
    )

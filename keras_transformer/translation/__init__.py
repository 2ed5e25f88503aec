"""Text in, text out: the runtime that training, evaluation, the benchmarks and the export share.

Needs TensorFlow and tensorflow-text (`pip install keras-transformer[tf]`): tokenization runs
as graph ops so that the exported SavedModel carries it. The layer library
(`keras_transformer.layers`, `.model`, `.decoding`) does not import this package.
"""

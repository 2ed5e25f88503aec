"""Serving the exported translator: TF Serving config, a gRPC client and a development server.

Importing this package hides TensorFlow's native start-up logging unless ``--verbose`` or
KT_VERBOSE=1 (``quiet_logs.py``): it must happen before anything imports Keras or TensorFlow.
"""

from quiet_logs import quiet_tensorflow

quiet_tensorflow()

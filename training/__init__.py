"""Training applications for keras-transformer: corpora, tokenizer, vocabulary and input pipeline.

Run from a checkout (``python -m training.vocab ...``); importing this package stays cheap.
Importing it hides TensorFlow's native start-up logging unless ``--verbose`` or KT_VERBOSE=1
(``quiet_logs.py``): it must happen before anything imports Keras or TensorFlow.
"""

from quiet_logs import quiet_tensorflow

quiet_tensorflow()

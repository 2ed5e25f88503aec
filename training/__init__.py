"""Training applications for keras-transformer: corpora, tokenizer, vocabulary and input pipeline.

Run from a checkout (``python -m training.vocab ...``); importing this package stays cheap.
"""

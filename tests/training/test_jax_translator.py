"""The dev-BLEU decoder of JAX runs: `JaxGreedyTranslator` against a plain greedy search."""

from tests.subprocess_report import run_script

SCRIPT = r"""
import json, sys, tempfile
import keras, numpy as np, tensorflow as tf
from keras_transformer import TransformerConfig, build_transformer
from keras_transformer.decoding import greedy_search
from keras_transformer.decoding.settings import DecodeSettings
from keras_transformer.translation.jax_translator import JaxGreedyTranslator
from keras_transformer.translation.tokenizer import SubwordTokenizer
from training.corpus import load_corpus
from training.vocab import train_vocab

# Before the tokenizer: TensorFlow's set_seed drops the eager SentencePiece resource.
keras.utils.set_random_seed(1)
corpus = load_corpus(f"text:{sys.argv[1]}/multi30k/val", "en", "de")
prefix = tempfile.mkdtemp() + "/spm"
tokenizer = SubwordTokenizer(train_vocab(corpus, prefix, 300, "unigram", 5000, seed=1)["model"])
config = TransformerConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_length=32)
model = build_transformer(config)
# 9 sentences in batches of 4 padded to 32 columns: the last batch has rows of eos only.
settings = DecodeSettings(beam_size=1, batch_size=4, extra_length=5)
translator = JaxGreedyTranslator(model, tokenizer, settings, length_multiple=32)
sentences = corpus.sources[:8] + [""]


def reference():
    # All sentences in one batch, padded only to the longest, by the library's greedy search.
    source_ids, empty, _ = translator.encode(tf.constant(sentences))
    target_ids = greedy_search(model, np.asarray(source_ids), extra_length=5)["target_ids"]
    texts = tokenizer.detokenize(np.asarray(target_ids)).numpy()
    return ["" if blank else text.decode() for text, blank in zip(texts, empty.numpy())]


first = translator.translate(sentences)
expected_first = reference()
rng = np.random.default_rng(2)  # Moves the weights, as training does.
model.set_weights([w + rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in model.get_weights()])
second = translator.translate(sentences)
print(json.dumps({
    "first": first, "expected_first": expected_first,
    "second": second, "expected_second": reference(),
}))
"""


def test_jax_translator_equals_greedy_search_and_follows_the_weights(shared_data_dir):
    report = run_script(SCRIPT, str(shared_data_dir), backend="jax")
    assert report["first"] == report["expected_first"]
    assert report["first"][-1] == ""
    # The compiled search takes the weights as arguments: new weights, new translations.
    assert report["second"] == report["expected_second"]
    assert report["second"] != report["first"]

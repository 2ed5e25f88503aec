"""SentencePiece subword tokenizer as a ``tf.Module``, exportable inside a SavedModel signature.

Uses only the SentencePiece ops of tensorflow-text plus core TF ops, so TF Serving can run it.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf
import tensorflow_text as tf_text
from sentencepiece import sentencepiece_model_pb2

from keras_transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID


class SubwordTokenizer(tf.Module):
    """Turns sentences into SentencePiece ids and back.

    The serialized model is embedded in the graph of the SentencePiece op (the op takes it as
    an attribute), and the ``.model`` file is also tracked as ``model_asset``, so a
    ``tf.saved_model.save`` of a module holding this tokenizer copies it into ``assets/``.

    Args:
        model_path: A SentencePiece ``.model`` file trained with pad=0, unk=1, bos=2, eos=3
            (see ``training.vocab``).
        name: Module name.

    Attributes:
        model_path: The ``.model`` file, as a string.
        model_proto: The serialized model bytes.
        vocab_size: Number of pieces, including the special ones.
        pad_id, unk_id, bos_id, eos_id: the special ids, read from the SentencePiece model
            (a model whose ids are not `keras_transformer.config`'s 0, 1, 2, 3 is refused).

    Example:
        >>> tokenizer = SubwordTokenizer("runs/vocab/spm.model")
        >>> ids = tokenizer.tokenize(tf.constant(["A dog runs."]))  # RaggedTensor [1, (len)]
        >>> tokenizer.detokenize_ragged(ids)  # [b"A dog runs."]
    """

    def __init__(self, model_path: str | os.PathLike, name: str | None = None):
        super().__init__(name=name)
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_path = str(path)
        self.model_proto = path.read_bytes()
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        spec = proto.trainer_spec
        found = (spec.pad_id, spec.unk_id, spec.bos_id, spec.eos_id)
        expected = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
        if found != expected:
            raise ValueError(
                f"SentencePiece model {path} has (pad, unk, bos, eos) ids {found}, expected "
                f"{expected}; train it with training.vocab"
            )
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = found
        self.vocab_size = len(proto.pieces)
        self.model_asset = tf.saved_model.Asset(self.model_path)
        self._sentencepiece = tf_text.SentencepieceTokenizer(
            model=self.model_proto, out_type=tf.int32, add_bos=False, add_eos=False
        )

    def tokenize(self, text: tf.Tensor) -> tf.RaggedTensor | tf.Tensor:
        """Tokenizes sentences into ids.

        Args:
            text: ``tf.string`` of shape ``[batch]`` (or a scalar).

        Returns:
            int32 ``tf.RaggedTensor`` ``[batch, (length)]``; for a scalar input, int32
            ``[length]``. No bos or eos is added.
        """
        return self._sentencepiece.tokenize(tf.convert_to_tensor(text, dtype=tf.string))

    def detokenize(self, ids: tf.Tensor) -> tf.Tensor:
        """Turns padded ids (e.g. decoder output) back into sentences.

        Everything from the first eos onwards is dropped, and so are pad and bos ids.

        Args:
            ids: int ``[batch, length]`` (or ``[length]``), padded with ``pad_id``.

        Returns:
            ``tf.string`` ``[batch]`` (or a scalar).
        """
        ids = tf.cast(ids, tf.int32)
        after_eos = tf.cumsum(tf.cast(tf.equal(ids, self.eos_id), tf.int32), axis=-1) > 0
        keep = tf.logical_not(after_eos)
        keep &= tf.not_equal(ids, self.pad_id) & tf.not_equal(ids, self.bos_id)
        if ids.shape.rank == 1:
            return self._sentencepiece.detokenize(tf.boolean_mask(ids, keep))
        return self._sentencepiece.detokenize(tf.ragged.boolean_mask(ids, keep))

    def detokenize_ragged(self, ids: tf.RaggedTensor) -> tf.Tensor:
        """Like ``detokenize`` for int ``tf.RaggedTensor`` ``[batch, (length)]`` ids."""
        return self.detokenize(ids.to_tensor(default_value=self.pad_id))


def check_vocabulary(config, tokenizer, config_name: str = "TransformerConfig") -> None:
    """Refuses a model config that disagrees with its vocabulary.

    Decoding starts from the config's `bos_id`, stops at its `eos_id` and pads with its `pad_id`,
    while the tokenizer appends the vocabulary's eos and detokenization drops the vocabulary's
    specials; the output projection has `target_vocab_size` rows, one per SentencePiece piece.
    Any disagreement silently breaks translation, so it is an error wherever the two meet
    (training, loading a model directory, building a `Translator`).

    Args:
        config: a `keras_transformer.TransformerConfig`.
        tokenizer: the `SubwordTokenizer` of the run's `spm.model`.
        config_name: where the config came from, for the message (e.g. a file name).

    Raises:
        ValueError: naming each disagreeing value on both sides, e.g.
            "transformer_config.json eos_id=5 but spm.model eos_id=3".
    """
    vocabulary = Path(tokenizer.model_path).name
    problems = [
        f"{config_name} {name}={getattr(config, name)} but {vocabulary} {name}="
        f"{getattr(tokenizer, name)}"
        for name in ("pad_id", "bos_id", "eos_id")
        if getattr(config, name) != getattr(tokenizer, name)
    ]
    # One SentencePiece model holds both languages: source and target tables are its size.
    sizes = {"vocab_size": config.vocab_size}
    if config.target_vocab_size is not None:
        sizes["target_vocab_size"] = config.target_vocab_size
    problems += [
        f"{config_name} {name}={size} but {vocabulary} has {tokenizer.vocab_size} pieces"
        for name, size in sizes.items()
        if size != tokenizer.vocab_size
    ]
    if problems:
        raise ValueError("The model config disagrees with its vocabulary: " + "; ".join(problems))

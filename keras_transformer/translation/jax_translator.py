"""`JaxGreedyTranslator`: `Translator`'s text path with the greedy search as a `jax.jit` program.

`Translator` runs its searches inside `tf.function`, which cannot trace JAX arrays; on the JAX
backend (the dev-BLEU callback of `training.train`) this subclass keeps everything else of
`Translator` (UTF-8 repair, empty input, truncation, detokenization, the length-sorted list
API), run eagerly with TensorFlow, and replaces only `search`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from keras_transformer.decoding import greedy_search
from keras_transformer.decoding.settings import DecodeSettings
from keras_transformer.translation.translator import Translator


class JaxGreedyTranslator(Translator):
    """Greedy translation on the JAX backend, with the list API of `Translator`.

    The search is compiled once per padded source shape: source ids are padded to a multiple
    of `length_multiple` columns and of `settings.batch_size` rows (extra rows hold only eos),
    which changes no result since each sentence's output limit counts its own tokens and
    padding is masked. The weights are arguments of the compiled program
    (`keras.StatelessScope`), so one program decodes the model as it trains.

    Only `translate` (and `search` with `beam_size=1`) are for use; the `tf.function`
    signatures inherited from `Translator` do not run on JAX.

    Args:
        model: a `keras_transformer.Transformer` on the JAX backend.
        tokenizer: its `SubwordTokenizer`.
        settings: `DecodeSettings`; `beam_size` must be 1.
        length_multiple: source lengths are padded to a multiple of this.
        name: module name.

    Example:
        >>> translator = JaxGreedyTranslator(model, tokenizer, DecodeSettings(beam_size=1))
        >>> translator.translate(["A dog runs.", ""])  # ["Ein Hund rennt.", ""]
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: DecodeSettings | None = None,
        *,
        length_multiple: int = 8,
        name: str = "jax_translation",
    ):
        if keras.config.backend() != "jax":
            raise ValueError(
                f"JaxGreedyTranslator needs the JAX backend, got {keras.config.backend()!r}; "
                "use Translator"
            )
        settings = settings or DecodeSettings(beam_size=1)
        if settings.beam_size != 1:
            raise ValueError(
                f"JaxGreedyTranslator decodes greedily, got beam_size {settings.beam_size}"
            )
        if length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
        super().__init__(model, tokenizer, settings, name=name)
        import jax

        self.length_multiple = int(length_multiple)
        self._compiled_search = jax.jit(self._stateless_search)

    def _stateless_search(self, values, source_ids):
        mapping = list(zip(self.model.variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            result = greedy_search(self.model, source_ids, **self.length_options)
        return result["target_ids"], result["scores"]

    def search(self, source_ids, beam_size: int, num_returned: int = 1):
        """Greedy search of `Translator.search`, as numpy arrays; `beam_size` must be 1."""
        if beam_size != 1 or num_returned != 1:
            raise ValueError(
                f"JaxGreedyTranslator decodes greedily, got beam_size {beam_size}, "
                f"num_returned {num_returned}"
            )
        source_ids = np.asarray(source_ids, np.int32)
        rows, length = source_ids.shape
        if rows == 0:
            return np.zeros([0, 1, 1], np.int32), np.zeros([0, 1], np.float32)
        batch = self.settings.batch_size
        padded = np.full(
            [
                math.ceil(rows / batch) * batch,
                math.ceil(length / self.length_multiple) * self.length_multiple,
            ],
            self.model.config.pad_id,
            np.int32,
        )
        padded[:rows, :length] = source_ids
        padded[rows:, 0] = self.model.config.eos_id
        values = [variable.value for variable in self.model.variables]
        target_ids, scores = self._compiled_search(values, padded)
        return np.asarray(target_ids)[:rows, None], np.asarray(scores)[:rows, None]

    def translate(
        self, sentences: Sequence[str | bytes], beam_size: int | None = None
    ) -> list[str]:
        """Greedy translations of `sentences`, in order (`beam_size` may only be 1)."""
        if beam_size not in (None, 1):
            raise ValueError(f"JaxGreedyTranslator decodes greedily, got beam_size {beam_size}")
        # The `greedy` signature's own Python body, run eagerly: TensorFlow tokenizes and
        # detokenizes, and its call to `search` lands in the compiled JAX program above.
        rows = self.run_in_batches(self.greedy.python_function, sentences)
        return [row["translations"].decode("utf-8") for row in rows]

    def translate_nbest(self, sentences):
        raise NotImplementedError("JaxGreedyTranslator has no beam search; use Translator")

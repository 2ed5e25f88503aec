"""The WMT14 EN->DE base recipe end to end, small (issue 9).

`python -m training.train --config training/configs/wmt14_en_de_base.yaml` with `--set`
overrides for a tiny model and a few steps trains on `newstest2013` and validates on the
`newstest2014` SGML, on TensorFlow and on JAX. Everything else (the mirrored strategy,
mixed_float16 on TensorFlow, the decode settings, ...) is the recipe's own. The recipe's TFDS
spec is checked against a local `wmt14_translate/de-en` prepared from real sentences (no
download).
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import pytest

from keras_transformer.translation import model_dir as layout
from training.corpus import corpus_from_config
from training.run_config import load_run_config

# The export-side check decodes with `Translator`, TensorFlow's.
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="the runs are checked on TensorFlow"
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "training" / "configs"
BASE = RECIPES / "wmt14_en_de_base.yaml"

MAX_STEPS = 6
EVAL_SENTENCES = 4
VOCAB_SIZE = 500
# Sentences (of both sides) the vocabulary is trained on: SentencePiece took 21.5 s on all
# 5998 and 6.5 s on 2000 here (train_vocab's `seconds`, on a loaded machine).
VOCAB_SAMPLE = 2000
NEWSTEST2013_PAIRS = 2999  # of 3000 lines; the length-ratio filter drops one.
NEWSTEST2014_FIRST_SOURCE = "Gutach: Increased safety for pedestrians"


def _overrides(model_dir, data_dir, backend):
    overrides = [
        f"train.model_dir={model_dir}",
        f"data.train=text:{data_dir}/wmt14/newstest2013",
        f"data.dev=sgml:{data_dir}/wmt14/newstest2014-deen",
        "model.d_model=32",
        "model.num_heads=4",
        "model.ffn_dim=64",
        "model.num_encoder_layers=1",
        "model.num_decoder_layers=1",
        f"data.vocab_size={VOCAB_SIZE}",
        f"data.vocab_sample_size={VOCAB_SAMPLE}",
        "data.batch_tokens=1024",
        # One bucket: one batch shape, so JAX compiles the train step once.
        "data.max_length=32",
        "data.length_multiple=32",
        f"train.max_steps={MAX_STEPS}",
        "train.steps_per_epoch=3",
        "train.save_every_steps=3",
        "train.log_every_steps=3",
        # Dev BLEU once, at the last step: with final.weights.h5's weights.
        f"train.eval_every_steps={MAX_STEPS}",
        f"train.eval_sentences={EVAL_SENTENCES}",
    ]
    if backend == "jax":
        # float16 on XLA's CPU compiler doubles this run (58 s of CPU against 46 s, and the
        # first step 68 s against 27 s of wall time on a loaded machine); TensorFlow keeps it.
        overrides.append("train.mixed_precision=null")
    return overrides


def _train(model_dir, data_dir, backend):
    sets = [arg for item in _overrides(model_dir, data_dir, backend) for arg in ("--set", item)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), KERAS_BACKEND=backend)
    if backend == "jax":
        env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(BASE), *sets],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data_dir):
    """`runs(backend)`: `(model_dir, stdout)` of the small WMT run on that backend, made once."""
    made = {}

    def get(backend):
        if backend not in made:
            model_dir = tmp_path_factory.mktemp(f"wmt-{backend}") / "run"
            made[backend] = model_dir, _train(model_dir, shared_data_dir, backend)
        return made[backend]

    return get


@pytest.fixture(scope="module")
def newstest2013_vocab(tmp_path_factory, shared_data_dir):
    """`spm.vocab` trained here on newstest2013 with the run's settings (pieces and scores)."""
    from training.vocab import train_vocab

    corpus = corpus_from_config({"spec": f"text:{shared_data_dir}/wmt14/newstest2013"}, "en", "de")
    prefix = tmp_path_factory.mktemp("vocab") / "spm"
    train_vocab(corpus, prefix, vocab_size=VOCAB_SIZE, sample_size=VOCAB_SAMPLE, seed=1)
    return prefix.with_suffix(".vocab").read_text()


def _float_dtypes(path):
    """The floating-point dtypes of the arrays in a `.weights.h5` (seed states are integers)."""
    dtypes = set()

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
            dtypes.add(str(item.dtype))

    with h5py.File(path, "r") as file:
        file.visititems(visit)
    return dtypes


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_base_recipe_trains_on_newstest2013_and_validates_on_newstest2014(
    runs, newstest2013_vocab, shared_data_dir, backend
):
    import sacrebleu

    model_dir, output = runs(backend)
    summary = json.loads((model_dir / layout.COMPLETE).read_text())
    assert (summary["backend"], summary["steps"], summary["reason"]) == (
        backend,
        MAX_STEPS,
        "max_steps",
    )
    # What ran is the recipe with the overrides, nothing else: mixed_float16, the paper's decode.
    written = load_run_config([model_dir / layout.RUN_CONFIG])
    assert written == load_run_config([BASE], _overrides(model_dir, shared_data_dir, backend))
    # `mirrored` on both backends: tf.distribute on TensorFlow, every device on JAX.
    assert written.train.strategy == "mirrored"
    if backend == "tensorflow":
        assert written.train.mixed_precision == "mixed_float16"

    # Trained on newstest2013, and the vocabulary too (the same pieces as one trained here).
    assert (
        f"train corpus: text:{shared_data_dir}/wmt14/newstest2013 (en->de): "
        f"{NEWSTEST2013_PAIRS} pairs" in output
    ), output
    assert (model_dir / "spm.vocab").read_text() == newstest2013_vocab
    progress = _jsonl(model_dir / layout.PROGRESS)
    assert [entry["step"] for entry in progress] == [3, MAX_STEPS]
    assert all(math.isfinite(entry["loss"]) for entry in progress), progress

    # Dev BLEU: once, at the last step, on the first EVAL_SENTENCES segments of the SGML.
    (evaluation,) = _jsonl(model_dir / layout.EVAL_HISTORY)
    assert (evaluation["step"], evaluation["sentences"]) == (MAX_STEPS, EVAL_SENTENCES)
    assert "tok:13a" in evaluation["signature"]
    dev = corpus_from_config({"spec": written.data.dev}, "en", "de")
    assert len(dev) == 3003 and dev.sources[0] == NEWSTEST2014_FIRST_SOURCE
    sources, references = dev.sources[:EVAL_SENTENCES], dev.targets[:EVAL_SENTENCES]
    assert not [line for line in sources + references if "<seg" in line or "</seg>" in line]
    # The run scored exactly these sentences (not, e.g., the training corpus).
    assert evaluation["sources_sha1"] == hashlib.sha1("\n".join(sources).encode()).hexdigest()
    assert "dev corpus: sgml:" in output, output

    # The export side: final.weights.h5 (float32 variables, also when trained in
    # mixed_float16) loads through the model directory, and its greedy translations score
    # the recorded BLEU.
    assert _float_dtypes(model_dir / layout.FINAL) == {"float32"}
    greedy = dataclasses.replace(
        written.decode, beam_size=1, nbest=None, batch_size=written.train.eval_batch_size
    )
    translator, weights = layout.load_translator(model_dir, checkpoint="final", settings=greedy)
    assert weights == model_dir / layout.FINAL
    hypotheses = translator.translate(sources)
    assert len(hypotheses) == EVAL_SENTENCES and all(isinstance(h, str) for h in hypotheses)
    recomputed = sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert evaluation["bleu"] == pytest.approx(recomputed, abs=0.01)


# --- the recipes' TFDS spec ------------------------------------------------------------------

LOCAL_PAIRS = 20


@pytest.fixture(scope="module")
def local_wmt14(tmp_path_factory, shared_data_dir):
    """A TFDS data_dir holding `wmt14_translate/de-en` 1.0.0, prepared from the first
    LOCAL_PAIRS lines of newstest2013 (the real builder would download ~1.5 GB of archives).

    The preparing builder is the real `Wmt14Translate` with its download replaced, kept out of
    the TFDS registry; what reads the files back is the registered builder, as in a real run.
    Returns `(data_dir, pairs)`.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.translate import wmt14

    prefix = shared_data_dir / "wmt14" / "newstest2013"
    english, german = (
        Path(f"{prefix}.{lang}").read_text(encoding="utf-8").splitlines()[:LOCAL_PAIRS]
        for lang in ("en", "de")
    )
    pairs = list(zip(english, german, strict=True))

    with tfds.core.registered.skip_registration():

        class LocalWmt14Translate(wmt14.Wmt14Translate):
            name = "wmt14_translate"

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(pairs)}

            def _generate_examples(self, examples):
                for index, (source, target) in enumerate(examples):
                    yield index, {"en": source, "de": target}

    data_dir = tmp_path_factory.mktemp("tfds")
    LocalWmt14Translate(config="de-en", data_dir=str(data_dir)).download_and_prepare()
    assert type(tfds.builder("wmt14_translate/de-en", data_dir=str(data_dir))) is (
        wmt14.Wmt14Translate
    )
    return data_dir, pairs


@pytest.mark.parametrize("recipe", ["wmt14_en_de_base.yaml", "wmt14_en_de_big.yaml"])
def test_the_recipes_tfds_spec_reads_wmt14_translate(local_wmt14, recipe):
    data_dir, pairs = local_wmt14
    train = load_run_config([RECIPES / recipe]).data.train
    assert train == {"spec": "tfds:wmt14_translate/de-en", "split": "train"}
    # The recipe's block as it is, plus where the prepared dataset lives.
    corpus = corpus_from_config({**train, "data_dir": str(data_dir)}, "en", "de")
    assert corpus.name == "tfds:wmt14_translate/de-en[train]"
    assert corpus.stats.read == LOCAL_PAIRS
    # TFDS shuffles the examples when it prepares them; the pairs stay pairs.
    assert sorted(corpus) == sorted(pairs)

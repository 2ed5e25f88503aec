"""`python -m training.translate`: arguments and stdin, n-best with scores and ids, and the same
outputs as the `Translator` that `evaluate` scores and the export serves."""

import json

import pytest
from tiny_run import SETTINGS, tiny_model_dir

from keras_transformer.translation import model_dir as layout
from training import translate

SENTENCES = ["A man rides a bike.", "Two dogs play in the snow.", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data_dir):
    return tiny_model_dir(tmp_path_factory, shared_data_dir)


def test_arguments_give_the_runs_translations(model_dir, capsys):
    """Catches a command that decodes with other settings than the run's decode section."""
    translator, _ = layout.load_translator(model_dir)
    assert translate.main(["--model-dir", str(model_dir), *SENTENCES]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == translator.translate(SENTENCES)
    assert lines[-1] == ""
    assert any(lines[:2])


def test_stdin_lines_nbest_scores_and_ids(model_dir, capsys, monkeypatch):
    """n-best from stdin: K hypotheses per sentence, best first, their scores those of the
    `beam` signature, their ids the tokens of the text. Catches stdin ignored, hypotheses
    unsorted or cut to one, and ids that do not belong to the hypothesis."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SENTENCES[:2]) + "\n"))
    argv = ["--model-dir", str(model_dir), "--nbest", "2", "--output-ids"]
    assert translate.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["source"] for row in rows] == SENTENCES[:2]
    translator, _ = layout.load_translator(model_dir)
    tokenizer = translator.tokenizer
    expected = translator.translate_nbest(SENTENCES[:2])
    for row, nbest in zip(rows, expected, strict=True):
        hypotheses = row["hypotheses"]
        assert len(hypotheses) == 2 == SETTINGS.nbest
        assert [h["translation"] for h in hypotheses] == [text for text, _ in nbest]
        scores = [h["score"] for h in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx([score for _, score in nbest], abs=1e-5)
        for hypothesis in hypotheses:
            ids = hypothesis["ids"]
            assert ids and 0 not in ids
            text = tokenizer.detokenize([ids]).numpy()[0].decode("utf-8")
            assert text == hypothesis["translation"]


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    assert translate.main(["--model-dir", str(tmp_path), "A dog."]) == 2
    assert "not a model directory" in capsys.readouterr().err

"""`python -m training.attention`: the figures of a sentence pair exist, one per layer and kind,
with the heads' maps of the right shapes and the SentencePiece pieces on their axes."""

import json

import numpy as np
import pytest
from tiny_run import tiny_model_dir

from keras_transformer.translation import model_dir as layout
from training import attention

SENTENCE = "A man rides a bike."
REFERENCE = "Ein Mann fährt Fahrrad."


@pytest.fixture(scope="module")
def translator(tmp_path_factory, shared_data_dir):
    translator, _ = layout.load_translator(tiny_model_dir(tmp_path_factory, shared_data_dir))
    return translator


def test_maps_have_the_pairs_shapes_and_are_causal(translator):
    """Catches maps of the wrong pair (rows/columns swapped, bos or eos missing) and decoder
    maps that see the future."""
    maps = attention.attention_maps(translator, SENTENCE, REFERENCE)
    source, target = maps["source_pieces"], maps["target_pieces"]
    assert source[-1] == "</s>" and target[0] == "<s>" and "</s>" not in target
    assert "".join(source[:-1]).replace("\u2581", " ").strip() == SENTENCE
    heads = translator.model.config.num_heads
    layers = translator.model.config.num_encoder_layers
    assert len(maps["encoder_self_attention"]) == layers
    for weights in maps["encoder_self_attention"]:
        assert weights.shape == (heads, len(source), len(source))
    for weights in maps["decoder_self_attention"]:
        assert weights.shape == (heads, len(target), len(target))
        assert np.allclose(np.triu(weights, k=1), 0.0)
    for weights in maps["cross_attention"]:
        assert weights.shape == (heads, len(target), len(source))
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)


def test_figures_are_labelled_with_the_pieces(translator):
    """Catches unlabelled or mislabelled axes and missing heads or layers."""
    maps = attention.attention_maps(translator, SENTENCE, REFERENCE)
    figures = attention.attention_figures(maps)
    config = translator.model.config
    expected = {
        f"{kind}_layer{i}"
        for kind in ("encoder_self", "decoder_self", "cross")
        for i in range(config.num_decoder_layers)
    } | {"alignment"}
    assert set(figures) == expected
    images = [axis for axis in figures["cross_layer0"].axes if axis.images]
    assert len(images) == config.num_heads
    for axis in images:
        assert [t.get_text() for t in axis.get_xticklabels()] == maps["source_pieces"]
        assert [t.get_text() for t in axis.get_yticklabels()] == maps["target_pieces"]
        assert axis.images[0].get_array().shape == (
            len(maps["target_pieces"]),
            len(maps["source_pieces"]),
        )
    (alignment,) = figures["alignment"].axes
    np.testing.assert_allclose(
        alignment.images[0].get_array(), maps["cross_attention"][-1].mean(axis=0), rtol=1e-6
    )


def test_command_writes_pngs_and_json(
    translator, tmp_path, tmp_path_factory, shared_data_dir, capsys
):
    model_dir = tiny_model_dir(tmp_path_factory, shared_data_dir)
    argv = ["--model-dir", str(model_dir), "--output-dir", str(tmp_path), SENTENCE]
    assert attention.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == translator.translate([SENTENCE])[0]
    for path in summary["figures"]:
        with open(path, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "attention.json").read_text())
    assert len(data["cross_attention"]) == translator.model.config.num_decoder_layers

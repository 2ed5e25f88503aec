"""TransformerConfig: presets, validation and JSON round trip."""

import pytest

from keras_transformer import TransformerConfig


def test_presets_match_the_paper_table_3():
    base = TransformerConfig.preset("base")
    big = TransformerConfig.preset("big")
    assert (base.d_model, base.num_heads, base.ffn_dim, base.num_encoder_layers) == (
        512,
        8,
        2048,
        6,
    )
    assert (big.d_model, big.num_heads, big.ffn_dim, big.num_decoder_layers) == (1024, 16, 4096, 6)
    assert (base.dropout, big.dropout, base.label_smoothing) == (0.1, 0.3, 0.1)
    small = TransformerConfig.preset("small")
    assert (small.d_model, small.num_heads, small.ffn_dim, small.num_encoder_layers) == (
        256,
        4,
        1024,
        3,
    )
    assert (base.pad_id, base.bos_id, base.eos_id) == (0, 2, 3)
    assert base.share_embeddings and base.norm_placement == "post"


def test_json_round_trip(tmp_path):
    config = TransformerConfig.preset("small", norm_placement="pre", vocab_size=123)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert TransformerConfig.from_json(path) == config
    assert TransformerConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=100, num_heads=8), "divisible by num_heads"),
        (dict(norm_placement="middle"), "norm_placement"),
        (dict(dropout=1.5), "dropout"),
        (dict(vocab_size=3), r"eos_id \(3\) is outside the vocabulary"),
        (dict(target_vocab_size=99), "share_embeddings=True needs one vocabulary"),
        (dict(bos_id=0), "must differ"),
    ],
)
def test_invalid_values_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig.preset("tiny", **changes)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        TransformerConfig.preset("huge")
    with pytest.raises(ValueError, match=r"Unknown TransformerConfig field\(s\) \['d_modle'\]"):
        TransformerConfig.from_dict({"d_modle": 3})

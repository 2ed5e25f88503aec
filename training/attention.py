"""`python -m training.attention --model-dir DIR "A man rides a bike."`: attention maps as PNGs.

For one sentence pair (the model's own translation by default, or `--reference`), writes per
layer a grid of the heads' encoder self-attention, decoder (causal) self-attention and
encoder-decoder attention, axes labelled with the SentencePiece pieces, and `alignment.png`:
the last decoder layer's encoder-decoder attention averaged over heads. The weights are the
ones the model computes (`Transformer.attention_weights`); `attention.json` holds them with the
pieces, for other viewers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from keras_transformer.translation import model_dir as layout
from quiet_logs import add_verbose_argument

# (key in `Transformer.attention_weights`, file prefix, title, which pieces label rows/columns)
KINDS = (
    ("encoder_self_attention", "encoder_self", "encoder self-attention", "source", "source"),
    ("decoder_self_attention", "decoder_self", "decoder self-attention", "target", "target"),
    ("cross_attention", "cross", "encoder-decoder attention", "target", "source"),
)


def attention_maps(translator, sentence: str, reference: str | None = None) -> dict:
    """Pieces and attention weights of one sentence pair.

    Args:
        translator: the run's `Translator` (its model, tokenizer and decode settings).
        sentence: the source text.
        reference: the target text; `None` means the model's own translation.

    Returns:
        A dict: `"source"`, `"target"` (texts), `"source_pieces"` (the encoder's input, eos
        included), `"target_pieces"` (the decoder's input: bos, then the target's pieces) and
        one list over layers per kind of `KINDS`, each `[heads, rows, columns]` float32.
    """
    import tensorflow as tf

    tokenizer = translator.tokenizer
    target = translator.translate([sentence])[0] if reference is None else reference
    source_ids, _, _ = translator.encode(tf.constant([sentence]))
    target_ids = translator.encode(tf.constant([target]))[0].numpy()[0]
    # The decoder reads bos and the target's pieces (its eos is what the last row predicts).
    decoder_ids = np.concatenate([[tokenizer.bos_id], target_ids[:-1]])[None].astype("int32")
    weights = translator.model.attention_weights(source_ids, decoder_ids)
    pieces = _pieces(tokenizer)
    maps = {
        "source": sentence,
        "target": target,
        "source_pieces": [pieces[i] for i in source_ids.numpy()[0]],
        "target_pieces": [pieces[i] for i in decoder_ids[0]],
    }
    for key, *_ in KINDS:
        maps[key] = [np.asarray(layer, "float32")[0] for layer in weights[key]]
    return maps


def _pieces(tokenizer) -> list[str]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def attention_figures(maps: dict) -> dict:
    """Matplotlib figures of `attention_maps`: `{file stem: Figure}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    for key, prefix, title, rows, columns in KINDS:
        for layer, heads in enumerate(maps[key]):
            count = len(heads)
            ncols = min(count, 4)
            nrows = -(-count // ncols)
            figure, axes = plt.subplots(
                nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False
            )
            for head, axis in enumerate(axes.flat):
                if head >= count:
                    axis.set_axis_off()
                    continue
                _heatmap(axis, heads[head], maps[f"{rows}_pieces"], maps[f"{columns}_pieces"])
                axis.set_title(f"head {head}", fontsize=9)
            figure.suptitle(f"{title}, layer {layer}")
            figure.tight_layout()
            figures[f"{prefix}_layer{layer}"] = figure
    alignment = maps["cross_attention"][-1].mean(axis=0)
    figure, axis = plt.subplots(figsize=(6, 6))
    _heatmap(axis, alignment, maps["target_pieces"], maps["source_pieces"])
    axis.set_xlabel("source")
    axis.set_ylabel("target (decoder input)")
    axis.set_title(
        "alignment: last layer's encoder-decoder attention,\nmean over heads", fontsize=10
    )
    figure.tight_layout()
    figures["alignment"] = figure
    return figures


def _heatmap(axis, weights, row_labels, column_labels):
    axis.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(len(column_labels)), column_labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(row_labels)), row_labels, fontsize=7)


def write_attention_maps(translator, sentence, output_dir, reference=None) -> dict:
    """Writes the PNGs and `attention.json` into `output_dir`; returns a summary."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    maps = attention_maps(translator, sentence, reference)
    written = []
    for stem, figure in attention_figures(maps).items():
        path = output_dir / f"{stem}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(str(path))
    data = {key: maps[key] for key in ("source", "target", "source_pieces", "target_pieces")}
    for key, *_ in KINDS:
        data[key] = [layer.round(5).tolist() for layer in maps[key]]
    (output_dir / "attention.json").write_text(json.dumps(data, ensure_ascii=False))
    return {"source": maps["source"], "target": maps["target"], "figures": written}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.attention", description=__doc__)
    parser.add_argument("sentence", help="the source sentence")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--checkpoint", default="auto", help="auto|averaged|best|final|last|PATH")
    parser.add_argument("--reference", help="target text (default: the model's translation)")
    parser.add_argument("--output-dir", help="default: MODEL_DIR/attention")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        translator, _ = layout.load_translator(args.model_dir, args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = args.output_dir or Path(args.model_dir) / "attention"
    summary = write_attention_maps(translator, args.sentence, output_dir, args.reference)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

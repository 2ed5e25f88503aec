"""`keras-transformer`: inspect presets and configs of the installed library.

Training and serving are applications run from a checkout (`python -m training.train`,
`python -m serving.export`); this command covers what the library alone can answer.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="keras-transformer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    presets = commands.add_parser("presets", help="table of presets and parameter counts")
    presets.add_argument("--vocab-size", type=int, help="count with this vocabulary size")
    config = commands.add_parser("config", help="print a preset as JSON")
    config.add_argument("name")
    args = parser.parse_args(argv)

    from keras_transformer.config import TransformerConfig

    if args.command == "config":
        try:
            print(TransformerConfig.preset(args.name).to_json(), end="")
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0

    from keras_transformer.model import build_transformer

    print("| preset | vocab | d_model | heads | ffn | layers | parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in TransformerConfig.preset_names():
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        c = TransformerConfig.preset(name, **overrides)
        count = build_transformer(c).count_params()
        layers = f"{c.num_encoder_layers}+{c.num_decoder_layers}"
        print(
            f"| {name} | {c.vocab_size} | {c.d_model} | {c.num_heads} | {c.ffn_dim} | {layers} "
            f"| {count:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

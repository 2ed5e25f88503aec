#!/usr/bin/env bash
# Regenerates the README's figures and sample translations from a finished run:
#   docs/make_figures.sh runs/multi30k_en_de_small
# (the model dir of ./main_job.sh). Writes docs/figures/ and docs/figures/samples.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:?usage: docs/make_figures.sh MODEL_DIR}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/figures}
SENTENCE=${SENTENCE:-$(sed -n 1p ../shared/data/multi30k/test_2016_flickr.en)}
mkdir -p "$OUT"
$PY -m training.curves --model-dir "$MODEL_DIR" --output-dir "$OUT"
ATTENTION=$(mktemp -d)
$PY -m training.attention --model-dir "$MODEL_DIR" --checkpoint averaged \
  --output-dir "$ATTENTION" "$SENTENCE"
# Layers are numbered from 0.
LAST=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['num_decoder_layers'] - 1)" \
  "$MODEL_DIR/transformer_config.json")
cp "$ATTENTION/alignment.png" "$OUT/attention_alignment.png"
cp "$ATTENTION/cross_layer$LAST.png" "$OUT/attention_cross_last_layer.png"
cp "$ATTENTION/decoder_self_layer0.png" "$OUT/attention_decoder_self_layer0.png"
cp "$ATTENTION/encoder_self_layer0.png" "$OUT/attention_encoder_self_layer0.png"
rm -rf "$ATTENTION"
# Sample translations: the first 5 sentences of test_2016_flickr with their references.
{
  echo "| source | reference | this run (averaged, beam 4) |"
  echo "|---|---|---|"
  paste -d '\t' <(head -n 5 ../shared/data/multi30k/test_2016_flickr.en) \
    <(head -n 5 ../shared/data/multi30k/test_2016_flickr.de) \
    <(head -n 5 ../shared/data/multi30k/test_2016_flickr.en |
      $PY -m training.translate --model-dir "$MODEL_DIR" --checkpoint averaged) |
    awk -F '\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }'
} > "$OUT/samples.md"
ls -la "$OUT"

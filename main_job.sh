#!/usr/bin/env bash
# The main job: set up, train Multi30k EN->DE `small` (60 minutes on a 2-core CPU by default),
# average checkpoints, score test_2016_flickr, export a SavedModel, serve it over gRPC and
# translate through the client. Environment knobs:
#   CONFIG=training/configs/NAME.yaml  MAX_MINUTES=60  MODEL_DIR=runs/...  PORT=8500  AVERAGE_LAST=20
#   EXPORT_BASE=MODEL_DIR/exports
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-training/configs/multi30k_en_de_small.yaml}
MAX_MINUTES=${MAX_MINUTES:-60}
MODEL_DIR=${MODEL_DIR:-runs/$(basename "$CONFIG" .yaml)}
PORT=${PORT:-8500}
EXPORT_BASE=${EXPORT_BASE:-$MODEL_DIR/exports}
# The commands hide TensorFlow's native logging themselves; KT_VERBOSE=1 shows it (README).

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[train,serve]'
PY=.venv/bin/python

$PY -m training.train --config "$CONFIG" \
  --set train.model_dir="$MODEL_DIR" --set train.max_minutes="$MAX_MINUTES"
$PY -m training.average --model-dir "$MODEL_DIR" --last "${AVERAGE_LAST:-20}"
$PY -m training.curves --model-dir "$MODEL_DIR"
# evaluate and export decode as the config's decode: section says (MODEL_DIR/decode_settings.json).
$PY -m training.evaluate --model-dir "$MODEL_DIR" --corpus text:../shared/data/multi30k/test_2016_flickr \
  --source-lang en --target-lang de | tee "$MODEL_DIR/test_2016_flickr.json"

# Served through the shipped serving/models.config (what docker-compose.yml serves): it serves
# versions 1 and 2 and labels 1 "stable", so this run's export is version 1 of its own export
# base. Versions are immutable: a re-run (of a finished run, same weights) keeps it.
VERSION=1
if [ -e "$EXPORT_BASE/transformer/$VERSION" ]; then
  echo "$EXPORT_BASE/transformer/$VERSION exists; serving it"
else
  $PY -m serving.export --model-dir "$MODEL_DIR" --output "$EXPORT_BASE/transformer/$VERSION"
fi
# The shipped config names the container path /models/transformer; this copy names the export.
$PY -m serving.model_config serving/models.config \
  --base-path "transformer=$EXPORT_BASE/transformer" --output "$EXPORT_BASE/models.config"
# The flags of docker-compose.yml: its labels need --allow_version_labels_for_unavailable_models.
SERVER_FLAGS=(--port="$PORT" --model_config_file="$EXPORT_BASE/models.config"
  --allow_version_labels_for_unavailable_models
  --enable_batching --batching_parameters_file=serving/batching_parameters.txt)

# The real model server when installed, else the development stand-in, on the same files.
if command -v tensorflow_model_server >/dev/null; then
  tensorflow_model_server "${SERVER_FLAGS[@]}" > "$MODEL_DIR/server.log" 2>&1 &
else
  $PY -m serving.devserver "${SERVER_FLAGS[@]}" > "$MODEL_DIR/server.log" 2>&1 &
fi
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
# The client waits until the server reports the model AVAILABLE (loading and warmup included).
head -n 5 ../shared/data/multi30k/test_2016_flickr.en |
  $PY -m serving.client --server "localhost:$PORT" --model transformer --label stable --wait 600 ||
  { cat "$MODEL_DIR/server.log"; exit 1; }

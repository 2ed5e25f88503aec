#!/usr/bin/env bash
# The main job: set up, train Multi30k EN->DE `small` (60 minutes on a 2-core CPU by default),
# average checkpoints, score test_2016_flickr, export a SavedModel, serve it over gRPC and
# translate through the client. Environment knobs:
#   CONFIG=training/configs/NAME.yaml  MAX_MINUTES=60  MODEL_DIR=runs/...  PORT=8500  AVERAGE_LAST=5
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-training/configs/multi30k_en_de_small.yaml}
MAX_MINUTES=${MAX_MINUTES:-60}
MODEL_DIR=${MODEL_DIR:-runs/$(basename "$CONFIG" .yaml)}
PORT=${PORT:-8500}
EXPORT_BASE=${EXPORT_BASE:-exports}
# The commands hide TensorFlow's native logging themselves; KT_VERBOSE=1 shows it (README).

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[train,serve]'
PY=.venv/bin/python

$PY -m training.train --config "$CONFIG" \
  --set train.model_dir="$MODEL_DIR" --set train.max_minutes="$MAX_MINUTES"
$PY -m training.average --model-dir "$MODEL_DIR" --last "${AVERAGE_LAST:-5}"
$PY -m training.curves --model-dir "$MODEL_DIR"
# evaluate and export decode as the config's decode: section says (MODEL_DIR/decode_settings.json).
$PY -m training.evaluate --model-dir "$MODEL_DIR" --corpus text:../shared/data/multi30k/test_2016_flickr \
  --source-lang en --target-lang de | tee "$MODEL_DIR/test_2016_flickr.json"

VERSION=$(date +%s)
$PY -m serving.export --model-dir "$MODEL_DIR" --output "$EXPORT_BASE/transformer/$VERSION"

# The real model server when installed, else the development stand-in, on the same files.
if command -v tensorflow_model_server >/dev/null; then
  tensorflow_model_server --port="$PORT" --model_name=transformer \
    --model_base_path="$PWD/$EXPORT_BASE/transformer" > "$MODEL_DIR/server.log" 2>&1 &
else
  $PY -m serving.devserver --model_base_path "$EXPORT_BASE/transformer" --model_name transformer \
    --port "$PORT" > "$MODEL_DIR/server.log" 2>&1 &
fi
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  $PY -c "import grpc,sys; grpc.channel_ready_future(grpc.insecure_channel('localhost:$PORT')).result(timeout=1)" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$MODEL_DIR/server.log"; exit 1; }
done
head -n 5 ../shared/data/multi30k/test_2016_flickr.en | \
  $PY -m serving.client --server "localhost:$PORT" --model transformer

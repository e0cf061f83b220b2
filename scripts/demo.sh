#!/usr/bin/env bash
# The main job on the embedded default (what `make demo` runs): a Prefect server on
# 127.0.0.1 with its state in ./.prefect, the build-fundusgen deployment served, a synthetic
# demo set generated, one `prefect deployment run ... --watch`, a summary, and a clean shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${VENV:-.venv}/bin
N_IMAGES=${DEMO_N:-48}
INPUT=$ROOT/demo/input
OUTPUT=$ROOT/demo/output

export PREFECT_HOME=$ROOT/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_COLORS=false
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
mkdir -p "$PREFECT_HOME"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "Prefect server and deployment stopped."
}
trap cleanup EXIT INT TERM

echo "Starting Prefect server on $PREFECT_API_URL (state in $PREFECT_HOME, log in .prefect/server.log)"
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; then break; fi
  sleep 1
done
"$BIN/python" -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" \
  || { echo "Prefect server did not start; see $PREFECT_HOME/server.log" >&2; exit 1; }

echo "Serving the build-fundusgen deployment (log in .prefect/serve.log)"
setsid "$BIN/fundus-engine" serve >"$PREFECT_HOME/serve.log" 2>&1 &
PIDS+=($!)

if [ ! -f "$INPUT/labels.json" ]; then
  "$BIN/fundus-engine" synth --n "$N_IMAGES" --seed 2024 --out "$INPUT"
fi

for _ in $(seq 1 120); do
  if "$BIN/prefect" deployment inspect build-fundusgen/build-fundusgen >/dev/null 2>&1; then break; fi
  sleep 1
done

START=$(date +%s)
# A quarter of the demo's 24 patients is held out, so the benchmark split has questions.
"$BIN/prefect" deployment run build-fundusgen/build-fundusgen \
  -p input_dir="$INPUT" -p output_dir="$OUTPUT" \
  -p 'config={"write": {"val_fraction": 0.1, "test_fraction": 0.25}}' --watch
echo "Deployment run finished in $(( $(date +%s) - START )) s"

"$BIN/fundus-engine" inspect "$OUTPUT" --rows 0 --overlays 4
echo "Dataset: $OUTPUT/dataset   Rejects: $OUTPUT/rejects.parquet   Manifest: $OUTPUT/manifest.json"

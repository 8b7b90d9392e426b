#!/usr/bin/env bash
# Start the Dagster UI (http://127.0.0.1:3000) and the MLflow UI (http://127.0.0.1:5000) on this repository's
# state (.matrix/). Both bind to 127.0.0.1 only. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/dagster ] || bash scripts/install.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD}" MATRIX_HOME="${MATRIX_HOME:-$PWD/.matrix}"
export MATRIX_DAGSTER_STORAGE="${MATRIX_DAGSTER_STORAGE:-$MATRIX_HOME/dagster}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
mkdir -p "$MATRIX_HOME/mlartifacts" "$MATRIX_DAGSTER_STORAGE"
DAGSTER_PORT="${DAGSTER_PORT:-3000}" MLFLOW_PORT="${MLFLOW_PORT:-5000}"

set -m  # each server in its own process group, so that it can be stopped cleanly
.venv/bin/mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$MATRIX_HOME/mlflow.db}" \
  --default-artifact-root "$MATRIX_HOME/mlartifacts" &
mlflow_pid=$!
.venv/bin/dagster dev -h 127.0.0.1 -p "$DAGSTER_PORT" -w workspace.yaml &
dagster_pid=$!
trap 'kill -TERM -- -$dagster_pid -$mlflow_pid 2>/dev/null; wait' INT TERM EXIT
echo "Dagster UI: http://127.0.0.1:$DAGSTER_PORT   MLflow UI: http://127.0.0.1:$MLFLOW_PORT   (Ctrl-C stops both)"
wait

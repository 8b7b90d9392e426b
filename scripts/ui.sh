#!/usr/bin/env bash
# Start the Dagster UI (http://127.0.0.1:3000, DAGSTER_PORT) and the MLflow UI (http://127.0.0.1:5000, MLFLOW_PORT or
# MATRIX_MLFLOW_UI_URL) on this repository's state (.matrix/). Both bind to 127.0.0.1 only. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/dagster ] || bash scripts/install.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD}" MATRIX_HOME="${MATRIX_HOME:-$PWD/.matrix}"
export MATRIX_DAGSTER_STORAGE="${MATRIX_DAGSTER_STORAGE:-$MATRIX_HOME/dagster}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
mkdir -p "$MATRIX_HOME/mlartifacts" "$MATRIX_DAGSTER_STORAGE"
DAGSTER_PORT="${DAGSTER_PORT:-3000}"
# One setting for where MLflow serves: MATRIX_MLFLOW_UI_URL (the links on Dagster's materializations read it too).
# Without it, MLFLOW_PORT (default 5000) picks the port and the URL follows.
if [ -n "${MATRIX_MLFLOW_UI_URL:-}" ]; then
  MLFLOW_PORT="$(.venv/bin/python -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port or 80)' "$MATRIX_MLFLOW_UI_URL")"
else
  MLFLOW_PORT="${MLFLOW_PORT:-5000}"
  export MATRIX_MLFLOW_UI_URL="http://127.0.0.1:$MLFLOW_PORT"
fi
# The role folders of the new-prompt-set sensor: a file dropped in drop/ROLE/ is a prompt set with that role.
drop="$(.venv/bin/python -c 'from matrix_assets.store.prompt_sets import ensure_drop_folders; print(ensure_drop_folders())')"

set -m  # each server in its own process group, so that it can be stopped cleanly
.venv/bin/mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$MATRIX_HOME/mlflow.db}" \
  --default-artifact-root "$MATRIX_HOME/mlartifacts" &
mlflow_pid=$!
.venv/bin/dagster dev -h 127.0.0.1 -p "$DAGSTER_PORT" -w workspace.yaml &
dagster_pid=$!
trap 'kill -TERM -- -$dagster_pid -$mlflow_pid 2>/dev/null; wait' INT TERM EXIT
echo "Dagster UI: http://127.0.0.1:$DAGSTER_PORT   MLflow UI: $MATRIX_MLFLOW_UI_URL   (Ctrl-C stops both)"
echo "New prompt sets: drop a file into $drop/harmful/, $drop/safe/ or $drop/helpfulness/"
wait

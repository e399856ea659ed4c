"""marl-ray: Multi-Adapter RL on Ray.

One base model (optionally 4/8-bit) serves every PPO role through named LoRA adapters:
trainable policies with value heads, frozen reward adapters with score heads, and the
reference (adapters disabled, or a frozen reference adapter).
"""

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLMWithValueHead", "MultiAdapterModel", "__version__"]


def __getattr__(name):
    # Lazy: `import marl_ray` stays cheap (no torch/transformers) for the CLI's --help.
    if name == "MultiAdapterModel":
        from marl_ray.model import MultiAdapterModel

        return MultiAdapterModel
    if name == "AutoModelForCausalLMWithValueHead":
        from marl_ray.trl_compat import AutoModelForCausalLMWithValueHead

        return AutoModelForCausalLMWithValueHead
    raise AttributeError(f"module 'marl_ray' has no attribute {name!r}")

"""Configuration: the schema (``schema.py``) apart from the machinery that loads it (``loader.py``)."""

from marl_ray.config.loader import (
    ConfigError, add_config_args, config_from_args, config_help, load_config, opt, save_config, spec, to_dict,
    validate,
)
from marl_ray.config.schema import (
    RESERVED_NAMES, ClusterSpec, DataSpec, GenerationSpec, LoraSpec, ModelSpec, PolicySpec, PPORunConfig, PPOSpec,
    RewardSpec, RunSpec,
)

__all__ = [
    "ConfigError", "add_config_args", "config_from_args", "config_help", "load_config", "opt", "save_config", "spec",
    "to_dict", "validate", "RESERVED_NAMES", "ClusterSpec", "DataSpec", "GenerationSpec", "LoraSpec", "ModelSpec",
    "PolicySpec", "PPORunConfig", "PPOSpec", "RewardSpec", "RunSpec",
]

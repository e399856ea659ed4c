"""The model layer: one base, its adapters, the passes over them and the samplers (no Ray here)."""

from marl_ray.model.adapter_io import AdapterError
from marl_ray.model.adapters import REF, AdapterRegistry
from marl_ray.model.loading import DTYPES, QUANTIZATIONS, load_base, quantization_config
from marl_ray.model.passes import Evaluation, MultiAdapterModel, RolloutScores, last_token_index, positions
from marl_ray.model.routing import BASE

__all__ = ["AdapterError", "AdapterRegistry", "BASE", "DTYPES", "Evaluation", "MultiAdapterModel", "QUANTIZATIONS",
           "REF", "RolloutScores", "last_token_index", "load_base", "positions", "quantization_config"]

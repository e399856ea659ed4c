"""Episodes: multi-turn rounds with tools, several roles played by policies (or the reference) of one
base in one episode, each policy learning from its own turns (docs/episodes.md)."""

from marl_ray.episodes.env import Environment, load_environment, parse_tool_calls
from marl_ray.episodes.runner import EpisodeBatch, EpisodeError, EpisodeRunner

__all__ = ["Environment", "EpisodeBatch", "EpisodeError", "EpisodeRunner", "load_environment", "parse_tool_calls"]

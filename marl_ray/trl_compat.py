"""Drop-in for TRL's orphaned multi-adapter API (TRL <= 0.11).

    from marl_ray import AutoModelForCausalLMWithValueHead   # was: from trl import ...
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, peft_config=lora_config, reward_adapter=rm_adapter_id,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    scores = model.compute_reward_score(**inputs)                        # (B, T, num_labels)
    scores = model.compute_reward_score(**inputs, ppo_adapter_name="policy_1")

Fixed against TRL: `ppo_adapter_name` is honoured (TRL >= 0.7.5 swallowed it and re-activated
"default"); the score head gets a bias only if the adapter has one; `reward_scores` reads each
sequence's last real token (TRL's example read index -1, wrong for right padding); scoring runs
without autograd and leaves the reward adapter frozen and the train/eval mode as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from marl_ray.model import MultiAdapterModel, last_token_index, load_base


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM base with named LoRA policies (+ value heads) and a reward adapter."""

    def __init__(self, model: MultiAdapterModel, active: str | None = None):
        super().__init__()
        self.model = model
        self.active = active

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, peft_config=None, reward_adapter=None,
                        reward_adapter_name: str = "reward_adapter", quantization_config=None,
                        adapter_name: str = "default", torch_dtype=None, dtype=None, **_ignored):
        """Like TRL: a base (path, hub id or already-loaded model), a new policy from
        `peft_config` (or the policy folder given as the model), and a reward adapter."""
        src = pretrained_model_name_or_path
        policy_folder = None
        if isinstance(src, (str, Path)) and (Path(src) / "adapter_config.json").exists():
            import json

            policy_folder = Path(src)
            src = json.loads((policy_folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        if isinstance(src, nn.Module):
            base = src.requires_grad_(False).eval()
        else:
            base = load_base(str(src), quantization_config or "none", dtype or torch_dtype or "fp32")
        model = MultiAdapterModel(base)
        if policy_folder is not None:
            model.load_policy(adapter_name, policy_folder)
        elif peft_config is not None:
            model.add_policy(adapter_name, peft_config)
        if reward_adapter is not None:
            model.add_reward(reward_adapter_name, reward_adapter)
        return cls(model, active=adapter_name if model.policies else None)

    # TRL names
    @property
    def pretrained_model(self):
        return self.model.peft if self.model.peft is not None else self.model.base

    @property
    def v_head(self) -> nn.Module:
        return self.model.value_heads[self.active]

    @property
    def is_peft_model(self) -> bool:
        return self.model.peft is not None

    @property
    def supports_rm_adapter(self) -> bool:
        return bool(self.model.rewards)

    @property
    def rm_adapter_name(self) -> str | None:
        return self.model.rewards[0] if self.model.rewards else None

    def set_adapter(self, name: str):
        self.model._require(name, "policy")
        self.active = name

    def add_policy(self, name: str, peft_config, seed: int | None = None):
        self.model.add_policy(name, peft_config, seed=seed)

    def _policy(self) -> str:
        return self.active if self.active is not None else "ref"

    def forward(self, input_ids, attention_mask=None, **_ignored):
        """(lm_logits (B, T, V), loss None, values (B, T)) under the active policy, like TRL."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.model.hidden(input_ids, attention_mask, self._policy())
        values = self.model.values(self.active, h) if self.active is not None else None
        return self.model.lm_logits(h), None, values

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Generation under the active policy (HF `generate` keyword arguments pass through)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad(), self.model.route([self._policy()] * input_ids.shape[0]):
            return self.model.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def compute_reward_score(self, input_ids, attention_mask=None, ppo_adapter_name: str | None = None,
                             reward_adapter_name: str | None = None, **_ignored):
        """Per-token reward scores (B, T, num_labels) from the reward adapter.

        Afterwards the policy named by `ppo_adapter_name` (default: the one active before) is
        the active one, and every module's train/eval mode is as it was.
        """
        name = reward_adapter_name or self.rm_adapter_name
        if name is None:
            raise ValueError("this model has no reward adapter: pass reward_adapter=... to from_pretrained")
        if ppo_adapter_name is not None:
            self.model._require(ppo_adapter_name, "policy")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        scores = self.model.token_scores(name, self.model.hidden(input_ids, attention_mask, name))
        if ppo_adapter_name is not None:
            self.active = ppo_adapter_name
        return scores

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask=None, reward_adapter_name: str | None = None):
        """One reward per sequence at its last real token, right, left or no padding. (B,)"""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        per_token = self.compute_reward_score(input_ids, attention_mask, reward_adapter_name=reward_adapter_name)
        idx = last_token_index(attention_mask)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), idx, 0]

    def save_pretrained(self, folder, adapter_name: str | None = None):
        """Save a policy (peft folder + value head), the active one by default."""
        self.model.save_policy(adapter_name or self.active, folder)

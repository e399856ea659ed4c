"""Fast tests of marl_ray.config: loading, overrides, validation messages, round trip, --help."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing

import pytest
import yaml

from marl_ray.config import (
    ClusterSpec, ConfigError, GenerationSpec, LoraSpec, ModelSpec, PolicySpec, PPORunConfig, PPOSpec, RewardSpec,
    add_config_args, config_from_args, load_config, save_config, to_dict, validate,
)

MINIMAL = """\
model:
  base: tiny-llama
rewards:
  - {name: rm, path: runs/rm}
policies:
  - {name: alice, reward: rm}
  - {name: bob, reward: rm, reward_weight: -1.0}
"""


def minimal() -> dict:
    return yaml.safe_load(MINIMAL)


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL)
    return str(path)


def load(overrides=(), **sections):
    """Minimal config with ``sections`` merged over it (top-level keys replaced)."""
    return load_config(PPORunConfig, base={**minimal(), **sections}, overrides=overrides)


def error_of(overrides=(), **sections) -> str:
    with pytest.raises(ConfigError) as e:
        load(overrides, **sections)
    return str(e.value)


# ------------------------------------------------------------------------------------ loading


def test_minimal_yaml_loads_with_defaults(cfg_file):
    cfg = load_config(PPORunConfig, cfg_file)
    assert cfg.model == ModelSpec(base="tiny-llama")
    assert cfg.rewards == (RewardSpec(name="rm", path="runs/rm"),)
    assert [p.name for p in cfg.policies] == ["alice", "bob"]
    assert cfg.policies[1].reward_weight == -1.0 and cfg.policies[0].reward_weight == 1.0
    # null: the architecture's query and value projections (model/targets.py), q_proj and v_proj on Llama
    assert cfg.policies[0].lora == LoraSpec() and cfg.policies[0].lora.target_modules is None
    assert cfg.ppo == PPOSpec() and cfg.generation == GenerationSpec() and cfg.cluster == ClusterSpec()
    assert cfg.ppo.batch_size == 16 and cfg.ppo.mini_batch_size == 8 and cfg.ppo.kl_penalty == "kl"
    assert cfg.model.quantization == "none" and cfg.model.dtype == "fp32" and cfg.model.tokenizer is None
    assert cfg.generation.min_new_tokens is None and cfg.data.prompts == "embedded"
    assert cfg.cluster.address is None and cfg.run.out_dir == "runs/ppo"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ppo.steps = 3  # type: ignore[misc]


def test_defaults_construct_directly():
    cfg = PPORunConfig(model=ModelSpec(base="m"), rewards=(RewardSpec(name="rm", path="p"),),
                       policies=(PolicySpec(name="a", reward="rm"),))
    assert cfg.ppo.steps == 10 and cfg.policies[0].lr == pytest.approx(1.41e-5)


@pytest.mark.parametrize("dtype, quant, setting, scored", [
    ("fp32", "none", None, True), ("bf16", "none", None, True), ("fp32", "4bit", None, False),
    ("bf16", "8bit", None, False), ("bf16", "none", False, False), ("fp32", "4bit", True, True)])
def test_rollout_logprobs_default(dtype, quant, setting, scored):
    """ppo.rollout_logprobs null: the decode steps' logprobs stand in for a policy pass on a
    full-precision base, fp32 or bf16, not on a 4/8-bit one; a setting wins."""
    from marl_ray.train.loop import rollout_scored

    cfg = load([f"model.dtype={dtype}", f"model.quantization={quant}",
                f"ppo.rollout_logprobs={'null' if setting is None else str(setting).lower()}"])
    assert rollout_scored(cfg) is scored


def test_base_dict_is_merged_under_yaml(cfg_file):
    cfg = load_config(PPORunConfig, cfg_file, base={"ppo": {"steps": 7, "batch_size": 32}, "model": {"dtype": "bf16"}})
    assert cfg.ppo.steps == 7 and cfg.ppo.batch_size == 32
    assert cfg.model.dtype == "bf16" and cfg.model.base == "tiny-llama"  # yaml keeps its keys, base fills the rest


def test_scalar_overrides(cfg_file):
    cfg = load_config(PPORunConfig, cfg_file, [
        "ppo.steps=3", "model.quantization=4bit", "cluster.address=auto", "run.tensorboard=false",
        "generation.min_new_tokens=null", "ppo.max_grad_norm=null", "ppo.gamma=1", "data.prompts=p.jsonl",
    ])
    assert cfg.ppo.steps == 3 and cfg.model.quantization == "4bit" and cfg.cluster.address == "auto"
    assert cfg.run.tensorboard is False and cfg.ppo.max_grad_norm is None
    assert cfg.ppo.gamma == 1.0 and isinstance(cfg.ppo.gamma, float)  # an int for a float field is fine
    assert cfg.data.prompts == "p.jsonl"


def test_list_element_overrides(cfg_file):
    cfg = load_config(PPORunConfig, cfg_file, [
        "policies[0].lr=1e-4",  # YAML 1.1 reads 1e-4 as a string; float fields accept it
        "policies[1].lora.r=8", "policies[1].lora.target_modules=[q_proj, k_proj, v_proj]",
        "rewards[0].path=other/rm",
        "policies[2].name=carol", "policies[2].reward=rm",  # [len] appends
    ])
    assert cfg.policies[0].lr == 1e-4 and cfg.policies[1].lr == pytest.approx(1.41e-5)
    assert cfg.policies[1].lora == LoraSpec(r=8, target_modules=("q_proj", "k_proj", "v_proj"))
    assert cfg.rewards[0].path == "other/rm"
    assert [p.name for p in cfg.policies] == ["alice", "bob", "carol"]


def test_override_errors(cfg_file):
    with pytest.raises(ConfigError, match=r"policies\[5\]: index out of range.*2 items"):
        load_config(PPORunConfig, cfg_file, ["policies[5].lr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(PPORunConfig, cfg_file, ["ppo.steps"])
    with pytest.raises(ConfigError, match=r"ppo\.step: unknown key; did you mean 'steps'"):
        load_config(PPORunConfig, cfg_file, ["ppo.step=3"])
    # keys an earlier version read: the error says why they are gone
    with pytest.raises(ConfigError, match=r"cluster\.keep_rows: removed: rows always stay on the host"):
        load_config(PPORunConfig, cfg_file, ["cluster.keep_rows=false"])
    with pytest.raises(ConfigError, match=r"cluster\.grad_sync: removed: .*among themselves"):
        load_config(PPORunConfig, cfg_file, ["cluster.grad_sync=driver"])


# --------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, message", [
    (["model.quantization=3bit"], "model.quantization: '3bit' is not one of none, 8bit, 4bit"),
    (["model.dtype=fp16"], "model.dtype: 'fp16' is not one of fp32, bf16"),
    (["ppo.kl_penalty=l2"], "ppo.kl_penalty: 'l2' is not one of kl, abs, mse"),
    (["cluster.placement=pack"], "cluster.placement: 'pack' is not one of spread, node_affinity"),
    (["ppo.mini_batch_size=5"], "ppo.mini_batch_size: 5 does not divide ppo.batch_size 16"),
    (["ppo.lam=0"], "ppo.lam: 0.0 must be > 0 and <= 1"),
    (["ppo.lam=1.5"], "ppo.lam: 1.5 must be > 0 and <= 1"),
    (["ppo.gamma=0"], "ppo.gamma: 0.0 must be > 0 and <= 1"),
    (["ppo.steps=0"], "ppo.steps: 0 must be >= 1"),
    (["ppo.batch_size=-4"], "ppo.batch_size: -4 must be >= 1"),
    (["ppo.max_grad_norm=0"], "ppo.max_grad_norm: 0.0 must be > 0"),
    (["policies[1].lr=0"], "policies[1].lr: 0.0 must be > 0"),
    (["policies[0].lora.r=0"], "policies[0].lora.r: 0 must be >= 1"),
    (["policies[0].lora.dropout=1"], "policies[0].lora.dropout: 1.0 must be >= 0 and < 1"),
    (["policies[0].lora.target_modules=[]"], "policies[0].lora.target_modules: list at least one module"),
    (["policies[0].lora.target_modules=[all-linear, q_proj]"],
     "policies[0].lora.target_modules: ['all-linear', 'q_proj']: all-linear already names every linear layer"),
    (["generation.temperature=0"], "generation.temperature: 0.0 must be > 0"),
    (["generation.min_new_tokens=40"], "generation.min_new_tokens: 40 is larger than generation.max_new_tokens 32"),
    (["cluster.num_hosts=0"], "cluster.num_hosts: 0 must be >= 1"),
    (["cluster.host_num_gpus=-1"], "cluster.host_num_gpus: -1.0 must be >= 0"),
    (["model.base=''"], "model.base: must not be empty"),
    (["policies[1].reward=rm2"], "policies[1].reward: 'rm2' is not one of the rewards ['rm']"),
    (["policies[1].name=alice"], "policies[1].name: 'alice' is already the name of policies[0]"),
    (["policies[0].name=rm"], "policies[0].name: 'rm' is already the name of rewards[0]"),
    (["policies[0].name=my policy"], "policies[0].name: 'my policy' is not a safe name"),
    (["policies[0].name=a/b"], "policies[0].name: 'a/b' is not a safe name"),
    (["rewards[0].name=rm.v2"], "rewards[0].name: 'rm.v2' is not a safe name"),
])
def test_validation_errors_name_the_field(overrides, message):
    assert message in error_of(overrides)


@pytest.mark.parametrize("name", ["ref", "reference", "__base__", "default", "Default"])
@pytest.mark.parametrize("role", ["policies[0]", "rewards[0]"])
def test_reserved_names(name, role):
    assert f"{role}.name: {name!r} is a reserved role name" in error_of([f"{role}.name={name}"])


def test_unique_reward_names():
    msg = error_of(rewards=[{"name": "rm", "path": "a"}, {"name": "rm", "path": "b"}])
    assert "rewards[1].name: 'rm' is already the name of rewards[0]" in msg


def test_at_least_one_policy():
    assert "policies: at least one policy is required" in error_of(policies=[])


def test_missing_required_field():
    assert "model.base: required field is missing" in error_of(model={"dtype": "bf16"})
    assert "policies[0].reward: required field is missing" in error_of(policies=[{"name": "a"}])


def test_valid_edge_values():
    cfg = load(["ppo.lam=1", "ppo.mini_batch_size=16", "generation.min_new_tokens=32", "policies[0].name=a-b_1",
                "policies[0].reward_weight=-2", "generation.top_k=0"])
    assert cfg.ppo.lam == 1.0 and cfg.policies[0].name == "a-b_1" and cfg.generation.min_new_tokens == 32


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"ppo\.mini_batch_size: 3 does not divide ppo\.batch_size 16"):
        PPORunConfig(model=ModelSpec(base="m"), rewards=(RewardSpec(name="rm", path="p"),),
                     policies=(PolicySpec(name="a", reward="rm"),), ppo=PPOSpec(mini_batch_size=3))
    with pytest.raises(ConfigError, match=r"^steps: expected int, got str '3'"):
        validate(PPOSpec(steps="3"))  # type: ignore[arg-type]
    cfg = load()
    with pytest.raises(ConfigError, match=r"ppo\.steps: 0 must be >= 1"):
        dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, steps=0))


# -------------------------------------------------------------------------- keys, types, YAML


def test_unknown_key_suggests_and_lists_valid_keys():
    msg = error_of(ppo={"stesp": 3})
    assert "ppo.stesp: unknown key; did you mean 'steps'?" in msg and "mini_batch_size" in msg
    assert "did you mean 'policies'" in error_of(polices=[])
    msg = error_of(policies=[{"name": "a", "reward": "rm", "lora": {"rank": 4}}])
    assert "policies[0].lora.rank: unknown key" in msg and "valid keys: r, alpha, dropout, target_modules" in msg


@pytest.mark.parametrize("sections, message", [
    ({"ppo": {"steps": "3"}}, "ppo.steps: expected int, got str '3' (write it without quotes)"),
    ({"ppo": {"steps": 2.5}}, "ppo.steps: expected int, got float 2.5"),
    ({"ppo": {"steps": True}}, "ppo.steps: expected int, got bool True"),
    ({"ppo": {"gamma": "high"}}, "ppo.gamma: expected float, got str 'high'"),
    ({"run": {"tensorboard": "yes please"}}, "run.tensorboard: expected bool, got str 'yes please'"),
    ({"model": {"base": 12}}, "model.base: expected a string, got int 12 (quote it)"),
    ({"ppo": [1, 2]}, "ppo: expected a mapping of PPOSpec fields"),
    ({"policies": {"name": "a"}}, "policies: expected a list of PolicySpec"),
    ({"policies": [{"name": "a", "reward": "rm", "lora": {"target_modules": 3}}]},
     "policies[0].lora.target_modules: expected a list of str"),
    ({"policies": [{"name": "a", "reward": "rm", "lora": {"target_modules": ["q", 3]}}]},
     "policies[0].lora.target_modules[1]: expected a string, got int 3"),
])
def test_type_errors_name_the_field(sections, message):
    assert message in error_of(**sections)


def test_integral_float_for_int_field_is_accepted():
    assert load(ppo={"steps": 4.0}).ppo.steps == 4


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  base: m\nppo: {steps: 3\nrun:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 4, column \d+: invalid YAML.*at line 3\)") as e:
        load_config(PPORunConfig, str(path))
    path.write_text("model:\n  base: m\n   dtype: bf16\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3, column \d+: invalid YAML"):
        load_config(PPORunConfig, str(path))
    assert str(path) in str(e.value)


def test_non_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(PPORunConfig, str(path))
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(PPORunConfig, str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------------------- round trip


def test_round_trip_through_dict_and_file(tmp_path):
    cfg = load(["ppo.steps=3", "policies[0].lr=1e-4", "policies[1].lora.target_modules=[k_proj]",
                "generation.min_new_tokens=4", "cluster.num_hosts=2", "model.tokenizer=tok"])
    plain = to_dict(cfg)
    assert plain["policies"][1]["lora"]["target_modules"] == ["k_proj"] and isinstance(plain["rewards"], list)
    assert load_config(PPORunConfig, base=plain) == cfg
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert yaml.safe_load((tmp_path / "sub" / "config.yaml").read_text()) == plain
    assert load_config(PPORunConfig, str(tmp_path / "sub" / "config.yaml")) == cfg


# ------------------------------------------------------------------------------------ argparse


def all_fields(cls, at=""):
    """(dotted path, field, is_section) for every field of cls, recursively; list items as name[i]."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        sub = tp if dataclasses.is_dataclass(tp) else item if dataclasses.is_dataclass(item) else None
        yield f"{at}{f.name}", f, sub is not None
        if sub is not None:
            yield from all_fields(sub, f"{at}{f.name}{'[i]' if item else ''}.")


def test_help_lists_every_field():
    parser = add_config_args(argparse.ArgumentParser(prog="marl-ray"), PPORunConfig)
    text = " ".join(parser.format_help().split())
    assert "--config PATH" in text and "--set KEY=VALUE" in text
    listed = list(all_fields(PPORunConfig))
    assert len(listed) > 60
    for path, f, is_section in listed:
        assert f.metadata["help"], f"{path} has no help"
        assert " ".join(f.metadata["help"].split()) in text, f"help of {path} missing from --help"
        assert f"{path}{'[i]' if path in ('rewards', 'policies') else ''}{':' if is_section else ' ('}" in text
    assert "ppo.mini_batch_size (int >= 1, default 8):" in text
    assert "model.base (str, required):" in text
    assert "model.quantization (none|8bit|4bit, default none):" in text
    assert "policies[i].lora.target_modules (list of str or null, default null):" in text
    assert "generation.min_new_tokens (int >= 0 or null, default null):" in text
    assert "ppo.lam (float > 0 and <= 1, default 0.95):" in text


def test_help_keeps_existing_epilog_and_line_breaks():
    parser = add_config_args(argparse.ArgumentParser(prog="x", epilog="Example: x --config run.yaml"), PPORunConfig)
    help_text = parser.format_help()
    assert "Example: x --config run.yaml" in help_text
    assert "\n  ppo.steps (int >= 1, default 10):" in help_text  # one field per line, not re-flowed


def test_config_from_args(cfg_file):
    parser = add_config_args(argparse.ArgumentParser(), PPORunConfig)
    args = parser.parse_args(["--config", cfg_file, "--set", "ppo.steps=2", "--set", "policies[1].lr=0.001"])
    cfg = config_from_args(args, PPORunConfig)
    assert cfg.ppo.steps == 2 and cfg.policies[1].lr == 0.001
    args = parser.parse_args(["--set", "ppo.steps=2"])
    assert config_from_args(args, PPORunConfig, base=minimal()).ppo.steps == 2
    with pytest.raises(ConfigError, match="model: required field is missing"):
        config_from_args(parser.parse_args([]), PPORunConfig)


def test_sections_load_on_their_own(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(textwrap.dedent("""\
        steps: 5
        cliprange: 0.1
    """))
    assert load_config(PPOSpec, str(path)) == PPOSpec(steps=5, cliprange=0.1)
    with pytest.raises(ConfigError, match="^mini_batch_size: 3 does not divide batch_size 16"):
        load_config(PPOSpec, overrides=["mini_batch_size=3"])

"""The schema of a multi-adapter RL run: typed, frozen dataclasses, one per YAML section.

Every knob is a field whose help text sits in ``metadata["help"]`` (see ``loader.opt``), in the style
of CleanRL's ``Args``. One YAML mapping maps 1:1 onto the dataclass nesting::

    model: {base: path/to/causal-lm}
    rewards: [{name: rm, path: runs/rm/adapter}]
    policies: [{name: alice, reward: rm}, {name: bob, reward: rm, reward_weight: -1.0}]
    ppo: {steps: 3}

Cross-field rules live in each section's ``_check``; types, choices and bounds are checked by
``loader.validate`` when a ``PPORunConfig`` is built.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from marl_ray.config.loader import _fail, _join, opt, spec, validate

RESERVED_NAMES = ("ref", "reference", "__base__", "default")  # role names no adapter may take
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

@spec
class LoraSpec:
    r: int = opt(16, "LoRA rank.", ge=1)
    alpha: int = opt(32, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    dropout: float = opt(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: Optional[tuple[str, ...]] = opt(
        None, "Modules LoRA wraps: names (a name matches each module whose dotted path ends with it, e.g. "
        "q_proj), or all-linear (every linear layer but the output head); null = the attention's query and value "
        "projections of the base's architecture: q_proj, v_proj on Llama, Mistral, Qwen2/3 and Gemma 2/3, the fused "
        "qkv_proj on Phi-3, c_attn on GPT-2, all-linear on an architecture not in that table. A name that matches "
        "nothing in the base is refused before training starts, with the names the base has.", one_or_many=True)

    def _check(self, at: str) -> None:
        if self.target_modules is None:
            return
        if not self.target_modules:
            _fail(_join(at, "target_modules"), "list at least one module name, e.g. [q_proj, v_proj], or all-linear, "
                  "or null for the architecture's default")
        if len(self.target_modules) > 1 and any(t.lower() == "all-linear" for t in self.target_modules):
            _fail(_join(at, "target_modules"), f"{list(self.target_modules)}: all-linear already names every linear "
                  "layer; give it alone or list names")


@spec
class ModelSpec:
    base: str = opt(help="Path or hub id of the causal LM shared by every role (policies, rewards, reference).")
    tokenizer: Optional[str] = opt(None, "Tokenizer path or hub id; null = same as model.base.")
    quantization: Literal["none", "8bit", "4bit"] = opt("none", "Load the frozen base weights quantised.")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "Floating-point dtype of the base model.")
    reference_adapter: Optional[str] = opt(None, "Frozen LoRA adapter used as the reference; null = the bare base.")
    gradient_checkpointing: Optional[bool] = opt(
        None, "Recompute decoder layers in the backward pass instead of storing their activations (less memory, "
        "about one more forward per training pass); null = on for 4/8-bit bases, off otherwise.")
    head_chunk: Optional[int] = opt(
        None, "Positions per chunk of the output head in the scoring and training passes: the log-probability "
        "and entropy of each response token are computed a chunk at a time, so the logits of all positions "
        "(rows x tokens x vocabulary) never exist at once; null = auto (about 2^24 logits a chunk: 341 positions "
        "for a 49k vocabulary).", ge=1)


def _check_name(at: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        _fail(_join(at, "name"), f"{name!r} is not a safe name; use only letters, digits, '_' and '-'")
    if name.lower() in RESERVED_NAMES:
        _fail(_join(at, "name"), f"{name!r} is a reserved role name ({', '.join(RESERVED_NAMES)}); pick another")


@spec
class RewardSpec:
    name: str = opt(help="Name of this reward; policies refer to it by this name.")
    path: Optional[str] = opt(None, "A reward adapter: folder of a saved LoRA reward adapter with its score head "
                              "(`marl-ray reward`, or TRL RewardTrainer's SEQ_CLS folder).")
    function: Optional[str] = opt(
        None, "A programmatic (verifiable) reward: 'my_pkg.tasks:exact_match' or 'path/to/task.py:exact_match', "
        "called as fn(prompts, completions, **columns) -> one float (or None: not applicable) per completion, "
        "as TRL's GRPOTrainer calls reward functions; columns are the prompt data's other fields. "
        "`async def` functions are awaited.")

    def _check(self, at: str) -> None:
        _check_name(at, self.name)
        if (self.path is None) == (self.function is None):
            _fail(at, f"reward {self.name!r} needs exactly one of path (a reward adapter) or function (a "
                  "programmatic reward)" + (", not both" if self.path else ""))


ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
GROUP_ALGORITHMS = ("grpo", "rloo")  # a group of num_generations completions per prompt is their baseline


@spec
class PolicySpec:
    name: str = opt(help="Adapter name of this policy (letters, digits, _ and -).")
    reward: tuple[str, ...] = opt(
        help="Name(s) of the rewards (rewards[].name) that score this policy: one name or a list, summed with "
        "reward_weights. At most one of them may be a reward adapter; any number may be functions.",
        one_or_many=True)
    reward_weight: float = opt(1.0, "Multiplier on the (total) reward; negative pushes the policy towards lower "
                               "reward.")
    reward_weights: tuple[float, ...] = opt((), "One weight per name in reward; empty = 1 for each.")
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = opt(
        "ppo", "ppo = PPO with a value head and GAE; grpo = group-relative advantages (r - group mean, / group "
        "std); rloo = leave-one-out baseline over the group; reinforce_pp = REINFORCE++ (token-level KL in the "
        "reward, advantages normalised over the batch). grpo, rloo and reinforce_pp have no value head.")
    num_generations: int = opt(1, "Completions per prompt (G). grpo and rloo need at least 2: the group is the "
                               "baseline.", ge=1)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = opt(
        "dapo", "grpo, rloo, reinforce_pp: how per-token losses are averaged: grpo = token mean per sequence, then "
        "mean over sequences; dapo = mean over every token of the minibatch; dr_grpo = token sum / (sequences x "
        "generation.max_new_tokens).")
    scale_rewards: bool = opt(True, "grpo: divide the group-centred rewards by the group's std; false = Dr. GRPO.")
    epsilon_low: float = opt(0.2, "grpo, rloo, reinforce_pp: the ratio is clipped below at 1 - epsilon_low.", gt=0,
                             lt=1)
    epsilon_high: Optional[float] = opt(
        None, "grpo, rloo, reinforce_pp: the ratio is clipped above at 1 + epsilon_high (DAPO's clip-higher); "
        "null = epsilon_low.", gt=0)
    beta: float = opt(0.0, "grpo, rloo: weight of the KL to the reference (k3 estimator) as a loss term; 0 = no "
                      "reference pass at all.", ge=0)
    dynamic_sampling: bool = opt(False, "grpo, rloo: leave groups whose rewards are all equal (advantage 0) out of "
                                 "the update; reward/frac_zero_std is logged either way.")
    lr: float = opt(1.41e-5, "Learning rate of this policy's LoRA weights and value head.", gt=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = opt(
        "constant", "Learning-rate schedule over the run's optimizer steps (ppo.steps x ppo.ppo_epochs x "
        "ppo.batch_size / ppo.mini_batch_size), as transformers' get_scheduler: constant; linear = decays to 0 at "
        "the last step; cosine = half a cosine down to 0. Each after the warm-up.")
    warmup_ratio: float = opt(0.0, "Warm-up as a fraction of the run's optimizer steps (rounded up): the learning "
                              "rate rises linearly from 0 to lr over them.", ge=0, le=1)
    warmup_steps: int = opt(0, "Warm-up in optimizer steps (instead of warmup_ratio).", ge=0)
    weight_decay: float = opt(0.0, "AdamW's decoupled weight decay, on every trainable tensor but biases.", ge=0)
    lora: LoraSpec = opt(LoraSpec, "LoRA shape of this policy's adapter.")
    init_kl_coef: float = opt(0.2, "ppo, reinforce_pp: initial coefficient of the KL penalty in the reward.", ge=0)
    adaptive_kl: bool = opt(True, "Adapt the KL coefficient towards target_kl; false = keep init_kl_coef.")
    target_kl: float = opt(6.0, "KL target of the adaptive KL controller.", gt=0)
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller, in samples.", ge=1)
    init_from: Optional[str] = opt(None, "Saved policy folder (adapter + value head) to start from; null = fresh.")

    def __post_init__(self) -> None:
        if isinstance(self.reward, str):  # one name, as in earlier configs
            object.__setattr__(self, "reward", (self.reward,))

    @property
    def critic(self) -> bool:
        """Whether this policy's algorithm has a value head."""
        return self.algorithm == "ppo"

    @property
    def uses_reference(self) -> bool:
        """Whether its update reads reference logprobs (the KL penalty or loss term)."""
        return self.algorithm in ("ppo", "reinforce_pp") or self.beta > 0

    def _check(self, at: str) -> None:
        _check_name(at, self.name)
        if len(set(self.reward)) != len(self.reward):
            _fail(_join(at, "reward"), f"{list(self.reward)} names a reward twice")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            _fail(_join(at, "reward_weights"), f"{len(self.reward_weights)} weights for {len(self.reward)} rewards "
                  f"{list(self.reward)}: give one per reward, or none")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            _fail(_join(at, "warmup_steps"), f"{self.warmup_steps} and {_join(at, 'warmup_ratio')} "
                  f"{self.warmup_ratio} are both set: give the warm-up one way, the other 0")
        if self.algorithm in GROUP_ALGORITHMS and self.num_generations < 2:
            _fail(_join(at, "num_generations"), f"{self.algorithm} needs at least 2 completions per prompt (its "
                  f"baseline is the group), got {self.num_generations}; e.g. num_generations: 4")


@spec
class GenerationSpec:
    max_new_tokens: int = opt(32, "Maximum response length in tokens.", ge=1)
    min_new_tokens: Optional[int] = opt(
        None, "With stop_at_eos: EOS cannot be sampled before this many tokens; null = max_new_tokens.", ge=0)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_k: int = opt(0, "Sample only from the k most likely tokens; 0 = off.", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling probability mass; 1.0 = off.", gt=0, le=1)
    stop_at_eos: bool = opt(False, "End a response at the first EOS sampled after min_new_tokens; false = EOS is "
                            "never sampled and every response has max_new_tokens tokens.")
    batch_rows: Optional[int] = opt(
        None, "Rows a model host decodes at once: a rollout call with more rows is sampled in chunks of this "
        "many, chunk k under seed + k (other samples than one batch gives, as reproducible). null = every row "
        "of the call at once (fastest). Caps the decode's memory (KV cache, logits) when several policies "
        "and num_generations multiply the rows.", ge=1)
    backend: Literal["hf", "vllm"] = opt(
        "hf", "Rollout engine of each model host: hf = HF generate on the training model; vllm = a vLLM engine "
        "over the same base with one LoRA slot per policy, synced after every update (needs the vllm extra).")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm: fraction of the GPU the engine may use.", gt=0, le=1)
    vllm_kv_cache_gib: float = opt(0.25, "vllm on CPU: KV-cache size in GiB (reserved up front).", gt=0)
    vllm_sleep: bool = opt(True, "vllm on GPU: offload the engine's weights and free its KV cache between "
                           "rollouts, so one base holds the GPU while evaluation and training run.")
    vllm_max_model_len: Optional[int] = opt(
        None, "vllm: prompt + response tokens per sequence; null = the base's max_position_embeddings.", ge=1)

    def _check(self, at: str) -> None:
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            _fail(_join(at, "min_new_tokens"), f"{self.min_new_tokens} is larger than "
                  f"{_join(at, 'max_new_tokens')} {self.max_new_tokens}; lower it or set it to null")


@spec
class PPOSpec:
    steps: int = opt(10, "Number of PPO steps (a rollout batch per policy, then its updates).", ge=1)
    batch_size: int = opt(16, "Prompts per policy per step.", ge=1)
    mini_batch_size: int = opt(8, "Samples per gradient step; must divide batch_size.", ge=1)
    ppo_epochs: int = opt(4, "Optimisation passes over each rollout batch.", ge=1)
    micro_batch_size: Optional[int] = opt(
        16, "Rows per forward/backward pass on a host: a minibatch shard is run in chunks of this many "
        "rows and their gradients summed (the same update; activation memory in proportion to it); the "
        "scoring pass runs in chunks of as many rows. null = the whole shard in one pass (GRPO, 64 "
        "completions per minibatch: 16 rows per pass took the model memory from 1.70x TRL's GRPOTrainer "
        "to 0.60x on the medium benchmark model at the same speed).", ge=1)
    gamma: float = opt(1.0, "Discount factor.", gt=0, le=1)
    lam: float = opt(0.95, "GAE lambda.", gt=0, le=1)
    cliprange: float = opt(0.2, "Clip range of the policy probability ratio.", gt=0)
    cliprange_value: float = opt(0.2, "Clip range of the value prediction around the rollout values.", gt=0)
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.", ge=0)
    whiten_advantages: bool = opt(True, "Normalise advantages to zero mean and unit variance per batch.")
    max_grad_norm: Optional[float] = opt(1.0, "Clip gradients to this global norm; null = no clipping.", gt=0)
    max_nonfinite_steps: int = opt(
        3, "Stop (after a checkpoint of the last good state) when a policy's update is skipped for NaN/inf "
        "this many steps in a row.", ge=1)
    kl_penalty: Literal["kl", "abs", "mse"] = opt("kl", "KL estimate: logp - logp_ref, its abs, or its square / 2.")
    rollout_logprobs: Optional[bool] = opt(
        None, "Take the PPO old logprobs and values from the decode steps (marl-ray's decode loop computes "
        "them anyway) instead of a policy pass when scoring: a third less scoring work. They agree with "
        "the scoring pass to rounding: about 3e-7 per token in fp32, 3e-3 in bf16, so in bf16 the PPO "
        "ratio starts within 2% of 1 instead of at exactly 1, and the KL at the first step is that "
        "noise instead of 0 (the demo in bf16 learned as much either way over two seeds). null = on for a "
        "full-precision base (fp32 or bf16), off for a 4/8-bit one. Rollouts from vLLM or HF generate "
        "are always scored by a pass.")

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of each policy in the run (what its learning-rate schedule counts)."""
        return self.steps * self.ppo_epochs * (self.batch_size // self.mini_batch_size)

    def _check(self, at: str) -> None:
        if self.batch_size % self.mini_batch_size:
            _fail(_join(at, "mini_batch_size"), f"{self.mini_batch_size} does not divide "
                  f"{_join(at, 'batch_size')} {self.batch_size}; pick a divisor")


@spec
class ClusterSpec:
    runtime: Literal["ray", "inprocess"] = opt(
        "ray", "ray = model hosts and rollout workers are Ray actors; inprocess = the same objects in this "
        "process (one host; for debugging and for measuring Ray's overhead).")
    address: Optional[str] = opt(None, "Ray address: null = a local Ray on 127.0.0.1; auto = the running cluster.")
    num_hosts: Optional[int] = opt(None, "Number of model-host actors; null = one per alive node.", ge=1)
    hosts_per_node: int = opt(1, "Model-host actors placed on each node.", ge=1)
    host_num_cpus: float = opt(1.0, "CPUs Ray reserves for each model host.", ge=0)
    host_num_gpus: float = opt(0.0, "GPUs Ray reserves for each model host (a fraction shares a GPU).", ge=0)
    max_restarts: int = opt(3, "Ray restarts of a model host or rollout worker that dies; the learner then "
                            "restores it and redoes the step.", ge=0)
    rollout_workers: int = opt(2, "Number of rollout workers generating responses in parallel.", ge=1)
    placement: Literal["spread", "node_affinity"] = opt("spread", "Host placement: Ray SPREAD or pinned to nodes.")
    collective_backend: Literal["auto", "gloo", "nccl"] = opt(
        "auto", "Backend of the hosts' group: auto = nccl when the hosts hold the model on a GPU, else gloo.")
    collective_timeout_s: float = opt(
        300.0, "Seconds a collective (or the group's start) may wait for the other hosts before it fails: a lost "
        "or hung host never hangs the others; the learner then restores and redoes the step.", gt=0)
    grad_comm_dtype: Literal["fp32", "bf16"] = opt(
        "fp32", "The dtype gradients travel in between hosts (collective): bf16 halves the bytes; each host's "
        "gradients are rounded to bf16 and summed in bf16 (replicas stay identical).")
    grad_bucket_mb: float = opt(25.0, "Gradients are flattened into buckets of about this many MiB, one allreduce "
                                "each, all in flight together.", gt=0)


@spec
class DataSpec:
    prompts: str = opt("embedded", "embedded = the built-in domain; a JSONL, JSON, CSV or Parquet file; a folder written "
                       "by datasets' save_to_disk; or a datasets hub name. Each row's other fields reach reward "
                       "functions as keyword columns.")
    split: str = opt("train", "The split of a save_to_disk folder with several splits, or of a hub data set.")
    prompt_field: str = opt("prompt", "The field that holds the prompt: a text, or a conversation (a list of "
                            "{role, content}, rendered with the tokenizer's chat template); rows with 'input_ids' "
                            "and no such field are used as token ids.")
    max_prompt_tokens: int = opt(16, "Prompts are truncated to this many tokens.", ge=1)
    seed: int = opt(0, "Seed of the prompt order.", ge=0)
    eval_prompts: Optional[str] = opt(None, "Held-out prompts, in any form data.prompts takes (embedded = the "
                                      "built-in domain's eval split): each policy is scored on them by its rewards "
                                      "before the first step, every run.eval_every steps and after the last "
                                      "(metrics eval/...).")
    eval_fraction: float = opt(0.0, "Instead of eval_prompts: hold out this fraction of data.prompts' rows (chosen "
                               "by a hash of each prompt, never trained on) as the held-out prompts.", ge=0, lt=1)
    eval_size: int = opt(64, "Held-out prompts used per evaluation (the first ones).", ge=1)

    def _check(self, at: str) -> None:
        if self.eval_prompts is not None and self.eval_fraction > 0:
            _fail(_join(at, "eval_fraction"), "give eval_prompts or eval_fraction, not both")
        if self.eval_fraction > 0 and self.prompts == "embedded":
            _fail(_join(at, "eval_fraction"), "the embedded domain has its own eval split: set "
                  "data.eval_prompts: embedded instead")


@spec
class RunSpec:
    out_dir: str = opt("runs/ppo", "Output folder for checkpoints, logs and the resolved config.")
    seed: int = opt(0, "Global random seed.", ge=0)
    log_every: int = opt(1, "Log metrics every N steps.", ge=1)
    save_every: int = opt(0, "Save a checkpoint every N steps; 0 = only at the end.", ge=0)
    resume: Optional[str] = opt(None, "Resume from a checkpoint: 'latest' (of out_dir, or of storage when set) or a "
                                "checkpoint folder.")
    storage: Optional[str] = opt(
        None, "Where checkpoints and the trained policies go, written by the model hosts themselves: a path every "
        "node reaches (local, NFS) or an object store URI through pyarrow.fs (s3://bucket/prefix, gs://..., "
        "file://...; pyarrow's options after '?'), as Ray Train's storage_path. null = out_dir, with the policies' "
        "files sent through the driver (for a cluster without shared storage).")
    keep_last: int = opt(2, "Number of most recent checkpoints to keep.", ge=1)
    report_to: tuple[str, ...] = opt(
        ("tensorboard",), "Where metrics go besides out_dir/metrics.jsonl (always written), as TRL's report_to: "
        "tensorboard (event files in out_dir/tensorboard), wandb (Weights & Biases; pip install wandb), mlflow "
        "(pip install mlflow-skinny), or none. One name or a list.", one_or_many=True)
    tensorboard: bool = opt(True, "false = leave tensorboard out of report_to (the older switch; prefer report_to).")
    progress: Union[bool, Literal["auto"]] = opt(
        "auto", "Show a progress bar: auto = only when the console is a terminal (stderr is a tty); otherwise, as "
        "under `ray job submit`, one line per policy per step ('step N policy P: ...', flushed as it is written). "
        "true = always a bar, false = always the lines. --quiet shows neither.")
    log_samples: int = opt(2, "Per policy per step, write this many samples (prompt, completion, reward and the "
                           "row's other fields) to out_dir/samples.jsonl; 0 = none.", ge=0)
    eval_every: int = opt(0, "With held-out prompts (data.eval_prompts or data.eval_fraction): evaluate every N "
                          "steps as well as before the first and after the last; 0 = before and after only.", ge=0)


    @property
    def loggers(self) -> tuple[str, ...]:
        """The metric writers of report_to, less tensorboard when tensorboard is false."""
        return tuple(r for r in self.report_to if r != "none" and (self.tensorboard or r != "tensorboard"))

    def _check(self, at: str) -> None:
        import importlib.util

        field = _join(at, "report_to")
        for r in self.report_to:
            if r not in REPORT_TO:
                _fail(field, f"{r!r} is not one of {', '.join(REPORT_TO)}")
        if "none" in self.report_to and len(self.report_to) > 1:
            _fail(field, f"{list(self.report_to)}: none means no logger; give it alone")
        for r in self.report_to:  # an optional logger that is not installed fails here, before any actor
            if r in REPORT_PACKAGES and importlib.util.find_spec(r) is None:
                _fail(field, f"{r} is not installed in this environment: pip install {REPORT_PACKAGES[r]} "
                      f"(or leave {r} out)")


@spec
class PlayerSpec:
    role: str = opt(help="A role of the environment (its roles; one role, assistant, by default).")
    policy: str = opt(help="Who plays it: a policy of this run (policies[].name), or ref (the base with adapters "
                      "off, never trained).")


@spec
class EpisodesSpec:
    environment: str = opt(help="The environment class: 'pkg.module:Class' or 'path/to/file.py:Class', one "
                           "instance per episode, reset(**row) from a data row; its public methods are tools "
                           "(docs/episodes.md).")
    players: tuple[PlayerSpec, ...] = opt((), "Who plays each role: [{role: solver, policy: s}, {role: proposer, "
                                          "policy: ref}]. Empty = the one role, assistant, played by the one policy.")
    max_turns: int = opt(8, "Turns of an episode (all roles, tool-calling turns included); an episode that "
                         "reaches it ends truncated, rewarded by the environment as it stands.", ge=1)
    max_tokens: int = opt(256, "Tokens of a role's transcript after its first prompt (its turns, tool results and "
                          "the others' turns); a turn that could pass it is not started: the episode ends "
                          "truncated, rewarded by the environment as it stands.", ge=1)


REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
REPORT_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # module -> the pip package that gives it


@spec
class PPORunConfig:
    model: ModelSpec = opt(help="The shared base model.")
    rewards: tuple[RewardSpec, ...] = opt((), "Rewards: reward adapters on the shared base, or reward functions.")
    policies: tuple[PolicySpec, ...] = opt((), "Policy adapters, each trained with its own algorithm.")
    generation: GenerationSpec = opt(GenerationSpec, "How responses are sampled.")
    ppo: PPOSpec = opt(PPOSpec, "PPO optimisation.")
    cluster: ClusterSpec = opt(ClusterSpec, "Ray cluster and actor placement.")
    data: DataSpec = opt(DataSpec, "Prompt data.")
    run: RunSpec = opt(RunSpec, "Outputs, logging and checkpoints.")
    episodes: Optional[EpisodesSpec] = opt(
        None, "Multi-turn episodes with tools and several roles (docs/episodes.md); null = single-turn: each "
        "policy answers each prompt once.")

    def __post_init__(self) -> None:
        validate(self)

    def _check(self, at: str) -> None:
        if not self.policies:
            _fail(_join(at, "policies"), "at least one policy is required, e.g. [{name: p0, reward: rm}]")
        used: dict[str, str] = {}
        for kind, specs in (("rewards", self.rewards), ("policies", self.policies)):
            for i, s in enumerate(specs):
                path = _join(at, f"{kind}[{i}]")
                if s.name in used:
                    _fail(f"{path}.name", f"{s.name!r} is already the name of {used[s.name]}; names must be unique")
                used[s.name] = path
        rewards = {r.name: r for r in self.rewards}
        if self.episodes is not None:
            self._check_episodes(at)
        for i, p in enumerate(self.policies):
            if not p.reward and self.episodes is None:
                _fail(_join(at, f"policies[{i}].reward"), "name at least one reward (rewards[].name)")
            for name in p.reward:
                if name not in rewards:
                    _fail(_join(at, f"policies[{i}].reward"),
                          f"{name!r} is not one of the rewards {list(rewards)}; add it under rewards or fix the name")
            adapters = [n for n in p.reward if rewards[n].path is not None]
            if len(adapters) > 1:
                _fail(_join(at, f"policies[{i}].reward"),
                      f"names {len(adapters)} reward adapters {adapters}: a policy takes at most one reward adapter "
                      "(and any number of reward functions)")

    def _check_episodes(self, at: str) -> None:
        e, names = self.episodes, [p.name for p in self.policies]
        where = _join(at, "episodes")
        roles = [p.role for p in e.players]
        if len(set(roles)) != len(roles):
            _fail(_join(where, "players"), f"{roles} names a role twice; one player per role")
        for i, p in enumerate(e.players):
            if p.policy != "ref" and p.policy not in names:
                later = ("/" in p.policy or "\\" in p.policy or p.policy.endswith((".safetensors", ".bin")))
                _fail(_join(where, f"players[{i}].policy"),
                      f"{p.policy!r}: frozen adapters (a saved policy folder) as players are not yet supported; "
                      f"name a policy of this run {names} or ref" if later else
                      f"{p.policy!r} is not a policy of this run {names} (or ref, the base with adapters off)")
        if not e.players and len(names) > 1:
            _fail(_join(where, "players"), f"{len(names)} policies {names}: say who plays each role, e.g. "
                  f"[{{role: assistant, policy: {names[0]}}}]")
        if e.max_tokens < self.generation.max_new_tokens:
            _fail(_join(where, "max_tokens"), f"{e.max_tokens} is less than generation.max_new_tokens "
                  f"{self.generation.max_new_tokens}: no turn would fit")
        for i, p in enumerate(self.policies):
            if p.reward:
                _fail(_join(at, f"policies[{i}].reward"), f"{list(p.reward)}: with episodes a policy's reward "
                      "comes from the environment (rewards() / get_reward()); reward functions or adapters beside it "
                      "are not yet supported: leave reward empty")
        if self.data.eval_prompts is not None or self.data.eval_fraction > 0:
            _fail(_join(at, "data.eval_prompts"), "held-out evaluation of episodes is not yet supported: leave "
                  "data.eval_prompts and data.eval_fraction unset")
        if self.ppo.rollout_logprobs:
            _fail(_join(at, "ppo.rollout_logprobs"), "episodes take their old logprobs from a scoring pass: set "
                  "it to false or null")

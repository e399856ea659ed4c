"""ModelHost: the one process per node that holds the (quantized) base and every adapter.

A plain class; `cluster.py` turns it into a Ray actor. Its interface follows the primitives
Tinker made familiar, each taking the adapter name: `sample`, `forward` (evaluate),
`forward_backward` (LoRA gradients of a minibatch), `optim_step`, `save_state`/`load_state`.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import random
from pathlib import Path

import torch

from marl_ray import ppo
from marl_ray.adapter_io import VALUE_HEAD_FILE


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (ids (B, P), mask (B, P))."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids, mask


class ModelHost:
    """Holds the shared base, the reward adapters and one (LoRA, value head, optimizer) per policy."""

    def __init__(self, model: dict, rewards: list[dict], policies: list[dict], seed: int = 0,
                 torch_threads: int | None = None, host_index: int = 0, generation: dict | None = None):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        import transformers  # noqa: F401  (imported before the baseline reading)
        from peft import LoraConfig

        from marl_ray.multi_adapter import MultiAdapterModel

        self.baseline_rss_mib = _rss_mib()  # after imports, before the model: what the run itself costs

        self.host_index = host_index
        self.model = MultiAdapterModel.from_pretrained(
            model["base"], quantization=model.get("quantization", "none"), dtype=model.get("dtype", "fp32"),
            reference_adapter=model.get("reference_adapter"), gradient_checkpointing=model.get("gradient_checkpointing"))
        for r in rewards:
            self.model.add_reward(r["name"], r["path"])
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for i, p in enumerate(policies):
            if p.get("init_from"):
                self.model.load_policy(p["name"], p["init_from"])
            else:
                lora = p.get("lora", {})
                cfg = LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
                                 lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=list(lora.get("target_modules", ("q_proj", "v_proj"))))
                # Same seed on every host: replicas start identical.
                self.model.add_policy(p["name"], cfg, seed=seed * 1000 + i)
            self.optimizers[p["name"]] = torch.optim.AdamW(
                self.model.policy_parameters(p["name"]), lr=p.get("lr", 1.41e-5), eps=1e-8, weight_decay=0.0)
        self.gen_cfg = self.model.base.generation_config
        self.engine = None  # vLLM rollouts (generation.backend: vllm); None = HF generate on the training model
        self._synced: dict[str, int] = {}  # policy -> parameter version the engine holds
        generation = generation or {}
        if generation.get("backend", "hf") == "vllm":
            self._start_engine(model, policies, generation, seed)

    def _start_engine(self, model: dict, policies: list[dict], generation: dict, seed: int):
        from marl_ray import vllm_backend

        if not vllm_backend.available():
            raise RuntimeError(
                "generation.backend is 'vllm' but vllm does not import in this environment: install the "
                "extra (GPU: pip install 'marl-ray[vllm]'; CPU: bash scripts/setup_vllm_cpu.sh) or set "
                "generation.backend: hf")
        cfg = self.model.base.config
        self.engine = vllm_backend.VLLMEngine(
            model["base"], [p["name"] for p in policies],
            max_lora_rank=max(int(p.get("lora", {}).get("r", 16)) for p in policies),
            dtype=model.get("dtype", "fp32"), quantization=model.get("quantization", "none"),
            max_model_len=generation.get("vllm_max_model_len") or cfg.max_position_embeddings,
            gpu_memory_utilization=generation.get("vllm_gpu_memory_utilization", 0.3),
            kv_cache_gib=generation.get("vllm_kv_cache_gib", 0.25), sleep=generation.get("vllm_sleep", True),
            seed=seed)
        self.engine.sleep()

    def _param_version(self, policy: str) -> int:
        """Sum of the autograd version counters of `policy`'s tensors: any in-place change (optimizer
        step, import_policy, set_state) bumps it, so the engine's copy is stale exactly when it moved."""
        return sum(t._version for t in self.model.policy_state(policy).values())

    def _sync_engine(self, policies: set[str]):
        for p in sorted(policies):
            v = self._param_version(p)
            if self._synced.get(p) != v:
                self.engine.sync(p, lambda folder, p=p: self.model.save_policy(p, folder))
                self._synced[p] = v

    # ------------------------------------------------------------ info
    def pid(self) -> int:
        """This process's id: cheap; a host Ray restarted has another (the learner checks it each step)."""
        return os.getpid()

    def info(self) -> dict:
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except ImportError:
            node = "local"
        return {
            "host_index": self.host_index, "pid": os.getpid(), "node_id": node,
            "fingerprint": self.model.fingerprint, "quantization": self.model.quantization,
            "policies": self.model.policies, "rewards": self.model.rewards,
            "base_params": sum(p.numel() for p in self.model.base.parameters()),
            "rss_mib": _rss_mib(), "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": self.baseline_rss_mib,
            "base_copies": self.base_copies(),
            "torch_threads": torch.get_num_threads(), "device": str(self.model.device),
            "generation_backend": "vllm" if self.engine is not None else "hf",
            "vllm": self.engine.info() if self.engine is not None else None,
        }

    def base_copies(self) -> int:
        """How many tensors in this process hold the base's embedding matrix (1 = one base)."""
        emb = self.model.base.get_input_embeddings().weight
        ptrs = {t.untyped_storage().data_ptr() for t in _live_tensors()
                if t.shape == emb.shape and t.dtype == emb.dtype and t.device == emb.device and torch.equal(t, emb)}
        return len(ptrs)

    # ------------------------------------------------------------ sample
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], policies: list[str], gen: dict, seed: int) -> dict:
        """Responses of `prompts[i]` under `policies[i]`: {"responses" (N, R), "response_mask" (N, R)}.

        Responses have exactly R = max_new_tokens positions; positions after the first EOS
        (possible only with stop_at_eos and min_new_tokens < R) are padding (mask 0). Both
        backends (HF generate on the training model, or the vLLM engine) read `gen` the same way.
        With gen["scored"], also the policy's "logprobs_BR", "values_BR" and "entropy_BR" (N, R)
        of the sampled tokens, where the decode loop gives them (`generate_scored`).
        """
        pad = self.gen_cfg.pad_token_id if self.gen_cfg.pad_token_id is not None else 0
        eos = self.gen_cfg.eos_token_id
        R = gen["max_new_tokens"]
        stop_at_eos = bool(gen.get("stop_at_eos", True)) and eos is not None
        # Without stop_at_eos, EOS is masked at every position (min = R): exactly R tokens.
        min_new = R if gen.get("min_new_tokens") is None or not stop_at_eos else gen["min_new_tokens"]
        settings = dict(max_new_tokens=R, min_new_tokens=min_new, temperature=gen.get("temperature", 1.0),
                        top_k=gen.get("top_k", 0), top_p=gen.get("top_p", 1.0), do_sample=gen.get("do_sample", True))
        extra = {}
        if self.engine is not None:
            self._sync_engine(set(policies))
            rows = self.engine.generate(prompts, list(policies), eos_token_id=eos, seed=seed, **settings)
            self.engine.sleep()  # evaluation and training come next: give the GPU back
            resp = torch.full((len(rows), R), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                resp[i, :len(r)] = torch.tensor(r[:R], dtype=torch.long)
        else:
            ids, mask = _pad_left(prompts, pad)
            torch.manual_seed(seed)
            run = self.model.generate_scored if gen.get("scored") else (
                lambda *a, **k: (self.model.generate(*a, **k), None))
            out, scored = run(ids.to(self.model.device), mask.to(self.model.device), policies, pad_token_id=pad,
                              **settings)
            resp = out[:, ids.shape[1]:].cpu()
            n = resp.shape[1]
            if n < R:  # every row stopped early: pad to R
                resp = torch.cat([resp, torch.full((resp.shape[0], R - n), pad, dtype=resp.dtype)], 1)
            if scored is not None:  # the PPO old logprobs/values (see Learner.rollout)
                extra = {k: torch.nn.functional.pad(v.float().cpu(), (0, R - n)) for k, v in vars(scored).items()}
        rmask = torch.ones_like(resp)
        if stop_at_eos:  # EOS ends a response (it can only occur when min_new_tokens < R)
            eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
            is_eos = torch.isin(resp, eos_ids).long()
            after = (is_eos.cumsum(1) - is_eos) > 0  # positions after the first EOS
            rmask[after] = 0
            resp[after] = pad
        return {"responses": resp, "response_mask": rmask, **extra}

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        """Policy logprobs + values, reference logprobs, reward scores of a batch, one pass.

        These logprobs (not a generation engine's) are the PPO `old_logprobs`: the same code
        computes the new ones during training, so the ratio is exactly 1 before any update. With
        batch["rollout"] (ppo.rollout_logprobs) the policy's come from the decode steps instead.
        """
        from marl_ray.multi_adapter import RolloutScores

        dev = self.model.device
        rollout = RolloutScores(**batch["rollout"]) if batch.get("rollout") else None
        ev = self.model.evaluate(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["policies"],
                                 batch["rewards"], batch["response_start"], rollout=rollout)
        return {k: v.cpu() for k, v in vars(ev).items()}

    # ------------------------------------------------------------ train
    def forward_backward(self, policy: str, mb: dict, total_tokens: float, loss_cfg: dict) -> tuple[dict, dict]:
        """LoRA + value-head gradients of this shard's share of a minibatch's PPO loss.

        The loss is scaled by shard_tokens / total_tokens, so summing the hosts' gradients
        gives exactly the gradient of the whole minibatch's token-mean loss. With
        loss_cfg["micro_batch_size"] the shard runs in chunks of that many rows, each scaled the
        same way, and their gradients and stats are summed here.
        """
        grads, stats = self._gradients(policy, mb, total_tokens, loss_cfg)
        return {k: g.cpu() for k, g in grads.items()}, stats

    def _gradients(self, policy: str, mb: dict, total_tokens: float, loss_cfg: dict) -> tuple[dict, dict]:
        """forward_backward's gradients (on the model's device) and stats."""
        n = mb["input_ids"].shape[0]
        step = loss_cfg.get("micro_batch_size") or n
        trainable = self.model.policy_state(policy)
        grads, stats = None, None
        for lo in range(0, n, step):
            chunk = {k: (v[lo:lo + step] if torch.is_tensor(v) else v) for k, v in mb.items()}
            g, s = self._forward_backward(policy, trainable, chunk, total_tokens, loss_cfg)
            grads = g if grads is None else {k: grads[k].add_(g[k]) for k in grads}
            stats = s if stats is None else {k: stats[k] + s[k] for k in stats}
        return {k: g.detach() for k, g in grads.items()}, stats

    def _forward_backward(self, policy: str, trainable: dict, mb: dict, total_tokens: float, loss_cfg: dict):
        dev = self.model.device
        mask = mb["mask"].to(dev).float()
        logprobs, values, logits = self.model.policy_forward(
            policy, mb["input_ids"].to(dev), mb["attention_mask"].to(dev), mb["response_start"])
        pg, pg_stats = ppo.policy_loss(logprobs, mb["old_logprobs"].to(dev), mb["advantages"].to(dev), mask,
                                       cliprange=loss_cfg["cliprange"])
        vf, vf_stats = ppo.value_loss(values, mb["old_values"].to(dev), mb["returns"].to(dev), mask,
                                      cliprange_value=loss_cfg["cliprange_value"])
        share = float(mask.sum()) / total_tokens
        loss = (pg + loss_cfg["vf_coef"] * vf) * share
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(trainable.items(), grads)}
        with torch.no_grad():
            entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), mask)
        pg, vf = pg.detach(), vf.detach()
        stats = {"loss/policy": float(pg) * share, "loss/value": float(vf) * share,
                 "policy/approxkl": float(pg_stats["approxkl"]) * share,
                 "policy/clipfrac": float(pg_stats["clipfrac"]) * share,
                 "val/clipfrac": float(vf_stats["vf_clipfrac"]) * share,
                 "policy/entropy": float(entropy) * share, "val/ratio": float(pg_stats["ratio_mean"]) * share}
        return grads, stats

    def train_minibatch(self, policy: str, mb: dict, total_tokens: float, loss_cfg: dict,
                        max_grad_norm: float | None) -> tuple[dict, bool]:
        """forward_backward + optim_step in one call, for a learner with this one host: the gradients
        never leave the host. Returns (stats, applied); nothing is applied (weights and optimizer
        state untouched) when a gradient or a stat is not finite."""
        grads, stats = self._gradients(policy, mb, total_tokens, loss_cfg)
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values()) and all(
            math.isfinite(v) for v in stats.values())
        if finite:
            self.optim_step(policy, grads, max_grad_norm, checksum=False)
        return stats, finite

    def optim_step(self, policy: str, grads: dict, max_grad_norm: float | None, checksum: bool = True) -> str:
        """Apply one optimizer step from (averaged) gradients; returns the policy's checksum ("" with
        checksum=False: a learner with one host has no replicas to compare)."""
        params = self.model.policy_state(policy)
        for k, p in params.items():
            p.grad = grads[k].to(p.device, p.dtype)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        opt = self.optimizers[policy]
        for group in opt.param_groups:
            # torch picks the per-tensor loop on CPU by default; the multi-tensor (foreach) kernels
            # compute the same update (bit for bit) with a fraction of the calls.
            if group.get("foreach") is None and not group.get("fused"):
                group["foreach"] = True
        opt.step()
        opt.zero_grad(set_to_none=True)
        return self.checksum(policy) if checksum else ""

    def checksum(self, policy: str) -> str:
        """sha256 of every trainable tensor of `policy` (LoRA + value head), in name order."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.policy_state(policy).items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def role_checksum(self, name: str) -> str:
        """sha256 of adapter `name`'s LoRA tensors and its head (score head of a reward, value head of a
        policy), bit-exact, in name order: shows an adapter left untouched by training."""
        head = self.model.score_heads[name] if name in self.model.score_heads else self.model.value_heads[name]
        tensors = dict(self.model._lora_params(name))
        tensors.update({f"head.{k}": v for k, v in head.named_parameters()})
        return _digest(tensors)

    def base_checksum(self) -> str:
        """sha256 of every base parameter and buffer (LoRA weights excluded), bit-exact, in name order."""
        tensors = {k: v for k, v in self.model.base.named_parameters() if "lora_" not in k}
        tensors.update({f"buffer.{k}": v for k, v in self.model.base.named_buffers() if "lora_" not in k})
        return _digest(tensors)

    def set_lr(self, policy: str, lr: float):
        for g in self.optimizers[policy].param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------ state
    def save_state(self, policy: str, folder: str, with_optimizer: bool = True) -> str:
        """Policy folder (plain peft + value head) and, beside it, optimizer.pt."""
        folder = Path(folder)
        self.model.save_policy(policy, folder)
        if with_optimizer:
            tmp = folder / "optimizer.pt.tmp"
            torch.save(self.optimizers[policy].state_dict(), tmp)
            os.replace(tmp, folder / "optimizer.pt")
        return str(folder)

    def export_policy(self, policy: str) -> dict[str, bytes]:
        """The files of `policy` (peft folder + value head + optimizer.pt) as bytes, for a
        checkpoint written by the learner, wherever it runs."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / policy
            self.save_state(policy, str(folder))
            return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    def import_policy(self, policy: str, files: dict[str, bytes]) -> str:
        """Load weights, value head and optimizer state of `policy` from `export_policy` files."""
        import io

        from safetensors.torch import load as load_safetensors

        from marl_ray.adapter_io import ADAPTER_WEIGHTS

        lora = load_safetensors(files[ADAPTER_WEIGHTS])
        head = load_safetensors(files[VALUE_HEAD_FILE])
        params = self.model.policy_state(policy)
        with torch.no_grad():
            for k, p in params.items():
                if k.startswith("value_head."):
                    src, k_src = head, k[len("value_head."):]
                else:  # peft files name LoRA weights without the adapter name
                    src, k_src = lora, k.replace(f".{policy}.weight", ".weight")
                if k_src not in src:
                    raise ValueError(f"checkpoint of policy {policy!r} lacks {k_src}")
                p.copy_(src[k_src])
        if "optimizer.pt" in files:
            self.optimizers[policy].load_state_dict(
                torch.load(io.BytesIO(files["optimizer.pt"]), map_location="cpu", weights_only=False))
        return self.checksum(policy)

    def get_state(self, policy: str) -> dict:
        """Weights + optimizer state of `policy`, to restore another replica from this one."""
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.model.policy_state(policy).items()},
                "optimizer": self.optimizers[policy].state_dict()}

    def set_state(self, policy: str, state: dict) -> str:
        params = self.model.policy_state(policy)
        with torch.no_grad():
            for k, v in state["weights"].items():
                params[k].copy_(v)
        self.optimizers[policy].load_state_dict(state["optimizer"])
        return self.checksum(policy)

    def rng_state(self) -> dict:
        return {"torch": torch.random.get_rng_state(), "python": random.getstate()}

    def set_rng_state(self, state: dict):
        torch.random.set_rng_state(state["torch"])
        random.setstate(state["python"])


def _digest(tensors: dict) -> str:
    """sha256 of the raw bytes of named tensors (any dtype, quantized storage included), in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]


def _live_tensors():
    import warnings

    frozen = gc.get_freeze_count()  # vLLM gc.freeze()s its start-up objects: list those too
    if frozen:
        gc.unfreeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on some torch module objects warns
            objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    finally:
        if frozen:
            gc.freeze()
    return objs

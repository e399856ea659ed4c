"""vLLM rollouts for a model host: one engine over the same base, one LoRA slot per policy.

The host keeps training on its own (possibly 4/8-bit) peft model; the engine only samples.
After each optimizer step the host marks the policy stale; before the next rollout `sync`
writes the policy's current LoRA (plain peft files) to a RAM-backed folder and reloads it into
its slot in place (`LoRARequest(load_inplace=True)`): no engine restart, no new slot ids.

Why PPO's logprobs never come from the engine: the engine runs other kernels (and, with a
4/8-bit training base on CPU, another precision of the base), so its logprobs differ from what
the training pass computes for the same tokens. PPO's ratio must be exactly 1 before the first
update, so `old_logprobs` come from the host's own evaluate pass (`ModelHost.forward`); the
engine's samples are then scored by the very model that trains on them.

Memory: the engine holds its own copy of the base (vLLM cannot share torch weights with a peft
model). On CUDA the engine sleeps during evaluation and training (`LLM.sleep(level=1)`: weights
offloaded to host memory, KV cache freed) and wakes for rollouts, so the GPU holds one base while
training runs. vLLM's CPU platform has no sleep mode: there both copies stay resident; the host
reports the engine's cost (`info()["vllm"]`).

vLLM is imported lazily: CPU users and the default tests never need it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The LoRA ranks vLLM accepts for max_lora_rank.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def available() -> bool:
    try:
        from vllm import LLM  # noqa: F401  (not just `import vllm`: a folder named vllm on sys.path imports)
    except Exception:  # ImportError, or a broken install (e.g. torchvision beside a CPU torch)
        return False
    return True


def _ram_dir() -> str:
    """A RAM-backed folder for adapter hand-over when there is one (/dev/shm), else the temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


class VLLMEngine:
    """One in-process vLLM engine over `base_path` with a LoRA slot for each of `policies`.

    Args:
        base_path: the HF folder of the shared base (the same one the host trains on).
        policies: policy names; each gets a fixed slot id (1, 2, ...).
        max_lora_rank: the largest LoRA rank of any policy.
        dtype: "fp32" or "bf16" (the compute dtype of the engine's base copy).
        quantization: the training base's quantization. On CUDA "4bit" loads the engine's base
            with bitsandbytes too; elsewhere the engine's copy stays in `dtype`.
        max_model_len: prompt + response tokens the engine must hold per sequence.
        max_num_seqs: sequences decoded together.
        gpu_memory_utilization: fraction of the GPU the engine may take (weights + KV cache).
        kv_cache_gib: KV-cache size on CPU.
        sleep: put the engine to sleep between rollouts where the platform supports it.
        seed: engine seed (each request also carries its own seed).
    """

    def __init__(self, base_path: str, policies: list[str], max_lora_rank: int, dtype: str = "fp32",
                 quantization: str = "none", max_model_len: int = 256, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 0.25, sleep: bool = True,
                 seed: int = 0):
        # One process: the engine core runs in this (host) process, so no worker processes are
        # spawned and the host's thread settings stay ours.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # don't re-pin the host's threads
        cuda = torch.cuda.is_available()
        from vllm import LLM

        rank = next((r for r in _VLLM_RANKS if r >= max_lora_rank), None)
        if rank is None:
            raise ValueError(f"LoRA rank {max_lora_rank} is larger than vLLM supports ({_VLLM_RANKS[-1]})")
        kwargs = dict(
            model=str(base_path), skip_tokenizer_init=True, enable_lora=True, max_loras=len(policies),
            max_cpu_loras=len(policies), max_lora_rank=rank, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype], seed=seed,
            enforce_eager=not cuda)
        self.engine_quantization = "none"
        if cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
            if quantization == "4bit":
                kwargs.update(quantization="bitsandbytes")
                self.engine_quantization = "4bit"
        else:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gib * 2**30))
        if not cuda and quantization != "none":
            log.warning("vLLM has no %s CPU kernels: the engine's copy of the base is %s (training stays %s)",
                        quantization, dtype, quantization)
        self.can_sleep = cuda and sleep
        self._set_threads = torch.set_num_threads
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # the host owns its threads, so put the real function back.
        torch.set_num_threads = self._set_threads
        self.slots = {p: i + 1 for i, p in enumerate(policies)}
        self.dir = Path(tempfile.mkdtemp(prefix="marl-ray-vllm-", dir=_ram_dir()))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.versions = {p: 0 for p in policies}
        self._stale: set[str] = set()  # policies whose folder is newer than their slot
        self.asleep = False

    # ------------------------------------------------------------ adapters
    def _request(self, policy: str, load_inplace: bool = False):
        from vllm.lora.request import LoRARequest

        extra = {"load_inplace": True} if load_inplace else {}
        return LoRARequest(policy, self.slots[policy], str(self.dir / policy), **extra)

    def sync(self, policy: str, write) -> None:
        """Write `policy`'s current adapter with `write(folder)`; the next `generate` loads it into its
        slot in place (one load per slot, however many syncs and wake-ups came before)."""
        write(self.dir / policy)  # atomic (MultiAdapterModel.save_policy): the engine never reads half a folder
        self.versions[policy] += 1
        self._stale.add(policy)

    def _load(self, policy: str) -> None:
        """(Re)load `policy`'s folder into its slot, replacing what the slot held."""
        engine = self.llm.llm_engine
        try:
            request = self._request(policy, load_inplace=True)
        except TypeError:  # a vLLM before load_inplace: drop the slot, then load it again
            engine.remove_lora(self.slots[policy])
            request = self._request(policy)
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM refused the adapter of policy {policy!r} ({self.dir / policy})")

    # ------------------------------------------------------------ sampling
    def generate(self, prompts: list[list[int]], policies: list[str], *, max_new_tokens: int,
                 min_new_tokens: int, temperature: float, top_k: int, top_p: float, do_sample: bool,
                 eos_token_id, seed: int) -> list[list[int]]:
        """Token ids of each prompt's response, prompt i under policies[i], one `generate` call.

        The settings mean what they mean in `MultiAdapterModel.generate` (HF): temperature, then
        top-k (0 = off), then top-p (1 = off); greedy when do_sample is False; EOS cannot be
        sampled before min_new_tokens tokens (HF's min_new_tokens, vLLM's min_tokens, which also
        masks the stop ids) and ends the response after. The engine runs without a tokenizer, so
        EOS is passed as a stop token id.
        """
        from vllm import SamplingParams

        eos = [] if eos_token_id is None else (list(eos_token_id) if isinstance(eos_token_id, (list, tuple))
                                               else [eos_token_id])
        common = dict(max_tokens=max_new_tokens, min_tokens=min_new_tokens, detokenize=False,
                      stop_token_ids=eos or None)
        if do_sample:
            common.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            common.update(temperature=0.0)
        # Each row its own seed: a row's sample does not depend on which rows share its batch.
        params = [SamplingParams(seed=seed * 100_003 + i, **common) for i in range(len(prompts))]
        self.wake()
        for policy in sorted(self._stale):
            self._load(policy)
        self._stale.clear()
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                 lora_request=[self._request(p) for p in policies], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # ------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free the engine's GPU memory (weights to host memory, KV cache dropped) until `wake`."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            # LoRA slots may not survive a sleep: generate reloads every policy sent so far.
            self._stale.update(p for p, version in self.versions.items() if version)

    def info(self) -> dict:
        return {"startup_s": round(self.startup_s, 2), "can_sleep": self.can_sleep, "asleep": self.asleep,
                "engine_quantization": self.engine_quantization, "slots": dict(self.slots),
                "versions": dict(self.versions)}

    def close(self) -> None:
        self._cleanup()

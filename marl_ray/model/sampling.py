"""Sampling: one `Sampler` interface, three implementations, chosen once.

| sampler    | what runs                                                                    |
| ---------- | ---------------------------------------------------------------------------- |
| HFGenerate | transformers' `generate` on the training model (any architecture)            |
| LeanDecode | `decoding.sample` over `decoding.LeanLlama` (plain Llama, Qwen2, Qwen3 and    |
|            | Mistral bases): HF generate's sampling with less overhead per step; also      |
|            | returns the decode steps' scores                                              |
| VLLM       | a vLLM engine over the same base, one LoRA slot per policy (model hosts only) |

`Sampler.generate` works on tensors (left-padded prompts in, prompt + new tokens out) and is what
`MultiAdapterModel.generate` calls; `Sampler.sample` works on token lists and is what a model host
calls: it pads, samples, and cuts every response to exactly R positions with a mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from marl_ray.model import decoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled (the generation section of a run's config, less the backend)."""

    max_new_tokens: int
    min_new_tokens: int | None = None  # with stop_at_eos: no EOS before this many tokens; None = max_new_tokens
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    stop_at_eos: bool = False  # False: EOS is never sampled, every response has max_new_tokens tokens
    scored: bool = False  # also return the policy's logprobs/values/entropies of the sampled tokens
    # tokens treated as EOS besides the base's (a chat template's end of turn: data/prompts.end_of_turn_ids)
    stop_token_ids: tuple[int, ...] = ()
    batch_rows: int | None = None  # a host decodes at most this many rows at once (None: all of a call's)

    @classmethod
    def from_config(cls, gen, scored: bool = False) -> "SamplingSettings":
        return cls(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, temperature=gen.temperature,
                   top_k=gen.top_k, top_p=gen.top_p, stop_at_eos=gen.stop_at_eos, scored=scored,
                   batch_rows=gen.batch_rows)


@dataclass
class RolloutScores:
    """The policy's logprobs, values and entropies of sampled tokens, from the decode steps (B, N)."""

    logprobs_BR: torch.Tensor
    values_BR: torch.Tensor
    entropy_BR: torch.Tensor

    FIELDS = ("logprobs_BR", "values_BR", "entropy_BR")  # in field order


@dataclass
class Samples:
    """Responses of N prompts, exactly R positions each; positions after an EOS are padding (mask 0)."""

    responses: torch.Tensor  # (N, R) long
    response_mask: torch.Tensor  # (N, R) long
    scores: "RolloutScores | None" = None  # RolloutScores (N, R) from the decode steps, or None

    @staticmethod
    def cat(parts: "list[Samples]") -> "Samples":
        """The rows of `parts` in order; scores only when every part has them."""
        scores = None
        if all(p.scores is not None for p in parts):
            scores = RolloutScores(*(torch.cat([getattr(p.scores, f) for p in parts]) for f in RolloutScores.FIELDS))
        return Samples(torch.cat([p.responses for p in parts]), torch.cat([p.response_mask for p in parts]), scores)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (ids (B, P), mask (B, P))."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids, mask


class Sampler:
    """Samples continuations under per-row adapters (see the module docstring)."""

    name = "sampler"

    def generate(self, model, input_ids_BT, attention_mask_BT, names: list[str], scored: bool = False, *,
                 max_new_tokens: int, min_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, do_sample: bool = True, eos_token_id=None, pad_token_id=None):
        """(prompt + new tokens (B, T + n), RolloutScores or None) for left-padded prompts, row b under
        names[b]. min_new_tokens None = max_new_tokens; eos/pad None = the base's generation config."""
        gcfg = model.base.generation_config
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if min_new_tokens is None else min_new_tokens,
            do_sample=do_sample, pad_token_id=gcfg.pad_token_id if pad_token_id is None else pad_token_id,
            eos_token_id=gcfg.eos_token_id if eos_token_id is None else eos_token_id,
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        with model.route(names):
            return self._generate(model, input_ids_BT, attention_mask_BT, names, scored, kwargs)

    def _generate(self, model, ids, mask, names, scored, kwargs):
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model, prompts: list[list[int]], policies: list[str], settings: SamplingSettings,
               seed: int) -> Samples:
        """Responses of prompts[i] under policies[i], exactly R = max_new_tokens positions each."""
        gcfg = model.base.generation_config
        pad = gcfg.pad_token_id if gcfg.pad_token_id is not None else 0
        eos = gcfg.eos_token_id
        if settings.stop_token_ids:
            base_eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
            eos = base_eos + [t for t in settings.stop_token_ids if t not in base_eos]
        R = settings.max_new_tokens
        stop_at_eos = settings.stop_at_eos and eos is not None
        # Without stop_at_eos, EOS is masked at every position (min = R): exactly R tokens.
        min_new = R if settings.min_new_tokens is None or not stop_at_eos else settings.min_new_tokens
        resp, scores = self._sample_rows(model, prompts, policies, settings, seed, pad, eos, min_new)
        rmask = torch.ones_like(resp)
        if stop_at_eos:  # EOS ends a response (it can only occur when min_new_tokens < R)
            eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
            is_eos = torch.isin(resp, eos_ids).long()
            after = (is_eos.cumsum(1) - is_eos) > 0  # positions after the first EOS
            rmask[after] = 0
            resp[after] = pad
        return Samples(resp, rmask, scores)

    def _sample_rows(self, model, prompts, policies, settings, seed, pad, eos, min_new):
        """(responses (N, R) padded with `pad`, RolloutScores or None) on the training model."""
        R = settings.max_new_tokens
        ids, mask = pad_left(prompts, pad)
        torch.manual_seed(seed)
        dev = model.device
        out, scored = self.generate(
            model, ids.to(dev), mask.to(dev), list(policies), settings.scored and all(
                model.roles.get(n) == "policy" for n in policies),
            max_new_tokens=R, min_new_tokens=min_new, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, do_sample=settings.do_sample, eos_token_id=eos, pad_token_id=pad)
        resp = out[:, ids.shape[1]:].cpu()
        n = resp.shape[1]
        if n < R:  # every row stopped early: pad to R
            resp = torch.cat([resp, torch.full((resp.shape[0], R - n), pad, dtype=resp.dtype)], 1)
        if scored is not None:
            scored = RolloutScores(*(torch.nn.functional.pad(v.float().cpu(), (0, R - n))
                                     for v in (scored.logprobs_BR, scored.values_BR, scored.entropy_BR)))
        return resp, scored


class HFGenerate(Sampler):
    """transformers' `generate` on the training model: any architecture, no decode-step scores."""

    name = "hf"

    def _generate(self, model, ids, mask, names, scored, kwargs):
        return model.base.generate(input_ids=ids, attention_mask=mask, **kwargs), None


class LeanDecode(Sampler):
    """`decoding.sample` over the base's layers (`decoding.FAMILIES`; anything else goes to HF generate).

    exact: linear layers as modules and sdpa attention, HF's arithmetic: the same tokens as HF
    generate under the same seed. Otherwise plain LoRA layers are computed by `decoding._project`
    and attention (on a CPU) in fp32 eagerly: the logits agree to rounding, and it is faster."""

    def __init__(self, exact: bool = False):
        self.exact = exact
        self.name = "exact" if exact else "lean"
        self._fallback = HFGenerate()
        self._warned = False

    def _generate(self, model, ids, mask, names, scored, kwargs):
        lean = model.lean()
        if kwargs["max_new_tokens"] <= 0 or lean is None or not decoding.generation_config_is_plain(
                model.base.generation_config):
            if not self._warned and kwargs["max_new_tokens"] > 0:
                # a warning: an actor's INFO records reach no console (Ray forwards its stderr, where Python
                # writes warnings when nothing else is set up)
                log.warning("the lean decode loop does not serve this base or generation config: HF generate "
                            "samples")
                self._warned = True
            return self._fallback._generate(model, ids, mask, names, scored, kwargs)
        rows = None if self.exact else model.lora_rows(names)
        steps, hidden = ([], []) if scored else (None, None)
        out = decoding.sample(lean, ids, mask, lora_rows=rows, scores_out=steps, hidden_out=hidden, **kwargs)
        if not scored:
            return out, None
        return out, model.rollout_scores(names, torch.stack([s[0] for s in steps], 1),
                                         torch.stack([s[1] for s in steps], 1), torch.stack(hidden, 1))


class VLLM(Sampler):
    """A vLLM engine over the same base with one LoRA slot per policy; a policy's weights are synced
    to the engine before it samples whenever they changed since the last sync."""

    name = "vllm"

    def __init__(self, engine):
        self.engine = engine
        self._synced: dict[str, int] = {}  # policy -> parameter version the engine holds

    def generate(self, model, *args, **kwargs):
        raise NotImplementedError("the vLLM sampler serves token lists (sample), not tensors")

    def _sync(self, model, policies: set[str]):
        for p in sorted(policies):
            # Sum of the autograd version counters of the policy's tensors: any in-place change
            # (optimizer step, import, set_state) bumps it, so the engine is stale exactly when it moved.
            v = sum(t._version for t in model.policy_state(p).values())
            if self._synced.get(p) != v:
                self.engine.sync(p, lambda folder, p=p: model.save_policy(p, folder))
                self._synced[p] = v

    def _sample_rows(self, model, prompts, policies, settings, seed, pad, eos, min_new):
        R = settings.max_new_tokens
        self._sync(model, set(policies))
        rows = self.engine.generate(prompts, list(policies), eos_token_id=eos, seed=seed, max_new_tokens=R,
                                    min_new_tokens=min_new, temperature=settings.temperature, top_k=settings.top_k,
                                    top_p=settings.top_p, do_sample=settings.do_sample)
        self.engine.sleep()  # evaluation and training come next: give the GPU back
        resp = torch.full((len(rows), R), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            resp[i, :len(r)] = torch.tensor(r[:R], dtype=torch.long)
        return resp, None


def make(kind: str, base) -> Sampler:
    """The sampler for a model: "auto" = the lean loop where `decoding.supports(base)` (plain Llama,
    Qwen2, Qwen3, Mistral), else HF generate (with one log line that says so); "lean", "exact", "hf"
    as named."""
    if kind == "auto":
        if decoding.supports(base):
            return LeanDecode()
        # a warning, not INFO: a model host's INFO records reach no console on Ray (it forwards the actor's
        # stderr, where Python writes warnings when no handler is set up); one line per model
        log.warning("%s is not served by the lean decode loop: HF generate samples", type(base).__name__)
        return HFGenerate()
    if kind in ("lean", "exact"):
        return LeanDecode(exact=kind == "exact")
    if kind == "hf":
        return HFGenerate()
    raise ValueError(f"sampler {kind!r} is not one of auto, lean, exact, hf")

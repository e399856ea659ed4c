"""MultiAdapterModel: one causal-LM base serving every role of RL through named LoRA adapters.

The registry (`adapters.py`) holds the adapters and their heads; this module adds the passes:
final hidden states under a per-row adapter, the policy pass with autograd, and `evaluate`, which
scores policy logprobs + values, reference logprobs and rewards in ONE mixed-adapter pass over
the base (row b of a batch runs under the adapter named for it, "__base__" rows under none).
Sampling is delegated to a `sampling.Sampler` chosen when the model is made.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from marl_ray.algorithms.ppo import entropy_from_logits, last_token_index, logprobs_from_logits
from marl_ray.model import decoding, sampling
from marl_ray.model.adapters import REF, AdapterRegistry
from marl_ray.model.loading import load_base
from marl_ray.model.sampling import RolloutScores

log = logging.getLogger(__name__)

def positions(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` uses them. (B, T)"""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers: `layers` in most architectures, `h` in GPT-2's."""
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return nn.ModuleList()


@contextlib.contextmanager
def checkpointed_layers(decoder: nn.Module):
    """Run each of `decoder.layers` under torch.utils.checkpoint (non-reentrant): the backward pass
    recomputes a layer from its input instead of keeping its activations. The base stays in eval
    mode, so HF's own switch (train mode only) does not apply; the layers have no dropout, so the
    recomputation is exact."""
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(decoder))
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run  # the instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward



# Positions whose logits one chunk of the output head holds, by default: about 2^24 logits (64 MiB in
# fp32) per chunk, so 341 positions for a 49k vocabulary, 2048 for an 8k one.
HEAD_CHUNK_LOGITS = 1 << 24


def head_chunk_positions(chunk: int | None, vocab: int) -> int:
    """Positions per chunk of the output head: `chunk`, or None (auto) about HEAD_CHUNK_LOGITS logits."""
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"head_chunk={chunk}: give a positive number of positions, or None (auto)")
        return int(chunk)
    return max(16, HEAD_CHUNK_LOGITS // max(1, vocab))


class ChunkedHead(torch.autograd.Function):
    """log p(token) and entropy at each position from final hidden states and a frozen output head
    (weight (V, H), optional bias, optional Gemma 2 soft cap), in chunks of positions: no more than
    one chunk's logits exist at a time, in the forward or the backward.

    The forward of a chunk computes the logits z = h W^T (+ b, then the cap c tanh(z / c)), their
    logsumexp, the sampled token's logit and the entropy; where h needs a gradient it also keeps the
    Jacobian of log p(token) in h, J = ((onehot - softmax(z)) * dz/du) W, one (H,) row per position,
    so the backward is grad_h = g * J with no logits recomputed. The entropy is a statistic: it has
    no gradient (marked non-differentiable). Returns (logprobs (N,), entropy (N,)), both fp32."""

    @staticmethod
    def forward(ctx, h_NH, weight_VH, bias_V, tokens_N, chunk: int, softcap, want_entropy: bool):
        need_grad = ctx.needs_input_grad[0]
        N = h_NH.shape[0]
        logprobs = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        entropy = torch.zeros(N, dtype=torch.float32, device=h_NH.device)
        jac = h_NH.new_empty(h_NH.shape) if need_grad else None
        tokens_N1 = tokens_N.long().unsqueeze(-1)
        for lo in range(0, N, chunk):
            hi = min(N, lo + chunk)
            z = torch.nn.functional.linear(h_NH[lo:hi], weight_VH, bias_V).float()  # (n, V)
            if softcap:
                z = torch.tanh(z / softcap) * softcap
            lse = torch.logsumexp(z, dim=-1)
            logprobs[lo:hi] = z.gather(-1, tokens_N1[lo:hi]).squeeze(-1) - lse
            if not (want_entropy or need_grad):
                continue
            p = torch.exp(z - lse.unsqueeze(-1))  # softmax
            if want_entropy:  # H = logsumexp(z) - sum_v p_v z_v
                entropy[lo:hi] = lse - torch.linalg.vecdot(p, z)
            if need_grad:
                q = p.neg_().scatter_add_(-1, tokens_N1[lo:hi], torch.ones_like(lse).unsqueeze(-1))
                if softcap:  # d(c tanh(u / c)) / du = 1 - (z / c)^2
                    q.mul_(1 - (z / softcap).square())
                jac[lo:hi] = q.to(weight_VH.dtype) @ weight_VH
        if need_grad:
            ctx.save_for_backward(jac)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        (jac,) = ctx.saved_tensors
        grad_h = (jac.float() * grad_logprobs_N.float().unsqueeze(-1)).to(jac.dtype)
        return grad_h, None, None, None, None, None, None


@dataclass
class Evaluation:
    """What one evaluate pass returns (R = response length)."""

    logprobs_BR: torch.Tensor
    ref_logprobs_BR: torch.Tensor
    values_BR: torch.Tensor
    scores_B: torch.Tensor
    entropy_BR: torch.Tensor

    FIELDS = ("logprobs_BR", "ref_logprobs_BR", "values_BR", "scores_B", "entropy_BR")  # in field order


class MultiAdapterModel(AdapterRegistry):
    """A frozen base with named policy, reward and reference adapters, and the passes over them."""

    def __init__(self, base: nn.Module, sampler: str = "auto", passes: str = "auto", head_chunk: int | None = None):
        """sampler: "auto" (the lean decode loop where the base allows it, else HF generate), "lean",
        "exact" (the lean loop with HF's arithmetic: HF generate's tokens under the same seed) or "hf".
        passes: "auto" (scoring and training through decoding.LeanLlama where the base allows it) or "hf".
        head_chunk: positions per chunk of the output head in the scoring and training passes
        (`head_scores`); None = auto (about HEAD_CHUNK_LOGITS logits a chunk)."""
        super().__init__(base)
        if passes not in ("auto", "hf"):
            raise ValueError(f"passes={passes!r}: use 'auto' or 'hf'")
        self.passes = passes
        head_chunk_positions(head_chunk, 1)  # refuses a bad value here
        self.head_chunk = head_chunk
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2: applied as HF does
        self.sampler = sampling.make(sampler, base)
        self._lean_model = None
        # Recompute each decoder layer in the backward pass instead of keeping its activations
        # (training passes only): less memory for one more forward. On for a 4/8-bit base by default,
        # whose point is memory.
        self.gradient_checkpointing = self.quantization != "none"

    @classmethod
    def from_pretrained(cls, name_or_path: str, quantization="none", dtype="fp32", reference_adapter=None,
                        device_map=None, gradient_checkpointing: bool | None = None, low_memory: bool = False,
                        sampler: str = "auto", head_chunk: int | None = None) -> "MultiAdapterModel":
        base = load_base(name_or_path, quantization, dtype, device_map, low_memory=low_memory)
        model = cls(base, sampler=sampler, head_chunk=head_chunk)
        if gradient_checkpointing is not None:
            model.gradient_checkpointing = bool(gradient_checkpointing)
        if reference_adapter:
            model.set_reference_adapter(reference_adapter)
        return model

    def lean(self) -> "decoding.LeanLlama | None":
        """Our own loop over the base's layers where the base is a plain HF Llama (see decoding.py)."""
        if not decoding.supports(self.base):  # cheap: checked each call (hooks may come and go)
            return None
        if self._lean_model is None or self._lean_model.base is not self.base:
            self._lean_model = decoding.LeanLlama(self.base)
        return self._lean_model

    # ---------------------------------------------------------------- passes
    def hidden(self, input_ids_BT, attention_mask_BT, adapters: str | Sequence[str], keep_from: int = 0) -> torch.Tensor:
        """Final hidden states (B, T - keep_from, H) of positions [keep_from, T), row b under
        adapters[b] ("ref" = the reference). A base of a family of decoding.FAMILIES (Llama, Qwen2, Qwen3,
        Mistral) runs through decoding.LeanLlama (eager attention, last layer on the kept positions
        only), any other through its HF decoder."""
        names = [adapters] * input_ids_BT.shape[0] if isinstance(adapters, str) else list(adapters)
        if not 0 <= keep_from < input_ids_BT.shape[1]:
            raise ValueError(f"keep_from={keep_from} is outside the sequence (length {input_ids_BT.shape[1]})")
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        lean = self.lean() if self.passes == "auto" else None
        with self.route(names):
            if lean is not None:
                return lean.hidden(input_ids_BT, attention_mask_BT, positions(attention_mask_BT), keep_from,
                                   checkpoint=checkpointed, lora_rows=self.lora_rows(names))
            decoder = self.base.get_decoder()
            with checkpointed_layers(decoder) if checkpointed else contextlib.nullcontext():
                out = decoder(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                              position_ids=positions(attention_mask_BT), use_cache=False)
        return out.last_hidden_state[:, keep_from:]


    def lm_logits(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """The base's logits from final hidden states, as its own forward computes them: the output
        head, then (Gemma 2) the soft cap cap * tanh(logits / cap) of `final_logit_softcapping`."""
        # contiguous: callers pass slices ([:, :-1]); a linear layer on a strided 3-D input runs as
        # a batched product over a copy of its weight per row, 2-4x slower than one folded product
        logits = self.base.get_output_embeddings()(hidden_BTH.contiguous())
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()

    def _plain_head(self) -> nn.Linear | None:
        """The output head where ChunkedHead can compute through its weight: a plain, frozen linear
        layer with no hooks (not a LoRA-wrapped, quantized, offloaded or trainable one)."""
        head = self.base.get_output_embeddings()
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
            return None
        if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
            return None
        return head

    def head_scores(self, hidden_BRH: torch.Tensor, tokens_BR: torch.Tensor, entropy: bool = True):
        """(logprobs_BR, entropy_BR) fp32 of tokens_BR from the final hidden states of the positions that
        predict them: what logprobs_from_logits / entropy_from_logits give on lm_logits(hidden_BRH), but
        the head runs in chunks of `head_chunk` positions, so the (B, R, V) logits never exist at once,
        and with autograd (where hidden_BRH needs a gradient) no chunk's logits are kept for the
        backward. The entropy carries no gradient; entropy=False: zeros (the softmax is skipped)."""
        B, R, H = hidden_BRH.shape
        h_NH = hidden_BRH.reshape(B * R, H)
        tokens_N = tokens_BR.reshape(B * R).to(h_NH.device)
        head = self._plain_head()
        vocab = head.weight.shape[0] if head is not None else self.base.get_output_embeddings().weight.shape[0]
        chunk = head_chunk_positions(self.head_chunk, vocab)
        if head is not None:
            lp, ent = ChunkedHead.apply(h_NH, head.weight, head.bias, tokens_N, chunk, self.logit_softcap, entropy)
            return lp.view(B, R), ent.view(B, R)
        # any other head (LoRA on the output layer, quantized, hooked): its own forward per chunk, under
        # torch.utils.checkpoint where a gradient flows (the backward recomputes the chunk's logits)
        from torch.utils.checkpoint import checkpoint

        def scores(h, t):
            logits = self.lm_logits(h)
            lp = logprobs_from_logits(logits, t)
            if not entropy:
                return lp, torch.zeros_like(lp)
            with torch.no_grad():
                return lp, entropy_from_logits(logits)

        grad = torch.is_grad_enabled() and h_NH.requires_grad
        parts = [checkpoint(scores, h_NH[lo:lo + chunk], tokens_N[lo:lo + chunk], use_reentrant=False) if grad
                 else scores(h_NH[lo:lo + chunk], tokens_N[lo:lo + chunk]) for lo in range(0, B * R, chunk)]
        lp = torch.cat([p[0] for p in parts]) if parts else h_NH.new_zeros(0, dtype=torch.float32)
        ent = torch.cat([p[1] for p in parts]).detach() if parts else torch.zeros_like(lp)
        return lp.view(B, R), ent.view(B, R)

    def values(self, name: str, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """Value estimates of policy `name` (zeros for a policy without a value head: a critic-free one)."""
        if name not in self.value_heads:
            return hidden_BTH.new_zeros(hidden_BTH.shape[:-1], dtype=torch.float32)
        return self.value_heads[name](hidden_BTH.float()).squeeze(-1)

    def token_scores(self, name: str, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """Per-token reward-head outputs (B, T, num_labels)."""
        return self.score_heads[name](hidden_BTH.float())

    def policy_forward(self, name, input_ids_BT, attention_mask_BT, response_start: int):
        """Policy pass with autograd: (logprobs_BR, values_BR, logits_BRV) of the response tokens.

        Position t-1 predicts token t, so the response's R tokens are scored from positions
        [response_start - 1, T - 1); the value at those positions is the value of the state
        before each response token.
        """
        self._require(name, "policy")
        h_BRH = self.hidden(input_ids_BT, attention_mask_BT, name, keep_from=response_start - 1)[:, :-1]
        logits_BRV = self.lm_logits(h_BRH)
        logprobs_BR = logprobs_from_logits(logits_BRV, input_ids_BT[:, response_start:])
        return logprobs_BR, self.values(name, h_BRH), logits_BRV

    def policy_pass(self, name, input_ids_BT, attention_mask_BT, response_start: int):
        """The training pass: (logprobs_BR, values_BR, entropy_BR) of the response tokens, as
        `policy_forward` (whose logits give the same logprobs and entropies), with the output head in
        chunks (`head_scores`): the logprobs carry the gradient, the entropy none."""
        self._require(name, "policy")
        h_BRH = self.hidden(input_ids_BT, attention_mask_BT, name, keep_from=response_start - 1)[:, :-1]
        logprobs_BR, entropy_BR = self.head_scores(h_BRH, input_ids_BT[:, response_start:])
        return logprobs_BR, self.values(name, h_BRH), entropy_BR

    @torch.no_grad()
    def reward_scores(self, name: str, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        """One reward per sequence, read at its last real token (right, left or no padding). (B,)"""
        self._require(name, "reward")
        h = self.hidden(input_ids_BT, attention_mask_BT, name)
        idx = last_token_index(attention_mask_BT)
        h_BH = h[torch.arange(h.shape[0], device=h.device), idx]
        return self.token_scores(name, h_BH)[:, 0]

    @torch.no_grad()
    def reference_logprobs(self, input_ids_BT, attention_mask_BT, response_start: int) -> torch.Tensor:
        h = self.hidden(input_ids_BT, attention_mask_BT, REF, keep_from=response_start - 1)[:, :-1]
        return self.head_scores(h, input_ids_BT[:, response_start:], entropy=False)[0]

    @torch.no_grad()
    def evaluate(self, input_ids_BT, attention_mask_BT, policies: Sequence[str], rewards: Sequence[str | None],
                 response_start: int, rollout: RolloutScores | None = None,
                 reference: Sequence[bool] | None = None) -> Evaluation:
        """Policy logprobs + values, reference logprobs and reward scores in ONE pass over the base.

        Row b is scored under policy policies[b] and reward adapter rewards[b] (None: no adapter
        reward, its score is NaN); the pass stacks the policy rows, the reference rows and the reward
        rows as one mixed-adapter batch. `rollout`: the policy's logprobs, values and entropies from
        the decode steps (`generate_scored`): then no policy rows. `reference[b]` False: no reference
        row for b (its ref logprobs are 0), for an algorithm that does not use them; a batch that
        needs none of the three runs no pass at all.
        """
        B = input_ids_BT.shape[0]
        for p in set(policies):
            self._require(p, "policy")
        for r in set(rewards) - {None}:
            self._require(r, "reward")
        R = input_ids_BT.shape[1] - response_start
        if rollout is not None and rollout.logprobs_BR.shape != (B, R):
            raise ValueError(f"rollout scores of shape {tuple(rollout.logprobs_BR.shape)} for {B} rows of {R} "
                             "response tokens")
        last = last_token_index(attention_mask_BT) - (response_start - 1)
        if bool((last < 0).any()):
            raise ValueError("a row has no real token at or after response_start - 1: nothing to score")
        pol_rows = [] if rollout is not None else list(range(B))
        ref_rows = [b for b in range(B) if reference is None or reference[b]]
        rw_rows = [b for b in range(B) if rewards[b] is not None]
        rows = pol_rows + ref_rows + rw_rows
        dev = input_ids_BT.device
        tokens_BR = input_ids_BT[:, response_start:]
        ref_logprobs = torch.zeros(B, R, dtype=torch.float32, device=dev)
        scores = torch.full((B,), float("nan"), dtype=torch.float32, device=dev)
        if rows:
            # Only positions from response_start - 1 on are read: the response's logprobs and values,
            # and the reward at each row's last real token (a response has at least one token).
            idx = torch.tensor(rows, device=dev)
            names = [policies[b] for b in pol_rows] + [REF] * len(ref_rows) + [rewards[b] for b in rw_rows]
            h = self.hidden(input_ids_BT[idx], attention_mask_BT[idx], names, keep_from=response_start - 1)
            n_pol, n_ref = len(pol_rows), len(ref_rows)
            if ref_rows:
                h_ref = h[n_pol:n_pol + n_ref, :-1]
                ref_logprobs[ref_rows] = self.head_scores(h_ref, tokens_BR[ref_rows], entropy=False)[0]
            h_rw = h[n_pol + n_ref:]
            for r in set(rewards) - {None}:
                local = [i for i, b in enumerate(rw_rows) if rewards[b] == r]
                batch_rows = [rw_rows[i] for i in local]
                scores[batch_rows] = self.token_scores(r, h_rw[local, last[batch_rows]])[:, 0]
        if rollout is not None:
            return Evaluation(rollout.logprobs_BR.to(dev), ref_logprobs, rollout.values_BR.to(dev), scores,
                              rollout.entropy_BR.to(dev))
        h_pol = h[:B, :-1]
        logprobs, entropy = self.head_scores(h_pol, tokens_BR)
        pol = self.rollout_scores(list(policies), logprobs, entropy, h_pol)
        return Evaluation(pol.logprobs_BR, ref_logprobs, pol.values_BR, scores, pol.entropy_BR)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, input_ids_BT, attention_mask_BT, policies: str | Sequence[str], **settings) -> torch.Tensor:
        """Sample continuations of left-padded prompts, row b under policies[b]. (B, T + new)

        settings: max_new_tokens, min_new_tokens (default: max_new_tokens), temperature, top_k,
        top_p, do_sample, eos_token_id, pad_token_id (see `sampling.Sampler.generate`)."""
        names = [policies] * input_ids_BT.shape[0] if isinstance(policies, str) else list(policies)
        return self.sampler.generate(self, input_ids_BT, attention_mask_BT, names, scored=False, **settings)[0]

    @torch.no_grad()
    def generate_scored(self, input_ids_BT, attention_mask_BT, policies: str | Sequence[str], **settings):
        """`generate`, plus the policy logprobs, values and entropies of the sampled tokens read off
        the decode steps (the logits and final hidden states they compute anyway): (tokens,
        RolloutScores), or (tokens, None) where the sampler cannot give them (HF generate) or a row is
        not under a policy. They equal `evaluate`'s to rounding (fp32: about 1e-7 per token)."""
        names = [policies] * input_ids_BT.shape[0] if isinstance(policies, str) else list(policies)
        scored = all(self.roles.get(n) == "policy" for n in names)
        return self.sampler.generate(self, input_ids_BT, attention_mask_BT, names, scored=scored, **settings)

    def policy_scores(self, names: list[str], tokens_BN, logits_BNV, hidden_BNH) -> RolloutScores:
        """Row b's logprobs of tokens_BN, values under policy names[b]'s value head, and entropies,
        from the logits and final hidden states of the positions that predict those tokens."""
        return self.rollout_scores(names, logprobs_from_logits(logits_BNV, tokens_BN),
                                   entropy_from_logits(logits_BNV), hidden_BNH)

    def rollout_scores(self, names: list[str], logprobs_BN, entropy_BN, hidden_BNH) -> RolloutScores:
        """RolloutScores of given logprobs and entropies, with row b's values under policy names[b]'s
        value head from the final hidden states of the positions that predict the tokens."""
        values = torch.empty_like(logprobs_BN)
        for p in set(names):
            rows = [i for i, q in enumerate(names) if q == p]
            values[rows] = self.values(p, hidden_BNH[rows])
        return RolloutScores(logprobs_BN, values, entropy_BN)

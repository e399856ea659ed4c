"""A minibatch built from the batch's tensors in this process: the reference the host-kept rows are
compared with (the learner itself never sends rows; the hosts keep them)."""

from __future__ import annotations

from marl_ray.runtime.protocol import Minibatch


def sent_rows(learner, batch, ev, a, local: list[int]) -> Minibatch:
    """Rows a.rows[local] of one policy (a: its PolicyAdvantages) as a Minibatch of tensors."""
    sel = [a.rows[i] for i in local]
    ref = ev.ref_logprobs_BR[sel] if learner.spec[batch.policies[sel[0]]].beta > 0 else None
    return Minibatch(batch.input_ids[sel], batch.attention_mask[sel], batch.response_start, a.mask[local],
                     ev.logprobs_BR[sel], ev.values_BR[sel], a.advantages[local], a.returns[local], ref)

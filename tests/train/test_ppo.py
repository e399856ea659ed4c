"""Tests for marl_ray.algorithms.ppo: numbers derived by hand, cross-checks and mask invariance."""

import math

import pytest
import torch

from marl_ray.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    gae_reference,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    rewards_with_kl,
    value_loss,
)


def _random_mask(B, T, gen, left=False):
    """Rows of random length (0..T) of ones, right-padded (or left-padded)."""
    lengths_B = torch.randint(0, T + 1, (B,), generator=gen)
    lengths_B[0] = T  # always one row without padding
    pos_BT = torch.arange(T).expand(B, T)
    if left:
        return (pos_BT >= (T - lengths_B).unsqueeze(1)).float()
    return (pos_BT < lengths_B.unsqueeze(1)).float()


def _garbage_under(x_BT, mask_BT, gen, scale=1e3):
    """Copy of x_BT with big random numbers at masked positions."""
    junk_BT = torch.randn(x_BT.shape, generator=gen) * scale
    return torch.where(mask_BT.bool(), x_BT, junk_BT)


# --------------------------------------------------------------------------- GAE


# Hand example, gamma=0.9, lam=0.8 (gamma*lam = 0.72), 3 real tokens:
#   rewards = [1, 0, 2], values = [0.5, 1.0, 1.5], terminal after t=2 (next value 0)
#   delta_2 = 2 + 0.9*0   - 1.5 = 0.5          A_2 = 0.5
#   delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35         A_1 = 0.35 + 0.72*0.5  = 0.71
#   delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4          A_0 = 1.4  + 0.72*0.71 = 1.9112
#   returns = A + V = [2.4112, 1.71, 2.0]
HAND_ADV = [1.9112, 0.71, 0.5]
HAND_RET = [2.4112, 1.71, 2.0]


def test_gae_by_hand_right_padded():
    rewards_BT = torch.tensor([[1.0, 0.0, 2.0, 7.0]])  # 7 and 9 sit under padding
    values_BT = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_BT, torch.tensor([HAND_ADV + [0.0]]))
    torch.testing.assert_close(ret_BT, torch.tensor([HAND_RET + [0.0]]))


def test_gae_by_hand_left_padded():
    rewards_BT = torch.tensor([[5.0, 1.0, 0.0, 2.0]])
    values_BT = torch.tensor([[-3.0, 0.5, 1.0, 1.5]])
    mask_BT = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_BT, torch.tensor([[0.0] + HAND_ADV]))
    torch.testing.assert_close(ret_BT, torch.tensor([[0.0] + HAND_RET]))


def test_gae_reference_by_hand():
    rewards_BT = torch.tensor([[1.0, 0.0, 2.0, 7.0]])
    values_BT = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv_BT, ret_BT = gae_reference(rewards_BT, values_BT, mask_BT, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_BT, torch.tensor([HAND_ADV + [0.0]]))
    torch.testing.assert_close(ret_BT, torch.tensor([HAND_RET + [0.0]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # With gamma = lam = 1, A_t = sum_{k>=t} r_k - V_t.
    rewards_BT = torch.tensor([[1.0, 2.0, 3.0]])
    values_BT = torch.tensor([[0.5, 0.25, 4.0]])
    mask_BT = torch.ones(1, 3)
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv_BT, torch.tensor([[5.5, 4.75, -1.0]]))
    torch.testing.assert_close(ret_BT, torch.tensor([[6.0, 5.0, 3.0]]))


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.3)])
def test_gae_matches_reference_random(left, gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 16, 11
    mask_BT = _random_mask(B, T, gen, left=left)
    rewards_BT = torch.randn(B, T, generator=gen)
    values_BT = torch.randn(B, T, generator=gen)
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    ref_adv_BT, ref_ret_BT = gae_reference(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv_BT, ref_adv_BT)
    torch.testing.assert_close(ret_BT, ref_ret_BT)
    assert (adv_BT[mask_BT == 0] == 0).all() and (ret_BT[mask_BT == 0] == 0).all()


def test_gae_matches_reference_with_holes_and_bool_mask():
    gen = torch.Generator().manual_seed(1)
    B, T = 8, 9
    mask_BT = torch.rand(B, T, generator=gen) > 0.4
    rewards_BT = torch.randn(B, T, generator=gen)
    values_BT = torch.randn(B, T, generator=gen)
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=0.97, lam=0.9)
    ref_adv_BT, ref_ret_BT = gae_reference(rewards_BT, values_BT, mask_BT, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv_BT, ref_adv_BT)
    torch.testing.assert_close(ret_BT, ref_ret_BT)


@pytest.mark.parametrize("left", [False, True])
def test_gae_invariant_to_garbage_under_mask(left):
    gen = torch.Generator().manual_seed(2)
    B, T = 12, 10
    mask_BT = _random_mask(B, T, gen, left=left)
    rewards_BT = torch.randn(B, T, generator=gen)
    values_BT = torch.randn(B, T, generator=gen)
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT, gamma=0.99, lam=0.95)
    for junk in ("random", "nan", "inf"):
        if junk == "random":
            r2_BT = _garbage_under(rewards_BT, mask_BT, gen)
            v2_BT = _garbage_under(values_BT, mask_BT, gen)
        else:
            fill = float(junk)
            r2_BT = torch.where(mask_BT.bool(), rewards_BT, fill)
            v2_BT = torch.where(mask_BT.bool(), values_BT, -fill)
        adv2_BT, ret2_BT = gae(r2_BT, v2_BT, mask_BT, gamma=0.99, lam=0.95)
        assert torch.equal(adv_BT, adv2_BT), junk
        assert torch.equal(ret_BT, ret2_BT), junk


def test_gae_empty_row_and_no_grad():
    rewards_BT = torch.randn(2, 4, requires_grad=True)
    values_BT = torch.randn(2, 4, requires_grad=True)
    mask_BT = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv_BT, ret_BT = gae(rewards_BT, values_BT, mask_BT)
    assert not adv_BT.requires_grad and not ret_BT.requires_grad
    assert (adv_BT[0] == 0).all() and (ret_BT[0] == 0).all()


# --------------------------------------------------------------------------- logits


def test_logprobs_from_logits_by_hand():
    logits_BTV = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    tokens_BT = torch.tensor([[2, 0]])
    # log softmax: 3 - log(e + e^2 + e^3); 0 - log(1 + 1 + 2) = -log 4
    expected_BT = torch.tensor([[3.0 - math.log(math.e + math.e**2 + math.e**3), -math.log(4.0)]])
    torch.testing.assert_close(logprobs_from_logits(logits_BTV, tokens_BT), expected_BT)


def test_logprobs_from_bf16_logits_is_float32():
    gen = torch.Generator().manual_seed(3)
    logits_BTV = (torch.randn(2, 5, 50, generator=gen) * 4).to(torch.bfloat16)
    tokens_BT = torch.randint(0, 50, (2, 5), generator=gen)
    out_BT = logprobs_from_logits(logits_BTV, tokens_BT)
    assert out_BT.dtype == torch.float32
    expected_BT = torch.log_softmax(logits_BTV.double(), -1).gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out_BT.double(), expected_BT, atol=1e-5, rtol=1e-5)


def test_entropy_uniform_is_log_v_and_onehot_is_zero():
    V = 7
    ent_BT = entropy_from_logits(torch.full((2, 3, V), 1.5))
    torch.testing.assert_close(ent_BT, torch.full((2, 3), math.log(V)))
    peaked_BTV = torch.tensor([[[0.0, 1e4, 0.0]]])
    torch.testing.assert_close(entropy_from_logits(peaked_BTV), torch.zeros(1, 1))


def test_entropy_matches_definition():
    gen = torch.Generator().manual_seed(4)
    logits_BTV = torch.randn(3, 4, 10, generator=gen)
    p_BTV = torch.softmax(logits_BTV, -1)
    expected_BT = -(p_BTV * p_BTV.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits_BTV), expected_BT)


# --------------------------------------------------------------------------- masked stats


def test_masked_stats_by_hand():
    x_BT = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -60.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sum(x_BT, mask_BT).item() == 6.0
    torch.testing.assert_close(masked_sum(x_BT, mask_BT, dim=1), torch.tensor([3.0, 3.0]))
    assert masked_mean(x_BT, mask_BT).item() == 2.0
    torch.testing.assert_close(masked_mean(x_BT, mask_BT, dim=1), torch.tensor([1.5, 3.0]))
    # kept values 1, 2, 3: biased var 2/3, unbiased 1
    torch.testing.assert_close(masked_var(x_BT, mask_BT, unbiased=False), torch.tensor(2.0 / 3.0))
    torch.testing.assert_close(masked_var(x_BT, mask_BT), torch.tensor(1.0))
    white_BT = masked_whiten(x_BT, mask_BT)
    torch.testing.assert_close(white_BT, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    white_keep_BT = masked_whiten(x_BT, mask_BT, shift_mean=False)
    torch.testing.assert_close(white_keep_BT, torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))


def test_masked_mean_empty_mask_is_zero_not_nan():
    x_BT = torch.randn(2, 3)
    mask_BT = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x_BT, torch.zeros(2, 3)).item() == 0.0
    out_B = masked_mean(x_BT, mask_BT, dim=1)
    assert out_B[0].item() == 0.0
    torch.testing.assert_close(out_B[1], x_BT[1, :2].mean())
    assert torch.isfinite(masked_whiten(x_BT, torch.zeros(2, 3))).all()


def test_masked_stats_invariant_to_garbage():
    gen = torch.Generator().manual_seed(5)
    mask_BT = _random_mask(6, 8, gen)
    x_BT = torch.randn(6, 8, generator=gen)
    y_BT = _garbage_under(x_BT, mask_BT, gen)
    y_BT = torch.where((mask_BT == 0) & (torch.rand(6, 8, generator=gen) > 0.5), float("nan"), y_BT)
    assert torch.isnan(y_BT).any()
    assert torch.equal(masked_mean(x_BT, mask_BT), masked_mean(y_BT, mask_BT))
    assert torch.equal(masked_mean(x_BT, mask_BT, dim=1), masked_mean(y_BT, mask_BT, dim=1))
    assert torch.equal(masked_var(x_BT, mask_BT), masked_var(y_BT, mask_BT))
    wx_BT, wy_BT = masked_whiten(x_BT, mask_BT), masked_whiten(y_BT, mask_BT)
    assert torch.equal(wx_BT, wy_BT)
    assert (wx_BT[mask_BT == 0] == 0).all()
    kept = x_BT[mask_BT.bool()]
    torch.testing.assert_close(wx_BT[mask_BT.bool()], (kept - kept.mean()) / kept.std())


# --------------------------------------------------------------------------- KL / rewards


def test_kl_penalty_kinds():
    lp_BT = torch.tensor([[-1.0, -2.0]])
    ref_BT = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT, kind="abs"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT, kind="mse"), torch.tensor([[0.125, 0.5]]))
    with pytest.raises(ValueError, match="kl, abs, mse"):
        kl_penalty(lp_BT, ref_BT, kind="full")


def test_last_token_index():
    mask_BT = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert last_token_index(mask_BT).tolist() == [1, 3, -1, 2]


def test_rewards_with_kl_by_hand():
    scores_B = torch.tensor([10.0, 20.0, 30.0])
    lp_BT = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]])
    ref_BT = torch.tensor([[-2.0, -1.5, 8.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    rewards_BT, kl_BT = rewards_with_kl(scores_B, lp_BT, ref_BT, mask_BT, kl_coef=0.1)
    # row 0 right-padded: kl [1, 0.5, pad]; score at t=1.
    # row 1 no padding: kl [0, -1, -2]; score at t=2.
    # row 2 empty: nothing at all.
    torch.testing.assert_close(kl_BT, torch.tensor([[1.0, 0.5, 0.0], [0.0, -1.0, -2.0], [0.0, 0.0, 0.0]]))
    expected_BT = torch.tensor([[-0.1, -0.05 + 10.0, 0.0], [0.0, 0.1, 0.2 + 20.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards_BT, expected_BT)


def test_rewards_with_kl_left_padded_and_invariant():
    gen = torch.Generator().manual_seed(6)
    B, T = 5, 7
    for left in (False, True):
        mask_BT = _random_mask(B, T, gen, left=left)
        scores_B = torch.randn(B, generator=gen)
        lp_BT = torch.randn(B, T, generator=gen)
        ref_BT = torch.randn(B, T, generator=gen)
        rewards_BT, kl_BT = rewards_with_kl(scores_B, lp_BT, ref_BT, mask_BT, 0.05, kind="mse")
        lp2_BT = torch.where(mask_BT.bool(), lp_BT, float("-inf"))
        ref2_BT = _garbage_under(ref_BT, mask_BT, gen)
        rewards2_BT, kl2_BT = rewards_with_kl(scores_B, lp2_BT, ref2_BT, mask_BT, 0.05, kind="mse")
        assert torch.equal(rewards_BT, rewards2_BT) and torch.equal(kl_BT, kl2_BT)
        # Score lands at the last real token, and the row sum is score - coef * sum(kl).
        row_sum_B = rewards_BT.sum(1)
        has_tokens_B = mask_BT.sum(1) > 0
        expected_B = torch.where(has_tokens_B, scores_B, 0.0) - 0.05 * kl_BT.sum(1)
        torch.testing.assert_close(row_sum_B, expected_B)
        last_B = last_token_index(mask_BT)
        for b in range(B):
            if has_tokens_B[b]:
                t = int(last_B[b])
                torch.testing.assert_close(rewards_BT[b, t], scores_B[b] - 0.05 * kl_BT[b, t])


# --------------------------------------------------------------------------- losses


def test_policy_loss_ratio_one():
    adv_BT = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 0.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    lp_BT = torch.randn(2, 3, requires_grad=True)
    loss, stats = policy_loss(lp_BT, lp_BT.detach(), adv_BT, mask_BT)
    torch.testing.assert_close(loss, torch.tensor(-(1.0 - 2.0 + 3.0 + 0.5) / 4))
    assert float(stats["clipfrac"]) == 0.0
    assert float(stats["approxkl"]) == 0.0
    assert float(stats["ratio_mean"]) == 1.0
    loss.backward()
    # d loss / d lp = -adv / n_tokens on real tokens, 0 on padding.
    torch.testing.assert_close(lp_BT.grad, -adv_BT * mask_BT / 4)


def test_policy_loss_clipping_by_hand():
    # cliprange 0.2; per token (ratio, adv) -> max(-adv*r, -adv*clip(r)):
    #   (1.5,  1): max(-1.5, -1.2) = -1.2  clipped term active
    #   (0.5, -1): max( 0.5,  0.8) =  0.8  clipped term active
    #   (1.1,  2): max(-2.2, -2.2) = -2.2  inside the trust region
    #   (1.5, -1): max( 1.5,  1.2) =  1.5  pessimistic, unclipped wins
    # loss = (-1.2 + 0.8 - 2.2 + 1.5) / 4 = -0.275; clipfrac = 2/4
    ratios = [1.5, 0.5, 1.1, 1.5]
    old_BT = torch.tensor([[-1.0, -2.0, -0.5, -3.0, 0.0]])
    lp_BT = old_BT + torch.tensor([[math.log(r) for r in ratios] + [50.0]])  # pad: huge ratio
    adv_BT = torch.tensor([[1.0, -1.0, 2.0, -1.0, 1e6]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(lp_BT, old_BT, adv_BT, mask_BT, cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.275))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in ratios) / 4
    torch.testing.assert_close(stats["approxkl"], torch.tensor(expected_kl))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(sum(ratios) / 4))


def test_policy_loss_invariant_to_garbage_and_finite_grads():
    gen = torch.Generator().manual_seed(7)
    B, T = 6, 9
    mask_BT = _random_mask(B, T, gen)
    lp_BT = torch.randn(B, T, generator=gen) * 0.3
    old_BT = lp_BT + torch.randn(B, T, generator=gen) * 0.3
    adv_BT = torch.randn(B, T, generator=gen)
    loss, stats = policy_loss(lp_BT, old_BT, adv_BT, mask_BT)
    lp2_BT = torch.where(mask_BT.bool(), lp_BT, 1e4).requires_grad_()
    old2_BT = torch.where(mask_BT.bool(), old_BT, float("nan"))
    adv2_BT = _garbage_under(adv_BT, mask_BT, gen)
    loss2, stats2 = policy_loss(lp2_BT, old2_BT, adv2_BT, mask_BT)
    assert torch.equal(loss, loss2)
    for k in ("clipfrac", "approxkl", "ratio_mean"):
        assert torch.equal(stats[k], stats2[k]), k
    loss2.backward()
    assert torch.isfinite(lp2_BT.grad).all()
    assert (lp2_BT.grad[mask_BT == 0] == 0).all()


def test_value_loss_clipping_by_hand():
    # cliprange_value 0.2, old = 1 everywhere:
    #   v=1.5, R=2: v_clip=1.2; (0.5)^2=0.25 vs (0.8)^2=0.64 -> 0.64  clipped wins
    #   v=0.9, R=0: v_clip=0.9; 0.81 vs 0.81                   -> 0.81  equal, not counted
    #   v=2.0, R=1: v_clip=1.2; 1.0 vs 0.04                    -> 1.0
    # loss = 0.5 * (0.64 + 0.81 + 1.0) / 3 = 0.408333...; vf_clipfrac = 1/3
    values_BT = torch.tensor([[1.5, 0.9, 2.0, 123.0]], requires_grad=True)
    old_BT = torch.tensor([[1.0, 1.0, 1.0, -77.0]])
    returns_BT = torch.tensor([[2.0, 0.0, 1.0, float("nan")]])
    mask_BT = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = value_loss(values_BT, old_BT, returns_BT, mask_BT, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 2.45 / 3))
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(1.0 / 3.0))
    loss.backward()
    # clipped branch (token 0) passes no grad; others: (v - R) / 3
    torch.testing.assert_close(values_BT.grad, torch.tensor([[0.0, 0.9 / 3, 1.0 / 3, 0.0]]))


def test_value_loss_invariant_to_garbage():
    gen = torch.Generator().manual_seed(8)
    B, T = 6, 9
    mask_BT = _random_mask(B, T, gen, left=True)
    values_BT = torch.randn(B, T, generator=gen)
    old_BT = values_BT + 0.3 * torch.randn(B, T, generator=gen)
    returns_BT = torch.randn(B, T, generator=gen)
    loss, stats = value_loss(values_BT, old_BT, returns_BT, mask_BT)
    loss2, stats2 = value_loss(
        _garbage_under(values_BT, mask_BT, gen),
        _garbage_under(old_BT, mask_BT, gen),
        torch.where(mask_BT.bool(), returns_BT, float("inf")),
        mask_BT,
    )
    assert torch.equal(loss, loss2)
    assert torch.equal(stats["vf_clipfrac"], stats2["vf_clipfrac"])


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 9: error = 9/6 - 1 = 0.5 -> clipped to 0.2; value *= 1 + 0.2 * 256 / 1e4 = 1.00512
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00512, rel=1e-12)
    # kl 3: error = -0.5 -> -0.2; value *= 1 - 0.2 * 512 / 1e4 = 0.98976
    ctl.update(3.0, n_steps=512)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.98976, rel=1e-12)
    # kl 6.6: error = 0.1 (unclipped); value *= 1 + 0.1 * 1000 / 1e4 = 1.01
    ctl.update(6.6, n_steps=1000)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.98976 * 1.01, rel=1e-12)
    # on target: unchanged
    before = ctl.value
    ctl.update(6.0, n_steps=1000)
    assert ctl.value == pytest.approx(before, rel=1e-12)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=500)
    ctl.update(10.0, 64)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 3.0, 500.0)
    ctl.update(1.0, 32)
    restored.update(1.0, 32)
    assert restored.value == ctl.value

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    fixed2 = FixedKLController(1.0)
    fixed2.load_state_dict(fixed.state_dict())
    assert fixed2.value == 0.05

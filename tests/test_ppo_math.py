"""PPO maths (losses.py, PPO section) against values worked out by hand in each docstring."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrlhf import losses
from chatrlhf.recipes.ppo import explained_variance

T, F = True, False


def test_gae_hand_computed():
    """gamma = 1, lam = 0.5, V = 0.5 everywhere, reward 1 at the end:
    A_2 = 1 - 0.5 = 0.5;  A_1 = (0 + 0.5 - 0.5) + 0.5 * 0.5 = 0.25;  A_0 = 0 + 0.5 * 0.25 = 0.125;
    returns = A + V = [0.625, 0.75, 1.0]."""
    advantages, returns = losses.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5),
                                     torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[0.125, 0.25, 0.5]]))
    assert_close(returns, torch.tensor([[0.625, 0.75, 1.0]]))


def test_gae_stops_at_the_end_of_the_reply():
    """gamma = 0.9, lam = 1, the third token is padding (its 99s must not leak in):
    A_1 = 2 + 0.9 * 0 - 1 = 1;  A_0 = (1 + 0.9 * 1 - 1) + 0.9 * 1 = 1.8;  returns [2.8, 2, 0]."""
    advantages, returns = losses.gae(torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[1.0, 1.0, 99.0]]),
                                     torch.tensor([[T, T, F]]), gamma=0.9, lam=1.0)
    assert_close(advantages, torch.tensor([[1.8, 1.0, 0.0]]))
    assert_close(returns, torch.tensor([[2.8, 2.0, 0.0]]))


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[T] * 5, [T, T, T, F, F], [T, F, F, F, F]])
    _, returns = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
    assert_close(returns, expected)


def test_masked_whiten():
    """[1, 2, 3] (and a masked 100): mean 2, population variance 2/3, so [-1, 0, 1] / sqrt(2/3)."""
    values, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([T, T, T, F])
    s = math.sqrt(2 / 3)
    assert_close(losses.masked_whiten(values, mask), torch.tensor([-1 / s, 0.0, 1 / s, 0.0]))
    assert_close(losses.masked_whiten(values, mask, shift_mean=False),
                 torch.tensor([2 - 1 / s, 2.0, 2 + 1 / s, 0.0]))
    assert_close(losses.masked_mean(torch.tensor([[1.0, 3.0], [5.0, 9.0]]), torch.tensor([[T, T], [T, F]]),
                 dim=1), torch.tensor([2.0, 5.0]))


def test_kl_estimators_hand_computed():
    """p = 0.5, p_ref = 0.25, so log r = log 0.5:
    k1 = log 2 = 0.6931;  k2 = (log 2)^2 / 2 = 0.2402;  k3 = (0.5 - 1) + log 2 = 0.1931."""
    logps, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert_close(losses.kl_penalty(logps, ref, "k1"), torch.tensor([math.log(2)]))
    assert_close(losses.kl_penalty(logps, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    assert_close(losses.kl_penalty(logps, ref, "k3"), torch.tensor([math.log(2) - 0.5]))
    with pytest.raises(ValueError, match="k1"):
        losses.kl_penalty(logps, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    """Their expectation over tokens drawn from pi is KL(pi || pi_ref), computed exactly here."""
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):
        assert_close((p * losses.kl_penalty(p.log(), q.log(), estimator)).sum(), exact)
    assert bool((losses.kl_penalty(p.log(), q.log(), "k3") >= 0).all())


def test_token_rewards():
    """coef 0.5: row 0 = [-0.05, -0.1 + 2, 0 (padding)]; row 1 = [-0.25, -0.25, -0.25 - 1]."""
    rewards = losses.token_rewards(torch.tensor([2.0, -1.0]),
                                   torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]),
                                   torch.tensor([[T, T, F], [T, T, T]]), kl_coef=0.5)
    assert_close(rewards, torch.tensor([[-0.05, 1.9, 0.0], [-0.25, -0.25, -1.25]]))


def test_clipped_policy_loss():
    """clip 0.2. ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5, A = 1:
    max(-0.5, -0.8) = -0.5; ratio 1.1, A = -1: 1.1 either way; ratio 0.5, A = -1:
    max(0.5, 0.8) = 0.8 (clipped)."""
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.5])
    loss, clipped = losses.ppo_policy_loss(ratios.log(), torch.zeros(4), torch.tensor([1.0, 1.0, -1.0, -1.0]),
                                           clip_range=0.2)
    assert_close(loss, torch.tensor([-1.2, -0.5, 1.1, 0.8]))
    assert clipped.tolist() == [T, F, F, T]


def test_policy_loss_gradient_is_zero_when_clipped():
    logps = torch.tensor([math.log(1.5), math.log(1.1)], requires_grad=True)
    loss, _ = losses.ppo_policy_loss(logps, torch.zeros(2), torch.ones(2), clip_range=0.2)
    loss.sum().backward()
    assert_close(logps.grad, torch.tensor([0.0, -1.1]))  # d(-A * rho)/d logp = -A * rho


def test_clipped_value_loss():
    """old V = 0, V = 1, clip 0.2 (so V_clip = 0.2). R = 0.5: max(0.25, 0.09) / 2 = 0.125;
    R = 2: max(1, 3.24) / 2 = 1.62 (clipped)."""
    loss, clipped = losses.ppo_value_loss(torch.ones(2), torch.zeros(2), torch.tensor([0.5, 2.0]), 0.2)
    assert_close(loss, torch.tensor([0.125, 1.62]))
    assert clipped.tolist() == [F, T]
    plain, _ = losses.ppo_value_loss(torch.ones(2), torch.zeros(2), torch.tensor([0.5, 2.0]), None)
    assert_close(plain, torch.tensor([0.125, 0.5]))


def test_entropy_from_logits():
    """Uniform over 4: log 4. p = [1/4, 3/4]: -(0.25 log 0.25 + 0.75 log 0.75) = 0.5623."""
    assert_close(losses.entropy_from_logits(torch.zeros(4)), torch.tensor(math.log(4)))
    assert_close(losses.entropy_from_logits(torch.tensor([0.0, math.log(3)])),
                 torch.tensor(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))


def test_adaptive_kl_controller():
    """beta 0.1, target 6, horizon 100, 10 replies per update. KL 12: error clipped to +0.2,
    beta = 0.1 * 1.02 = 0.102; KL 3: error -0.5 clipped to -0.2, beta = 0.102 * 0.98 = 0.09996;
    KL 6.6: error 0.1, beta = 0.09996 * 1.01."""
    controller = losses.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert controller.update(12.0, 10) == pytest.approx(0.102)
    assert controller.update(3.0, 10) == pytest.approx(0.09996)
    assert controller.update(6.6, 10) == pytest.approx(0.09996 * 1.01)
    fixed = losses.AdaptiveKLController(0.1)
    assert fixed.update(100.0, 10) == 0.1
    with pytest.raises(ValueError, match="target"):
        losses.AdaptiveKLController(0.1, target=-1.0)


def test_running_moments_equal_the_moments_of_everything_seen():
    moments = losses.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert moments.count == 5
    assert moments.mean == pytest.approx(3.0)
    assert moments.std == pytest.approx(math.sqrt(2.0))


def test_explained_variance():
    """returns [1, 2, 3] (mask drops the 4th): V = returns gives 1; V = 2 (the mean) gives 0;
    V = [3, 2, 1]: residual variance 8/3 over variance 2/3, so 1 - 4 = -3."""
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 7.0]]), torch.tensor([[T, T, T, F]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)
    assert explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), returns, mask) == pytest.approx(-3.0)

"""Loss values worked out by hand, and the properties the K-wise loss must have."""

import math

import pytest
import torch
from torch.testing import assert_close

from chatrlhf import losses


def test_bradley_terry_by_hand():
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-2) = log(1 + e^2) = 2.126928
    out = losses.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert_close(out, torch.tensor([0.313262, 2.126928]))


def test_margin_inside_the_sigmoid():
    # d = 1, margin 1: -log sigmoid(0) = log 2
    out = losses.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert_close(out, torch.tensor([math.log(2)]))


def test_kwise_by_hand():
    # K = 3, rewards 2 > 1 > 0 in rank order: pair differences 1, 2, 1.
    # (2 * log(1 + e^-1) + log(1 + e^-2)) / 3 = (0.626523 + 0.126928) / 3 = 0.251150
    out = losses.ranking_loss(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0, 1, 2]), [3])
    assert_close(out, torch.tensor([0.251150]))


def test_kwise_with_k2_equals_pairwise():
    chosen, rejected = torch.randn(5), torch.randn(5)
    rewards = torch.stack([chosen, rejected], dim=1).flatten()
    ranks = torch.tensor([0, 1] * 5)
    margins = torch.rand(5)
    assert_close(losses.ranking_loss(rewards, ranks, [2] * 5),
                 losses.bradley_terry_loss(chosen, rejected))
    assert_close(losses.ranking_loss(rewards, ranks, [2] * 5, margins),
                 losses.bradley_terry_loss(chosen, rejected, margins))


def test_kwise_does_not_depend_on_reply_order():
    rewards, ranks = torch.randn(9), torch.tensor([2, 0, 1, 3, 0, 1, 1, 2, 3])
    sizes = [4, 5]
    base = losses.ranking_loss(rewards, ranks, sizes, tie_nu=0.5)
    perm = torch.cat([torch.tensor([3, 1, 0, 2]), 4 + torch.tensor([4, 2, 0, 3, 1])])
    assert_close(losses.ranking_loss(rewards[perm], ranks[perm], sizes, tie_nu=0.5), base)


def test_each_group_weighs_the_same():
    # A K = 4 group (6 pairs) and a K = 2 group: the loss is per group, not per pair.
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = losses.ranking_loss(rewards, torch.tensor([0, 1, 2, 3, 0, 1]), [4, 2])
    assert_close(out, torch.full((2,), math.log(2)))


def test_gradient_flows_to_every_reply_once():
    rewards = torch.tensor([0.5, 0.0, -0.5], requires_grad=True)
    losses.ranking_loss(rewards, torch.tensor([0, 1, 2]), [3]).sum().backward()
    assert rewards.grad[0] < 0 < rewards.grad[2]  # the best is pushed up, the worst down


def test_davidson_tie_by_hand():
    # d = 0, nu = 1: P(win) = P(tie) = P(loss) = 1/3.
    log_win, log_tie = losses.davidson_log_probs(torch.tensor([0.0]), 1.0)
    assert_close(log_win.exp(), torch.tensor([1 / 3]))
    assert_close(log_tie.exp(), torch.tensor([1 / 3]))
    tie = losses.ranking_loss(torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), [2], tie_nu=1.0)
    assert_close(tie, torch.tensor([math.log(3)]))


def test_davidson_with_nu_zero_is_bradley_terry():
    d = torch.linspace(-3, 3, 7)
    log_win, _ = losses.davidson_log_probs(d, 0.0)
    assert_close(log_win, torch.nn.functional.logsigmoid(d))


def test_tie_loss_pulls_rewards_together():
    rewards = torch.tensor([1.0, -1.0], requires_grad=True)
    losses.ranking_loss(rewards, torch.tensor([0, 0]), [2], tie_nu=1.0).sum().backward()
    assert rewards.grad[0] > 0 > rewards.grad[1]


def test_ties_need_a_tie_model():
    with pytest.raises(ValueError, match="ties"):
        losses.ranking_loss(torch.zeros(2), torch.tensor([0, 0]), [2])


def test_regression_and_centering():
    assert_close(losses.score_regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0])),
                 torch.tensor([1.0, 9.0]))
    # Per pair (r_w + r_l)^2, as arXiv 2312.09244 and TRL: (2 - 1)^2 = 1. (The earlier per-reply
    # r^2 gave 0.5 here and pulled the margin 2 - (-1) towards 0 too.)
    assert_close(losses.centering_loss(torch.tensor([2.0, -1.0]), [2], 0.1), torch.tensor([0.1]))
    # A ranking of 3: the mean over its 3 pairs, ((1 + 0)^2 + (1 - 1)^2 + (0 - 1)^2) / 3 = 2/3;
    # a shift of every reward by the same constant c changes it, the margins not.
    assert_close(losses.centering_loss(torch.tensor([1.0, 0.0, -1.0, 3.0, 3.0]), [3, 2], 1.0),
                 torch.tensor([2 / 3, 36.0]))
    shifted = torch.tensor([5.0, -5.0])
    assert_close(losses.centering_loss(shifted, [2], 1.0), torch.tensor([0.0]), msg="centred pairs cost nothing")


def test_a_learned_tie_parameter_gets_the_gradient_of_its_float_value():
    rewards, ranks = torch.tensor([0.3, -0.2, 0.5, 0.5]), torch.tensor([0, 1, 0, 0])
    log_nu = torch.tensor(math.log(0.7), requires_grad=True)
    learned = losses.ranking_loss(rewards, ranks, [2, 2], tie_nu=log_nu.exp())
    assert_close(learned, losses.ranking_loss(rewards, ranks, [2, 2], tie_nu=0.7))
    learned.sum().backward()
    assert log_nu.grad is not None and log_nu.grad != 0


@pytest.mark.parametrize("tie_rate", [0.2, 0.5])
def test_a_learned_tie_parameter_goes_to_the_tie_rate(tie_rate):
    # With equal rewards P(tie) = nu / (2 + nu); its maximum likelihood is the observed tie rate
    # t, at nu = 2t / (1 - t): 0.5 for t = 0.2, 2 for t = 0.5.
    n, ties = 20, int(20 * tie_rate)
    ranks = torch.tensor([r for i in range(n) for r in ([0, 0] if i < ties else [0, 1])])
    log_nu = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([log_nu], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        losses.ranking_loss(torch.zeros(2 * n), ranks, [2] * n, tie_nu=log_nu.exp()).mean().backward()
        optimizer.step()
    assert log_nu.exp().item() == pytest.approx(2 * tie_rate / (1 - tie_rate), rel=0.02)

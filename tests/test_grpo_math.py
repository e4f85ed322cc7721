"""The critic-free RL maths of losses.py against values worked out by hand: group advantages (GRPO,
Dr. GRPO, RLOO, REINFORCE++) for K = 2 and 4, with ties and with all-equal groups; the clipped
policy-gradient loss with its KL term; and the token weighting of each algorithm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrlhf import losses

EPS = 1e-4  # group_advantages' default


def test_grpo_advantages_k2_and_k4():
    # K = 2: [1, 3] -> mean 2, sample std sqrt(2); [5, 5] -> all equal, 0.
    got = losses.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    s = math.sqrt(2) + EPS
    assert_close(got, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    # K = 4: [0, 0, 1, 3] (a tie at 0) -> mean 1, sample std sqrt((1 + 1 + 0 + 4) / 3) = sqrt(2).
    got = losses.group_advantages(torch.tensor([0.0, 0.0, 1.0, 3.0]), 4)
    assert_close(got, torch.tensor([-1.0, -1.0, 0.0, 2.0]) / s)
    assert got[0] == got[1]  # tied rewards, tied advantages


def test_dr_grpo_advantages_do_not_divide_by_the_std():
    got = losses.group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0]), 2, scale=False)
    assert_close(got, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    got = losses.group_advantages(torch.tensor([0.0, 0.0, 1.0, 3.0]), 4, scale=False)
    assert_close(got, torch.tensor([-1.0, -1.0, 0.0, 2.0]))


def test_rloo_advantages_leave_one_out():
    # K = 4, [1, 2, 3, 6]: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3.
    got = losses.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4)
    assert_close(got, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    # K = 2: each reply's baseline is the other one; ties and all-equal groups give 0.
    got = losses.rloo_advantages(torch.tensor([1.0, 4.0, 2.0, 2.0]), 2)
    assert_close(got, torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    # = K / (K - 1) x Dr. GRPO's
    rewards = torch.randn(12)
    assert_close(got := losses.rloo_advantages(rewards, 4), 4 / 3 * losses.group_advantages(rewards, 4, scale=False))
    assert_close(got.view(-1, 4).sum(-1), torch.zeros(3), atol=1e-6, rtol=0)


def test_all_equal_groups_give_no_signal():
    rewards = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 1.0, 1.0])
    assert losses.zero_signal_groups(rewards, 4).tolist() == [True, False]
    assert losses.zero_signal_groups(rewards, 2).tolist() == [True, True, False, True]
    for advantages in (losses.group_advantages(rewards, 4), losses.group_advantages(rewards, 4, scale=False),
                       losses.rloo_advantages(rewards, 4)):
        assert advantages[:4].tolist() == [0.0] * 4


def test_reinforce_pp_advantages_are_whitened_returns_to_go():
    # Two replies of 2 and 3 tokens; scores 1 and 0; per-token KL all 0.5; beta 0.2 -> r_t = -0.1 + score on last.
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.full((2, 3), 0.5) * mask
    got = losses.reinforce_pp_advantages(scores, kl, mask, 0.2)
    returns = torch.tensor([0.8, 0.9, -0.3, -0.2, -0.1])  # sum of the rewards from t on, the real tokens
    whitened = (returns - returns.mean()) / returns.std(unbiased=False)
    assert_close(got[mask], whitened, atol=1e-4, rtol=1e-4)
    assert got[0, 2] == 0
    # Without KL, every token of a reply carries its (batch-normalised) score.
    got = losses.reinforce_pp_advantages(scores, torch.zeros(2, 3), mask, 0.2)
    assert got[0, 0] == got[0, 1] > 0 > got[1, 0] == got[1, 2]


def test_clipped_pg_loss_and_its_kl_term():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5]])  # ratios 1 and e^0.5 = 1.65 (clipped to 1.2 for A > 0)
    per_token, clipped = losses.clipped_pg_loss(logps, old, torch.tensor([2.0]), 0.2)
    assert_close(per_token, torch.tensor([[-2.0, -2.4]]))
    assert clipped.tolist() == [[False, True]]
    # The KL term: beta * k3 with log r = ref - logp.
    reference = torch.tensor([[-1.5, -2.0]])
    with_kl, _ = losses.clipped_pg_loss(logps, old, torch.tensor([2.0]), 0.2, reference, 0.1, "k3")
    k3 = math.exp(-0.5) - 1 + 0.5
    assert_close(with_kl, torch.tensor([[-2.0 + 0.1 * k3, -2.4]]))
    # beta = 0 or no reference: no KL term.
    assert_close(losses.clipped_pg_loss(logps, old, torch.tensor([2.0]), 0.2, reference, 0.0)[0], per_token)
    # old = logps.detach(): ratio 1 and the gradient is REINFORCE's, -A per token.
    per_token, _ = losses.clipped_pg_loss(logps, logps.detach(), torch.tensor([[2.0, -1.0]]), 0.2)
    per_token.sum().backward()
    assert_close(logps.grad, torch.tensor([[-2.0, 1.0]]))


def test_token_weighting_of_each_algorithm():
    """Replies of 1 and 3 tokens, losses [[3], [1, 1, 1]] (the docstring's example)."""
    per_token = torch.tensor([[3.0, 9.0, 9.0], [1.0, 1.0, 1.0]])  # 9s are padding
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert losses.aggregate_token_loss(per_token, mask, "sequence_mean").item() == pytest.approx(2.0)  # GRPO
    assert losses.aggregate_token_loss(per_token, mask, "token_mean").item() == pytest.approx(1.5)  # RLOO, REINFORCE++
    assert losses.aggregate_token_loss(per_token, mask, "constant", max_tokens=4).item() == pytest.approx(0.75)  # Dr. GRPO
    with pytest.raises(ValueError, match="max_tokens"):
        losses.aggregate_token_loss(per_token, mask, "constant")
    with pytest.raises(ValueError, match="unknown"):
        losses.aggregate_token_loss(per_token, mask, "mean")


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "constant"])
def test_micro_batches_add_up_to_the_whole_batch(mode):
    """Given the whole batch's counts, the losses of its parts sum to the loss of the whole."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = torch.arange(5) < torch.tensor([[1], [5], [3], [2], [4], [5]])
    whole = losses.aggregate_token_loss(per_token, mask, mode, max_tokens=5)
    parts = sum(losses.aggregate_token_loss(per_token[rows], mask[rows], mode, max_tokens=5, num_sequences=6,
                                            num_tokens=int(mask.sum())) for rows in (slice(0, 2), slice(2, 6)))
    assert_close(parts, whole)


def test_gradient_weighting_favours_short_replies_only_in_grpo():
    """GRPO's per-reply mean gives each token of a 1-token reply 3x the weight of a 3-token
    reply's token; token_mean and constant weigh every token alike (Dr. GRPO's length-bias fix)."""
    mask = torch.tensor([[True, False, False], [True, True, True]])
    weights = {}
    for mode in ("sequence_mean", "token_mean", "constant"):
        logps = torch.zeros(2, 3, requires_grad=True)
        per_token, _ = losses.clipped_pg_loss(logps, logps.detach(), torch.tensor([1.0, 1.0]))
        losses.aggregate_token_loss(per_token, mask, mode, max_tokens=3).backward()
        weights[mode] = logps.grad[mask]
    assert_close(weights["sequence_mean"], torch.tensor([-0.5, -1 / 6, -1 / 6, -1 / 6]))
    assert_close(weights["token_mean"], torch.full((4,), -0.25))
    assert_close(weights["constant"], torch.full((4,), -1 / 6))

"""Reward-model losses: pure functions, tensors in, per-example losses out.

Everything a reward model learns from is a *group*: a prompt with K >= 1 replies. A comparison
pair is a group of K = 2 with ranks [0, 1] (or [0, 0] for a tie); a K-wise ranking is one group;
a scored sample for regression is a group of K = 1. Replies are scored once per group and all
C(K, 2) pairs are formed from those K rewards, so the cost grows with K, not K^2.

Ties use the Davidson (1970) extension of Bradley-Terry. With d = r_i - r_j and tie parameter
nu >= 0:
    P(i > j) = e^{d/2} / (e^{d/2} + e^{-d/2} + nu),   P(tie) = nu / (e^{d/2} + e^{-d/2} + nu).
With nu = 0 this is exactly Bradley-Terry, P(i > j) = sigmoid(d), and ties have probability 0.
Davidson was chosen over Rao-Kupper because a tie's likelihood peaks at d = 0 for any nu, so a
tie pulls the two rewards together, and nu = 0 gives back the plain pairwise loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise loss -log sigmoid(r_chosen - r_rejected - margin).

    Args:
        chosen_rewards, rejected_rewards: (N,) rewards of the preferred and the other reply.
        margin: optional (N,) non-negative margins from the data (Llama 2, arXiv 2307.09288,
            eq. 2): the chosen reward must beat the rejected one by at least this much.
    Returns:
        (N,) per-pair losses.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def davidson_log_probs(diff: torch.Tensor, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(i beats j) and log P(tie) under the Davidson model, for d = r_i - r_j.

    Args:
        diff: (...) reward differences r_i - r_j.
        nu: tie parameter >= 0; nu = 0 is Bradley-Terry (log P(tie) = -inf).
    """
    half = diff / 2
    terms = [half, -half]
    if nu > 0:
        terms.append(torch.full_like(diff, math.log(nu)))
    log_norm = torch.logsumexp(torch.stack(terms), dim=0)
    log_tie = (math.log(nu) if nu > 0 else -math.inf) - log_norm
    return half - log_norm, log_tie


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, group_sizes: list[int],
                 margins: torch.Tensor | None = None, tie_nu: float = 0.0) -> torch.Tensor:
    """K-wise ranking loss of InstructGPT (arXiv 2203.02155, eq. 1), with margins and ties.

    For a group of K replies, every unordered pair {i, j} contributes -log P(observed outcome):
    -log P(i beats j) when rank_i < rank_j (0 is best), -log P(tie) when the ranks are equal
    (Davidson, see the module docstring). The group's loss is the mean over its C(K, 2) pairs,
    so every prompt weighs the same whatever its K.

    Args:
        rewards: (sum K,) one reward per reply, groups laid out one after another.
        ranks: (sum K,) rank of each reply within its group, 0 = best, equal = tie.
        group_sizes: K of each group, each >= 2.
        margins: optional (G,) margin per group, subtracted from d on every strict pair.
        tie_nu: Davidson tie parameter; must be > 0 if any group has a tie.
    Returns:
        (G,) per-group losses.
    """
    if min(group_sizes) < 2:
        raise ValueError(f"ranking_loss needs groups of at least 2 replies, got sizes {group_sizes}")
    # Pad groups into a (G, Kmax) grid so all pairs of all groups are one tensor operation.
    sizes = torch.tensor(group_sizes, device=rewards.device)
    k_max = int(sizes.max())
    valid = torch.arange(k_max, device=rewards.device)[None, :] < sizes[:, None]
    grid_rewards = rewards.new_zeros(valid.shape).masked_scatter(valid, rewards)
    grid_ranks = ranks.new_zeros(valid.shape).masked_scatter(valid, ranks)
    diff = grid_rewards[:, :, None] - grid_rewards[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    wins = both & (grid_ranks[:, :, None] < grid_ranks[:, None, :])
    upper = torch.ones(k_max, k_max, dtype=torch.bool, device=rewards.device).triu(1)
    ties = both & (grid_ranks[:, :, None] == grid_ranks[:, None, :]) & upper
    if margins is not None:
        diff = diff - margins[:, None, None] * wins
    log_win, log_tie = davidson_log_probs(diff, tie_nu)
    if bool(ties.any()) and tie_nu <= 0:
        raise ValueError("the data has ties: model them with tie_nu > 0 or drop them")
    zero = torch.zeros_like(diff)
    pair_losses = -torch.where(wins, log_win, zero) - torch.where(ties, log_tie, zero)
    num_pairs = sizes * (sizes - 1) / 2
    return pair_losses.sum(dim=(1, 2)) / num_pairs


def score_regression_loss(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Absolute-score regression, the legacy approach: (r - score)^2, shape (N,)."""
    return (rewards - scores) ** 2


def centering_loss(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Reward centering: coefficient * r^2 per reply, keeping rewards near zero.

    The auxiliary term of Eisenstein et al. (arXiv 2312.09244); rewards are only defined up to
    a constant by comparisons, and this fixes the constant at 0.
    """
    return coefficient * rewards**2

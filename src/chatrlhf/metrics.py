"""Reward-model metrics computed from rewards and human ranks, apart from the losses.

Inputs are per-group lists: ``rewards[g]`` and ``ranks[g]`` for the K replies of group g
(rank 0 = best, equal ranks = a human tie).
"""

from __future__ import annotations

import math


def pairwise_outcomes(rewards: list[float], ranks: list[int]) -> tuple[int, int, int]:
    """(correct, wrong, human_ties) over all pairs of one group.

    A pair is correct when the reward orders it as the human did; an equal reward on a strict
    human preference counts as half right and half wrong (as a coin flip would be).
    """
    correct = wrong = ties = 0
    for i in range(len(rewards)):
        for j in range(i + 1, len(rewards)):
            if ranks[i] == ranks[j]:
                ties += 1
                continue
            better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
            if rewards[better] > rewards[worse]:
                correct += 2
            elif rewards[better] < rewards[worse]:
                wrong += 2
            else:
                correct, wrong = correct + 1, wrong + 1
    return correct, wrong, ties


def pairwise_accuracy(rewards: list[list[float]], ranks: list[list[int]]) -> float:
    """Fraction of strictly ordered human pairs that the rewards order the same way."""
    correct = total = 0
    for group_rewards, group_ranks in zip(rewards, ranks):
        c, w, _ = pairwise_outcomes(group_rewards, group_ranks)
        correct, total = correct + c, total + c + w
    return correct / total if total else math.nan


def best_vs_worst_accuracy(rewards: list[list[float]], ranks: list[list[int]]) -> float:
    """Fraction of groups where a best-ranked reply out-scores a worst-ranked one.

    With several replies sharing the best (or worst) rank, their mean reward is compared.
    Groups whose replies are all tied are left out.
    """
    hits = total = 0
    for group_rewards, group_ranks in zip(rewards, ranks):
        best, worst = min(group_ranks), max(group_ranks)
        if best == worst:
            continue
        top = [r for r, k in zip(group_rewards, group_ranks) if k == best]
        bottom = [r for r, k in zip(group_rewards, group_ranks) if k == worst]
        gap = sum(top) / len(top) - sum(bottom) / len(bottom)
        hits += 1.0 if gap > 0 else 0.5 if gap == 0 else 0.0
        total += 1
    return hits / total if total else math.nan


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b between two sequences (ties in either handled as scipy does).

    tau_b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)), n0 = C(n, 2).
    Returns nan when either sequence is constant.
    """
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x, ties_y = ties_x + 1, ties_y + 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) / 2
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (concordant - discordant) / denominator if denominator else math.nan


def mean_kendall_tau(rewards: list[list[float]], ranks: list[list[int]]) -> float:
    """Mean over groups with K >= 3 of Kendall's tau between rewards and human order.

    Ranks are negated so that agreeing with the human order gives +1. Groups where tau is
    undefined (all replies tied by the human) are left out.
    """
    taus = [kendall_tau(r, [-k for k in ks]) for r, ks in zip(rewards, ranks) if len(r) >= 3]
    taus = [t for t in taus if not math.isnan(t)]
    return sum(taus) / len(taus) if taus else math.nan


def summarize(rewards: list[list[float]], ranks: list[list[int]]) -> dict:
    """The metrics `reward eval` prints: accuracy always, ranking metrics when some K > 2."""
    correct = wrong = ties = 0
    for group_rewards, group_ranks in zip(rewards, ranks):
        c, w, t = pairwise_outcomes(group_rewards, group_ranks)
        correct, wrong, ties = correct + c, wrong + w, ties + t
    out = {
        "groups": len(rewards),
        "pairs": (correct + wrong) // 2,
        "human_ties": ties,
        "accuracy": correct / (correct + wrong) if correct + wrong else math.nan,
    }
    if any(len(r) > 2 for r in rewards):
        out["best_vs_worst_accuracy"] = best_vs_worst_accuracy(rewards, ranks)
        out["mean_kendall_tau"] = mean_kendall_tau(rewards, ranks)
    return out

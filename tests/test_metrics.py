"""Metrics against hand-computed values and scipy."""

import math
import random

import pytest
from scipy.stats import kendalltau

from chatrlhf import metrics


def test_pairwise_accuracy_by_hand():
    # Group 1: ranks 0 < 1 < 2, rewards order 2 of the 3 pairs right (1 > 0.5 wrong only for (1, 2)).
    rewards = [[3.0, 1.0, 2.0], [0.0, 1.0]]
    ranks = [[0, 1, 2], [0, 1]]
    assert metrics.pairwise_accuracy(rewards, ranks) == pytest.approx(2 / 4)


def test_equal_rewards_count_half_and_ties_are_left_out():
    assert metrics.pairwise_accuracy([[1.0, 1.0]], [[0, 1]]) == 0.5
    summary = metrics.summarize([[1.0, 0.0], [5.0, 1.0]], [[0, 0], [0, 1]])
    assert summary["human_ties"] == 1 and summary["pairs"] == 1 and summary["accuracy"] == 1.0


def test_best_vs_worst():
    rewards = [[1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [1.0, 1.0]]
    ranks = [[0, 1, 2], [0, 1, 2], [0, 0]]
    assert metrics.best_vs_worst_accuracy(rewards, ranks) == 0.5


def test_kendall_tau_matches_scipy():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(3, 9)
        x = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(n)]
        y = [rng.randint(0, 3) for _ in range(n)]
        expected = kendalltau(x, y).statistic
        got = metrics.kendall_tau(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_mean_kendall_tau_agrees_with_human_order():
    assert metrics.mean_kendall_tau([[3.0, 2.0, 1.0]], [[0, 1, 2]]) == pytest.approx(1.0)
    assert metrics.mean_kendall_tau([[1.0, 2.0, 3.0]], [[0, 1, 2]]) == pytest.approx(-1.0)

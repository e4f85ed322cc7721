"""Conversions between scores, rankings and pairs, with hand-worked expected values."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from chatrlhf.data import (Pair, Ranking, ScoredSample, pairs_to_rankings, rankings_to_pairs,
                           scores_to_pairs, scores_to_rankings)


def test_scores_to_pairs_threshold_and_margin():
    samples = [ScoredSample("p", "a", 3.0), ScoredSample("p", "b", 1.0),
               ScoredSample("p", "c", 2.5), ScoredSample("q", "d", 1.0)]
    notes = Counter()
    pairs = scores_to_pairs(samples, threshold=0.5, notes=notes)
    # a-b differ by 2, b-c by 1.5, a-c by 0.5 (not more than the threshold); q has one reply.
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("a", "b", 2.0), ("c", "b", 1.5)]
    assert notes == {"pairs within threshold 0.5 not made": 1}


def test_rankings_to_pairs_gives_all_k_choose_2_with_ties():
    pairs = rankings_to_pairs([Ranking("p", ["a", "b", "c"], [1, 0, 1])])
    assert [(p.chosen, p.rejected, p.margin, p.tie) for p in pairs] == [
        ("b", "a", 1.0, False), ("a", "c", None, True), ("b", "c", 1.0, False)]


def test_scores_to_rankings_shares_ranks_on_equal_scores():
    samples = [ScoredSample("p", "a", 2.0), ScoredSample("p", "b", 5.0),
               ScoredSample("p", "c", 2.0), ScoredSample("q", "d", 1.0)]
    notes = Counter()
    [ranking] = scores_to_rankings(samples, notes)
    assert ranking.ranks == [1, 0, 1]
    assert notes == {"prompts with one reply left out": 1}


def test_pairs_to_rankings_orders_chains_and_counts_cycles():
    chain = [Pair("p", "a", "b"), Pair("p", "b", "c"), Pair("p", "b", "d")]
    [ranking] = pairs_to_rankings(chain)
    assert dict(zip(ranking.replies, ranking.ranks)) == {"a": 0, "b": 1, "c": 2, "d": 2}
    assert ranking.meta["inconsistent_pairs"] == 0

    cycle = [Pair("q", "a", "b"), Pair("q", "b", "c"), Pair("q", "c", "a"), Pair("q", "c", "d")]
    notes = Counter()
    [ranking] = pairs_to_rankings(cycle, notes)
    assert dict(zip(ranking.replies, ranking.ranks)) == {"a": 0, "b": 0, "c": 0, "d": 1}
    assert notes["pairs contradicted by the ranking"] == 3


def test_pairs_to_rankings_splits_unconnected_replies_and_keeps_ties():
    pairs = [Pair("p", "a", "b"), Pair("p", "x", "y", tie=True)]
    first, second = pairs_to_rankings(pairs)
    assert (first.replies, first.ranks) == (["a", "b"], [0, 1])
    assert (second.replies, second.ranks) == (["x", "y"], [0, 0])


@given(st.lists(st.integers(0, 3), min_size=2, max_size=6))
def test_rankings_round_trip_through_pairs(ranks):
    # A ranking is a consistent set of pairs: expanding it and ranking the pairs gives it back.
    replies = [f"r{i}" for i in range(len(ranks))]
    levels = sorted(set(ranks))
    original = Ranking("p", replies, [levels.index(r) for r in ranks])
    [again] = pairs_to_rankings(rankings_to_pairs([original]))
    assert dict(zip(again.replies, again.ranks)) == dict(zip(replies, original.ranks))
    assert again.meta["inconsistent_pairs"] == 0

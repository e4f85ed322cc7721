"""Turn one kind of human judgement into another: scores and rankings into pairs, and back.

Each function groups records by prompt (``prompt_key``), keeps the order in which prompts and
replies first appear, and counts what it cannot use in an optional ``notes`` Counter, the same
way readers do, so that a conversion never loses data without saying so.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

from chatrlhf.data.records import Pair, Prompt, Ranking, ScoredSample, prompt_key


def _by_prompt(records) -> dict[str, list]:
    groups: dict[str, list] = defaultdict(list)
    for record in records:
        groups[prompt_key(record.prompt)].append(record)
    return groups


def scores_to_pairs(samples: list[ScoredSample], threshold: float = 0.0,
                    notes: Counter | None = None) -> list[Pair]:
    """Every pair of replies to the same prompt whose scores differ by more than ``threshold``.

    The higher-scored reply is chosen and ``margin`` is the score difference. Pairs within the
    threshold and pairs of identical reply texts are not made (counted in ``notes``).
    """
    notes = Counter() if notes is None else notes
    pairs = []
    for group in _by_prompt(samples).values():
        for a, b in combinations(group, 2):
            high, low = (a, b) if a.score >= b.score else (b, a)
            if high.reply == low.reply:
                notes["same reply twice, not paired"] += 1
            elif high.score - low.score <= threshold:
                notes[f"pairs within threshold {threshold} not made"] += 1
            else:
                pairs.append(Pair(high.prompt, high.reply, low.reply,
                                  margin=high.score - low.score,
                                  meta={"chosen_score": high.score, "rejected_score": low.score}))
    return pairs


def rankings_to_pairs(rankings: list[Ranking]) -> list[Pair]:
    """All K*(K-1)/2 pairs of each ranking; ``margin`` = rank difference, equal ranks -> ties.

    This is how InstructGPT (arXiv 2203.02155, sec. 3.5) expands a K-wise ranking into pairs.
    """
    pairs = []
    for ranking in rankings:
        for i, j in combinations(range(len(ranking.replies)), 2):
            rank_i, rank_j = ranking.ranks[i], ranking.ranks[j]
            if rank_i == rank_j:
                pairs.append(Pair(ranking.prompt, ranking.replies[i], ranking.replies[j],
                                  tie=True, meta=dict(ranking.meta)))
                continue
            best, worst = (i, j) if rank_i < rank_j else (j, i)
            pairs.append(Pair(ranking.prompt, ranking.replies[best], ranking.replies[worst],
                              margin=float(abs(rank_i - rank_j)), meta=dict(ranking.meta)))
    return pairs


def scores_to_rankings(samples: list[ScoredSample], notes: Counter | None = None) -> list[Ranking]:
    """One ranking per prompt: replies ordered by score, best first; equal scores share a rank.

    Ranks are dense (0, 1, 2, ...). Prompts with a single reply cannot be ranked (``notes``).
    """
    notes = Counter() if notes is None else notes
    rankings = []
    for group in _by_prompt(samples).values():
        if len(group) < 2:
            notes["prompts with one reply left out"] += 1
            continue
        rankings.append(_ranking(group[0].prompt, [s.reply for s in group],
                                 [s.score for s in group], {"scores": [s.score for s in group]}))
    return rankings


def pairs_to_rankings(pairs: list[Pair], notes: Counter | None = None) -> list[Ranking]:
    """Rankings that agree with the pairs of each prompt wherever the pairs agree with each other.

    The pairs form a graph, chosen -> rejected (a tie links both ways). Replies in a preference
    cycle (A > B > C > A, or A > B with A ~ B) cannot be ordered and share a rank; the strict pairs
    inside such a cycle are the ones the ranking contradicts, counted in
    ``meta["inconsistent_pairs"]`` and ``notes["pairs contradicted by the ranking"]``. Otherwise
    a reply's rank is the length of the longest chain of preferences above it, so every
    non-contradicted pair keeps its order. Replies never compared, directly or through others,
    are not ranked against each other: each connected group of replies gives its own ranking.
    """
    notes = Counter() if notes is None else notes
    rankings = []
    for group in _by_prompt(pairs).values():
        for component in _connected(group):
            replies = list(dict.fromkeys(r for p in component for r in (p.chosen, p.rejected)))
            if len(replies) < 2:  # only pairs of a reply with itself: nothing to rank
                notes["pairs of identical replies left out"] += len(component)
                continue
            below = {r: set() for r in replies}  # reply -> replies it beats (or ties with)
            for pair in component:
                below[pair.chosen].add(pair.rejected)
                if pair.tie:
                    below[pair.rejected].add(pair.chosen)
            reach = {r: _reachable(r, below) for r in replies}
            cycle = {r: frozenset(x for x in reach[r] if r in reach[x]) | {r} for r in replies}
            level: dict[frozenset, int] = {}

            def depth(members: frozenset) -> int:
                # Longest chain of strictly better groups above this one (the groups form a DAG).
                if members not in level:
                    above = {cycle[r] for r in replies if members & below[r]} - {members}
                    level[members] = 1 + max(map(depth, above)) if above else 0
                return level[members]

            levels = [depth(cycle[r]) for r in replies]
            contradicted = sum(not p.tie and cycle[p.chosen] == cycle[p.rejected]
                               for p in component)
            notes["pairs contradicted by the ranking"] += contradicted
            ranking = _ranking(component[0].prompt, replies, [-x for x in levels], {})
            ranking.meta["inconsistent_pairs"] = contradicted
            rankings.append(ranking)
    return rankings


def _connected(pairs: list[Pair]) -> list[list[Pair]]:
    """The pairs split into groups that share no reply, directly or through other pairs."""
    parent: dict[str, str] = {}

    def root(reply: str) -> str:
        while parent.setdefault(reply, reply) != reply:
            reply = parent[reply]
        return reply

    for pair in pairs:
        parent[root(pair.chosen)] = root(pair.rejected)
    groups: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        groups[root(pair.chosen)].append(pair)
    return list(groups.values())


def _reachable(start: str, below: dict[str, set]) -> set:
    seen, stack = set(), [start]
    while stack:
        for nxt in below[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _ranking(prompt: Prompt, replies: list[str], scores: list[float], meta: dict) -> Ranking:
    """A ranking from scores, higher is better: dense ranks, 0 for the best."""
    levels = sorted(set(scores), reverse=True)
    return Ranking(prompt, replies, [levels.index(s) for s in scores], meta)

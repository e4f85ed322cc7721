"""Reward-model metrics computed from rewards and human ranks, apart from the losses.

Inputs are per-group lists: ``rewards[g]`` and ``ranks[g]`` for the K replies of group g
(rank 0 = best, equal ranks = a human tie). Correlations come from ``scipy.stats``; numpy and
scipy are imported inside the functions that use them, as building the command line imports
this module and should stay quick.
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
    """Kendall's tau-b between two sequences (``scipy.stats.kendalltau``: ties in either count
    as neither concordant nor discordant and shrink the denominator).

    tau_b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)), n0 = C(n, 2).
    Returns nan when either sequence is constant or shorter than 2.
    """
    from scipy.stats import kendalltau

    if len(x) < 2 or _constant(x) or _constant(y):  # undefined: nan without scipy's warning
        return math.nan
    return float(kendalltau(x, y).statistic)


def _constant(values: list[float]) -> bool:
    return all(v == values[0] for v in values)


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


# ---- intervals, calibration, length bias (used by `reward eval --report` and `reward compare`) ----


def bootstrap_interval(values: list[float], weights: list[float] | None = None,
                       resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a weighted mean, resampling items with replacement.

    The statistic is sum(values) / sum(weights) over a resample (a plain mean without weights),
    which covers every group metric here: accuracy is (correct pairs) / (pairs) summed over
    groups, so a group is the item resampled and its pairs stay together. Same seed, same
    items: same interval.

    Args:
        values: (n,) per-item numerators, e.g. correct pairs of each group.
        weights: (n,) per-item denominators, e.g. ordered pairs of each group; default all 1.
        resamples: bootstrap resamples; confidence: e.g. 0.95 for a 95% interval.
    Returns:
        (low, high), or (nan, nan) without items.
    """
    import numpy as np

    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    statistics = []
    for start in range(0, resamples, 256):  # chunks keep the (resamples, n) counts small
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(256, resamples - start))
        with np.errstate(invalid="ignore", divide="ignore"):
            statistics.append((counts @ values) / (counts @ weights))
    statistics = np.concatenate(statistics)
    statistics = statistics[~np.isnan(statistics)]  # a resample with no weight at all
    alpha = (1 - confidence) / 2
    return float(np.quantile(statistics, alpha)), float(np.quantile(statistics, 1 - alpha))


def group_metric_intervals(rewards: list[list[float]], ranks: list[list[int]], resamples: int = 2000,
                           confidence: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap intervals (groups resampled, fixed seed) of the metrics ``summarize`` gives.

    Keys ``accuracy`` and, when some K > 2, ``best_vs_worst_accuracy`` and ``mean_kendall_tau``;
    each maps to [low, high]. The point estimates are those of ``summarize``.
    """
    correct, total, hits, taus = [], [], [], []
    for group_rewards, group_ranks in zip(rewards, ranks):
        c, w, _ = pairwise_outcomes(group_rewards, group_ranks)
        correct.append(c)
        total.append(c + w)
        hit = best_vs_worst_accuracy([group_rewards], [group_ranks])
        if not math.isnan(hit):
            hits.append(hit)
        if len(group_rewards) >= 3:
            tau = kendall_tau(group_rewards, [-k for k in group_ranks])
            if not math.isnan(tau):
                taus.append(tau)
    out = {"accuracy": list(bootstrap_interval(correct, total, resamples, confidence, seed))}
    if any(len(r) > 2 for r in rewards):
        out["best_vs_worst_accuracy"] = list(bootstrap_interval(hits, None, resamples, confidence, seed))
        out["mean_kendall_tau"] = list(bootstrap_interval(taus, None, resamples, confidence, seed))
    return out


def ordered_margins(rewards: list[list[float]], ranks: list[list[int]]) -> tuple[list[float], list[float]]:
    """Reward differences over all pairs of all groups: (r_better - r_worse for each strictly
    ordered human pair, |r_a - r_b| for each human tie)."""
    strict, tied = [], []
    for group_rewards, group_ranks in zip(rewards, ranks):
        for i in range(len(group_rewards)):
            for j in range(i + 1, len(group_rewards)):
                difference = group_rewards[i] - group_rewards[j]
                if group_ranks[i] == group_ranks[j]:
                    tied.append(abs(difference))
                else:
                    strict.append(difference if group_ranks[i] < group_ranks[j] else -difference)
    return strict, tied


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def reliability_bins(probabilities: list[float], outcomes: list[float], bins: int = 10) -> list[dict]:
    """Equal-width bins of [0, 1]: count, mean predicted probability and observed rate per bin.

    A probability of exactly 1 falls in the last bin. Empty bins have count 0 and nan means.
    """
    out = [{"low": b / bins, "high": (b + 1) / bins, "count": 0, "predicted": 0.0, "observed": 0.0}
           for b in range(bins)]
    for p, y in zip(probabilities, outcomes):
        row = out[min(int(p * bins), bins - 1)]
        row["count"] += 1
        row["predicted"] += p
        row["observed"] += y
    for row in out:
        n = row["count"]
        row["predicted"] = row["predicted"] / n if n else math.nan
        row["observed"] = row["observed"] / n if n else math.nan
    return out


def expected_calibration_error(probabilities: list[float], outcomes: list[float], bins: int = 10) -> float:
    """ECE = sum over equal-width bins b of (n_b / N) * |mean predicted_b - observed rate_b|.

    Guo et al., "On Calibration of Modern Neural Networks" (arXiv 1706.04599), eq. 3.
    Example: p = [0.1, 0.3, 0.6, 0.8], y = [0, 1, 1, 1], 2 bins: |0.2 - 0.5| / 2 + |0.7 - 1| / 2 = 0.3.
    """
    total = len(probabilities)
    if not total:
        return math.nan
    return sum(row["count"] / total * abs(row["predicted"] - row["observed"])
               for row in reliability_bins(probabilities, outcomes, bins) if row["count"])


def pair_probabilities(margins: list[float], temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """Calibration points of strictly ordered pairs, both ways round.

    Each pair with margin d = r_better - r_worse gives P = sigmoid(d / T) with outcome 1 and
    P = sigmoid(-d / T) with outcome 0: the predicted chance that the first reply of a pair in
    either order is the human's choice. Without the mirror every outcome would be 1.
    """
    probabilities, outcomes = [], []
    for d in margins:
        p = sigmoid(d / temperature)
        probabilities += [p, 1 - p]
        outcomes += [1.0, 0.0]
    return probabilities, outcomes


def fit_temperature(logits: list[float], outcomes: list[float] | None = None,
                    bounds: tuple[float, float] = (1e-6, 1e6)) -> float:
    """The T > 0 that minimises the NLL of sigmoid(logit / T) (temperature scaling, Guo et al. 2017).

    With b = 1 / T the NLL sum_i softplus(b * d_i) - y_i * b * d_i is convex in b, so its
    derivative sum_i d_i * (sigmoid(b * d_i) - y_i) is increasing: bisection on log b finds the
    root. outcomes default to all 1 (d = r_chosen - r_rejected). T is clipped to ``bounds``
    (perfectly separated data wants T -> 0; data ordered backwards has no positive T).
    """
    import numpy as np

    d = np.asarray(logits, dtype=float)
    y = np.ones_like(d) if outcomes is None else np.asarray(outcomes, dtype=float)

    def slope(b: float) -> float:
        return float(np.sum(d * (0.5 * (1 + np.tanh(0.5 * b * d)) - y)))

    low, high = math.log(1 / bounds[1]), math.log(1 / bounds[0])
    if not len(d) or slope(math.exp(low)) >= 0:
        return bounds[1]
    if slope(math.exp(high)) <= 0:
        return bounds[0]
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if slope(math.exp(middle)) < 0 else (low, middle)
    return 1 / math.exp((low + high) / 2)


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``); nan when either sequence is constant or
    shorter than 2."""
    from scipy.stats import pearsonr

    if len(x) < 2 or _constant(x) or _constant(y):  # undefined: nan without scipy's warning
        return math.nan
    return float(pearsonr(x, y).statistic)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman correlation (``scipy.stats.spearmanr``): Pearson correlation of the ranks, ties
    sharing their average rank; nan when either sequence is constant or shorter than 2."""
    from scipy.stats import spearmanr

    if len(x) < 2 or _constant(x) or _constant(y):
        return math.nan
    return float(spearmanr(x, y).statistic)


def quantile_edges(values: list[float], buckets: int) -> list[float]:
    """Bucket edges at the quantiles of ``values`` (duplicates merged, so maybe fewer buckets).

    Bucket b holds edges[b] <= v < edges[b + 1], the last one closed on the right.
    """
    import numpy as np

    edges = np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, buckets + 1))
    return sorted(set(float(e) for e in edges))


def bucket_of(value: float, edges: list[float]) -> int:
    """Index of the bucket of ``quantile_edges`` holding ``value`` (outside values: first / last)."""
    for b in range(len(edges) - 2):
        if value < edges[b + 1]:
            return b
    return max(0, len(edges) - 2)

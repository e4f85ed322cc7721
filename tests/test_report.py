"""Interval, calibration and length metrics by hand, and `reward eval --report` through the CLI."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from scipy.stats import pearsonr, spearmanr

from chatrlhf import metrics
from chatrlhf.cli import main
from conftest import separable_pairs, write_jsonl


# ---- bootstrap -------------------------------------------------------------------------------

def test_bootstrap_is_deterministic_and_exact_on_constant_data():
    assert metrics.bootstrap_interval([0.7] * 30) == pytest.approx((0.7, 0.7))
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert metrics.bootstrap_interval(values, seed=3) == metrics.bootstrap_interval(values, seed=3)
    # Two items 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles of 2000 resamples are 0 and 1.
    assert metrics.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_contains_the_estimate_and_shrinks_with_n():
    rng = random.Random(0)
    widths = []
    for n in (50, 500, 5000):
        values = [float(rng.random() < 0.7) for _ in range(n)]
        low, high = metrics.bootstrap_interval(values)
        assert low <= sum(values) / n <= high
        # The normal approximation of a proportion's interval: 2 * 1.96 * sqrt(p (1 - p) / n).
        assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.21 / n), rel=0.25)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_weighted_bootstrap_resamples_groups_with_their_pairs():
    # Accuracy is a ratio of sums: group 1 has 3 of 3 pairs right, group 2 has 0 of 1.
    correct, total = [3.0, 0.0], [3.0, 1.0]
    low, high = metrics.bootstrap_interval(correct, total)
    assert (low, high) == (0.0, 1.0)  # resamples {g2, g2} and {g1, g1} are the extremes
    intervals = metrics.group_metric_intervals([[3.0, 2.0, 1.0], [0.0, 1.0]], [[0, 1, 2], [0, 1]])
    assert set(intervals) == {"accuracy", "best_vs_worst_accuracy", "mean_kendall_tau"}
    assert intervals["mean_kendall_tau"] == pytest.approx([1.0, 1.0])  # one ranking, tau = 1


# ---- calibration -----------------------------------------------------------------------------

def test_ece_by_hand():
    # Bin [0, 0.5): p = 0.1, 0.3 -> mean 0.2, outcomes 0, 1 -> rate 0.5, gap 0.3, weight 1/2.
    # Bin [0.5, 1]: p = 0.6, 0.8 -> mean 0.7, outcomes 1, 1 -> rate 1.0, gap 0.3, weight 1/2.
    assert metrics.expected_calibration_error([0.1, 0.3, 0.6, 0.8], [0, 1, 1, 1], bins=2) == pytest.approx(0.3)
    # A probability of exactly 1 is in the last bin; perfectly calibrated bins give 0.
    assert metrics.expected_calibration_error([1.0, 0.0], [1, 0], bins=10) == 0.0
    rows = metrics.reliability_bins([0.05, 0.15, 0.15], [0, 1, 0], bins=10)
    assert [r["count"] for r in rows[:3]] == [1, 2, 0] and rows[1]["observed"] == 0.5
    assert math.isnan(rows[2]["predicted"])


def test_pair_probabilities_mirror_each_pair():
    probabilities, outcomes = metrics.pair_probabilities([0.0, math.log(3)])
    assert probabilities == pytest.approx([0.5, 0.5, 0.75, 0.25]) and outcomes == [1, 0, 1, 0]
    # Margins log 3 with a 3:1 win rate are calibrated; halving the temperature is not.
    margins = [math.log(3)] * 3 + [-math.log(3)]
    p, y = metrics.pair_probabilities(margins)
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    assert metrics.fit_temperature(margins) == pytest.approx(1.0, rel=1e-6)


def test_fitted_temperature_recovers_a_known_temperature():
    rng = random.Random(0)
    true_t = 2.5
    logits = [rng.gauss(0, 4) for _ in range(20000)]
    outcomes = [float(rng.random() < metrics.sigmoid(d / true_t)) for d in logits]
    assert metrics.fit_temperature(logits, outcomes) == pytest.approx(true_t, rel=0.05)
    assert metrics.fit_temperature([1.0, 2.0]) == 1e-6  # separable: T -> 0, clipped


# ---- length ----------------------------------------------------------------------------------

def test_correlations_and_buckets_match_scipy():
    rng = random.Random(1)
    x = [rng.randint(0, 5) for _ in range(40)]
    y = [v + rng.random() for v in x]
    assert metrics.pearson(x, y) == pytest.approx(pearsonr(x, y).statistic)
    assert metrics.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    edges = metrics.quantile_edges([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert edges == [1, 2.75, 4.5, 6.25, 8]
    assert [metrics.bucket_of(v, edges) for v in (1, 2.75, 8, 100)] == [0, 1, 3, 3]


# ---- the report through the CLI --------------------------------------------------------------

def test_eval_report_writes_html_json_and_plots(tmp_path, tiny_bert, capsys):
    rows = separable_pairs(48, seed=11)
    out = tmp_path / "run"
    assert main(["reward", "train", f"model.name={tiny_bert}", f"data.train={write_jsonl(tmp_path / 't.jsonl', rows)}",
                 f"train.output_dir={out}", "model.max_length=48", "train.batch_size=8", "train.lr=2e-3",
                 "train.max_steps=6", f"data.dev={write_jsonl(tmp_path / 'd.jsonl', separable_pairs(24, seed=12))}"]) == 0
    # The project's own format, which carries ties (for the tie figures).
    dev = [{"kind": "pair", **r} for r in separable_pairs(30, seed=13)]
    dev += [{"kind": "pair", **r, "tie": True} for r in separable_pairs(6, seed=14)]
    capsys.readouterr()
    report_dir = tmp_path / "report"
    assert main(["reward", "eval", str(out / "model"), write_jsonl(tmp_path / "dev.jsonl", dev),
                 "--report", str(report_dir), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    figures = json.loads((report_dir / "report.json").read_text())
    for name in ("report.html", "length.png", "calibration.png", "rewards.png", "ties.png"):
        assert (report_dir / name).stat().st_size > 1000, name
    # The printed figure, the --json figure and the report's figure are one and the same.
    accuracy = float(re.search(r"accuracy (\d\.\d{4}) on 30 pairs", printed).group(1))
    assert figures["summary"]["accuracy"] == json.loads((tmp_path / "m.json").read_text())["accuracy"]
    assert round(figures["summary"]["accuracy"], 4) == accuracy
    low, high = figures["summary"]["intervals"]["accuracy"]
    assert low <= accuracy <= high
    assert figures["summary"]["human_ties"] == 6 and figures["distribution"]["tied_pairs_abs_margin"]["count"] == 6
    assert figures["calibration"]["temperature"] > 0 and len(figures["calibration"]["reliability"]) == 10
    assert figures["length"]["by_reply_tokens"] and 0 <= figures["length"]["longer_wins_accuracy"] <= 1
    assert figures["normalization"]["trained_reward_std"] > 0
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src=\"length.png\"" not in html


def test_ece_after_temperature_is_measured_on_pairs_its_temperature_never_saw():
    """Margins 3 and -3: fitted on both, T -> infinity gives P = 0.5 everywhere and an ECE of 0
    (what the in-sample fit reported). Cross-fitted, the half with margin 3 wants T -> 0, which
    makes the other half's pair certain and wrong (error 1 on its 2 points), and the half with
    margin -3 wants T -> infinity, which puts the other half's pair at 0.5 (error 0.5): ECE 0.75."""
    from chatrlhf import report

    calibration = report.calibration_figures([3.0, -3.0])
    assert calibration["ece_after_temperature"] == pytest.approx(0.75, abs=1e-5)
    assert sorted(calibration["temperature_halves"]) == [1e-6, 1e6]
    assert calibration["temperature"] == 1e6

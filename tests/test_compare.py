"""`chatrlhf reward compare`: the split, the simulated raters, and the command end to end."""

from __future__ import annotations

import json
import random

import pytest

from chatrlhf.cli import main
from chatrlhf.data import ScoredSample, prompt_key
from chatrlhf.data.batching import to_groups
from chatrlhf.recipes import compare
from conftest import WORDS, write_jsonl


def scored_rows(prompts: int, replies: int, seed: int) -> list[dict]:
    """Replies with 0-3 "good" words; three raters score 1 + that count, give or take one."""
    rng = random.Random(seed)
    rows = []
    for p in range(prompts):
        prompt = f"dialogue {p}: " + " ".join(rng.choice(WORDS) for _ in range(8))
        for r in range(replies):
            good = r % 4
            reply = " ".join(["good"] * good + [rng.choice(WORDS) for _ in range(3)])
            raters = [float(min(5, max(1, 1 + good + rng.choice([-1, 0, 0, 1])))) for _ in range(3)]
            rows.append({"kind": "scored", "prompt": prompt, "reply": reply, "score": sum(raters) / 3,
                         "rater_scores": raters})
    return rows


def records(rows):
    return [ScoredSample(r["prompt"], r["reply"], r["score"], r["rater_scores"]) for r in rows]


def test_split_keeps_each_prompt_on_one_side_and_is_seeded():
    data = records(scored_rows(10, 4, seed=0))
    train, held = compare.split_prompts(data, 0.3, seed=1)
    assert len(held) == 12 and len(train) == 28
    assert not {prompt_key(r.prompt) for r in train} & {prompt_key(r.prompt) for r in held}
    assert compare.split_prompts(data, 0.3, seed=1)[1] == held
    assert compare.split_prompts(data, 0.3, seed=2)[1] != held


def test_rater_noise():
    data = records(scored_rows(6, 4, seed=1))
    assert compare.add_rater_noise(data, 0.0, seed=0) == data
    noisy = compare.add_rater_noise(data, 1.0, seed=0)
    assert noisy == compare.add_rater_noise(data, 1.0, seed=0)
    assert all(n.score == pytest.approx(sum(n.rater_scores) / 3) for n in noisy)
    assert [n.score for n in noisy] != [r.score for r in data]
    # One rater per sample and one labeller per prompt: an increasing map of each prompt's
    # scores, so the comparisons are untouched while the absolute scores move.
    single = [ScoredSample(r.prompt, r.reply, r.score) for r in data]
    moved = compare.add_rater_noise(single, 1.0, seed=0)
    assert [g.ranks for g in to_groups(moved)] == [g.ranks for g in to_groups(single)]
    z = compare.standardized(moved)
    assert sum(r.score for r in z) == pytest.approx(0, abs=1e-9)


def test_compare_trains_both_objectives_and_writes_the_table(tmp_path, tiny_bert, capsys):
    data = write_jsonl(tmp_path / "scores.jsonl", scored_rows(8, 4, seed=2))
    out = tmp_path / "compare"
    assert main(["reward", "compare", "--data", data, "--output", str(out), "--held-out", "0.25",
                 "--rater-noise", "0,1.0", "--resamples", "200", f"model.name={tiny_bert}",
                 "model.max_length=48", "train.max_steps=3", "train.lr=2e-3"]) == 0
    printed = capsys.readouterr().out
    assert "pairwise accuracy" in printed and "mean Kendall tau" in printed
    summary = json.loads((out / "compare.json").read_text())
    rows = summary["rows"]
    assert [(r["noise"], r["objective"]) for r in rows] == [
        (None, "baseline: longer reply"), (0.0, "regression"), (0.0, "comparisons"),
        (1.0, "regression"), (1.0, "comparisons")]
    for row in rows:
        low, high = row["intervals"]["accuracy"]
        assert low <= row["accuracy"] <= high and row["groups"] == 2 and row["pairs"] > 0
        assert "mean_kendall_tau" in row["intervals"]
    # The same budget: steps, and replies per step (2 prompts of 4 replies = 8 samples).
    assert summary["budget"]["steps"] == 3
    assert summary["budget"]["batch_size"] == {"comparisons": 2, "regression": 8}
    for level in ("0", "1"):
        for objective in ("regression", "comparisons"):
            log = (out / f"noise-{level}" / objective / "metrics.jsonl").read_text().splitlines()
            assert len(log) == 3
    regression_file = (out / "noise-0" / "train_regression.jsonl").read_text().splitlines()
    assert abs(sum(json.loads(line)["score"] for line in regression_file)) < 1e-6  # z-scored
    assert (out / "compare.png").stat().st_size > 1000 and (out / "held_out.jsonl").exists()

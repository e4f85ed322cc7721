"""`chatrlhf reward train|score|eval` through the real CLI, with tiny models built in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from chatrlhf import config as cfg, models, training
from chatrlhf.config import RewardConfig
from chatrlhf.cli import main
from chatrlhf.recipes import reward
from conftest import crash_after_checkpoint, read_metrics as log, separable_pairs, write_jsonl


def train(tmp_path, model: str, rows: list[dict], *extra: str, dev_rows=None, name="run") -> Path:
    out = tmp_path / name
    args = ["reward", "train", f"model.name={model}", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
            f"train.output_dir={out}", "model.max_length=48", "train.batch_size=8", "train.lr=2e-3",
            "train.warmup_ratio=0.0", *extra]
    if dev_rows:
        args.append(f"data.dev={write_jsonl(tmp_path / 'dev.jsonl', dev_rows)}")
    assert main(args) == 0
    return out



def test_tiny_bert_learns_a_separable_preference(tmp_path, tiny_bert, capsys):
    out = train(tmp_path, tiny_bert, separable_pairs(160, seed=1), "train.epochs=4",
                dev_rows=separable_pairs(60, seed=2))
    assert "dev accuracy" in capsys.readouterr().out
    final = log(out)[-1]
    assert final["dev_accuracy"] > 0.9
    saved = json.loads((out / "model" / "chatrlhf.json").read_text())
    assert saved["eval"]["accuracy"] == final["dev_accuracy"] and saved["reward_std"] > 0
    # The same figure again from the saved model through `reward eval`.
    assert main(["reward", "eval", str(out / "model"), str(tmp_path / "dev.jsonl")]) == 0
    assert f"accuracy {final['dev_accuracy']:.4f} on 60 pairs" in capsys.readouterr().out


def test_saved_model_gives_the_same_scores_in_plain_transformers(tmp_path, tiny_bert):
    out = train(tmp_path, tiny_bert, separable_pairs(16, seed=3), "train.max_steps=2")
    scores = tmp_path / "scores.jsonl"
    assert main(["reward", "score", str(out / "model"), str(tmp_path / "train.jsonl"), "-o", str(scores)]) == 0
    ours = [json.loads(line)["rewards"] for line in scores.read_text().splitlines()]

    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    for row, rewards in zip(separable_pairs(16, seed=3), ours):
        batch = tokenizer([row["prompt"]] * 2, [" " + row["chosen"], " " + row["rejected"]],
                          padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = plain(**batch).logits[:, 0].tolist()
        assert rewards == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dropout", [False, True], ids=["dropout-off", "dropout-on"])
def test_resume_after_a_crash_ends_with_the_same_loss(tmp_path, tiny_bert, monkeypatch, dropout):
    # With dropout on, the resumed steps must also draw the masks the whole run drew.
    rows = separable_pairs(48, seed=4)
    settings = ("train.max_steps=6", "train.save_every=3", "train.epochs=2", f"model.dropout={str(dropout).lower()}")
    whole = log(train(tmp_path, tiny_bert, rows, *settings, name="whole"))

    with crash_after_checkpoint(monkeypatch, reward, at_step=3):
        train(tmp_path, tiny_bert, rows, *settings, name="crashed")
    resumed = log(train(tmp_path, tiny_bert, rows, *settings, "train.resume=true", name="crashed"))
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert [e["loss"] for e in resumed[3:]] == pytest.approx([e["loss"] for e in whole[3:]], abs=1e-6)


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_bert, capsys):
    out = train(tmp_path, tiny_bert, separable_pairs(32, seed=5), "train.max_steps=4", "train.save_every=2")
    newest = out / "checkpoints" / "step-0000004"
    (newest / training.STATE_FILE).write_bytes(b"truncated")
    assert training.latest_checkpoint(out) == out / "checkpoints" / "step-0000002"
    assert "unreadable" in capsys.readouterr().err


def test_lora_round_trips_with_its_head(tmp_path, tiny_bert):
    out = train(tmp_path, tiny_bert, separable_pairs(16, seed=6), "train.max_steps=3", "model.lora_r=4",
                "model.lora_target_modules=[query, value]")
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    pairs_file = str(tmp_path / "train.jsonl")
    first = reward_scores(out / "model", pairs_file, tmp_path / "a.jsonl")
    torch.manual_seed(123)  # a re-initialised head would now give other scores
    assert reward_scores(out / "model", pairs_file, tmp_path / "b.jsonl") == first
    adapter_model, _ = models.load_reward_model(str(out / "model"))
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    head = [n for n, _ in merged.named_parameters() if n.startswith("classifier")][0]
    trained = {n: p for n, p in adapter_model.named_parameters() if "modules_to_save" in n and n.endswith("weight")}
    original = {n: p for n, p in adapter_model.named_parameters() if "original_module" in n and n.endswith("weight")}
    [trained_head], [original_head] = trained.values(), original.values()
    assert torch.equal(trained_head, dict(merged.named_parameters())[head])
    assert not torch.equal(trained_head, original_head)  # the head did train


def reward_scores(model: Path, data: str, output: Path) -> list:
    assert main(["reward", "score", str(model), data, "-o", str(output)]) == 0
    return [json.loads(line)["rewards"] for line in output.read_text().splitlines()]


def test_decoder_backbone_without_pad_token_on_chat_data(tmp_path, tiny_llama):
    out = train(tmp_path, tiny_llama, separable_pairs(24, seed=7, chat=True), "train.max_steps=3")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token is not None
    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ours = reward_scores(out / "model", str(tmp_path / "train.jsonl"), tmp_path / "s.jsonl")
    row = separable_pairs(24, seed=7, chat=True)[0]
    text = tokenizer.apply_chat_template([*row["prompt"], {"role": "assistant", "content": row["chosen"]}],
                                         tokenize=False)
    with torch.no_grad():
        expected = plain(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
    assert ours[0][0] == pytest.approx(float(expected), abs=1e-5)


def test_rankings_train_and_eval_with_ranking_metrics(tmp_path, tiny_bert, capsys):
    rows = [{"kind": "ranking", "prompt": r["prompt"], "replies": [r["chosen"], "neutral words", r["rejected"]],
             "ranks": [0, 1, 2]} for r in separable_pairs(24, seed=8)]
    out = train(tmp_path, tiny_bert, rows, "train.max_steps=3")
    assert main(["reward", "eval", str(out / "model"), str(tmp_path / "train.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "on 72 pairs" in printed and "best-vs-worst" in printed and "Kendall tau" in printed


def test_regression_objective_on_scored_samples(tmp_path, tiny_bert):
    rows = [{"kind": "scored", "prompt": r["prompt"], "reply": reply, "score": score}
            for r in separable_pairs(24, seed=9) for reply, score in ((r["chosen"], 4.0), (r["rejected"], 1.0))]
    out = train(tmp_path, tiny_bert, rows, "train.max_steps=20", "loss.objective=regression")
    losses = [e["loss"] for e in log(out)]
    assert losses[-1] < losses[0]


def test_bad_config_value_is_a_clear_error(tmp_path, tiny_bert, capsys):
    assert main(["reward", "train", "train.lr=fast"]) == 2
    assert "train.lr: expected float, found 'fast'" in capsys.readouterr().err


def test_length_sorted_chunks_give_the_same_rewards_and_gradients(tiny_bert):
    from chatrlhf.data.batching import Group, collate, tokenize_groups

    model, tokenizer = models.load_reward_model(tiny_bert, dropout=False)
    groups = [Group(row["prompt"], [row["chosen"], row["rejected"] + " the" * (3 * i)], [0, 1])
              for i, row in enumerate(separable_pairs(6, seed=9))]
    tokenize_groups(groups, tokenizer, max_length=64)
    batch = collate(groups, tokenizer.pad_token_id)
    results = []
    for rows in (0, 5):  # one padded forward, then length-sorted chunks of 5 rows (3 calls)
        model.zero_grad()
        rewards = reward.forward_rewards(model, batch, rows_per_forward=rows)
        rewards.square().sum().backward()
        results.append((rewards.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (one, one_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-5)
    for a, b in zip(one_grads, chunked_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def assert_same_run(tmp_path, model: str, rows: list[dict], setting: str, tolerance: float = 1e-5) -> None:
    """Three steps trained with ``setting`` log the losses and gradient norms of three without."""
    plain = log(train(tmp_path, model, rows, "train.max_steps=3", name="plain"))
    changed = log(train(tmp_path, model, rows, "train.max_steps=3", setting, name="changed"))
    assert len(plain) == len(changed) == 3
    for a, b in zip(plain, changed):
        assert b["loss"] == pytest.approx(a["loss"], abs=tolerance)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=10 * tolerance)


def test_gradient_checkpointing_trains_the_same(tmp_path, tiny_llama):
    assert_same_run(tmp_path, tiny_llama, separable_pairs(16, seed=3, chat=True),
                    "train.gradient_checkpointing=true", tolerance=1e-6)


def test_bf16_setting(tmp_path, tiny_bert, capsys, monkeypatch):
    assert training.use_bf16(True) and not training.use_bf16(False)
    monkeypatch.setattr(training, "native_bf16", lambda: False)
    out = train(tmp_path, tiny_bert, separable_pairs(8, seed=1), "train.max_steps=1", "train.bf16=auto")
    assert "train.bf16=auto: bf16 autocast off (native bf16 not found on cpu)" in capsys.readouterr().out
    assert log(out)[0]["loss"] > 0
    assert main(["reward", "train", "train.bf16=sometimes"]) == 2
    assert "train.bf16: expected true, false or auto, found 'sometimes'" in capsys.readouterr().err


def test_an_earlier_run_is_kept_unless_overwrite_is_asked(tmp_path, tiny_bert, capsys):
    rows = separable_pairs(16, seed=2)
    first = train(tmp_path, tiny_bert, rows, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=5")
    with pytest.raises(AssertionError):  # main() returns 2: the run stops before touching anything
        train(tmp_path, tiny_bert, rows, "train.max_steps=2")
    assert "holds an earlier run (metrics.jsonl, checkpoints): continue it with train.resume=true, or start " \
        "afresh with train.overwrite=true" in capsys.readouterr().err
    assert len(log(first)) == 3 and len(list((first / "checkpoints").iterdir())) == 3, "nothing deleted"
    out = train(tmp_path, tiny_bert, rows, "train.max_steps=2", "train.overwrite=true")
    assert "starting afresh (train.overwrite=true); removing the earlier run's metrics.jsonl, checkpoints" \
        in capsys.readouterr().out
    assert [entry["step"] for entry in log(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]


def tied_pairs(n: int, tie_rate: float, seed: int) -> list[dict]:
    """Separable pairs, the first tie_rate of them marked as ties (the project's own format)."""
    rows = separable_pairs(n, seed)
    return [{"kind": "pair", **row, "tie": i < tie_rate * n} for i, row in enumerate(rows)]


def test_learned_tie_parameter_follows_the_tie_rate(tmp_path, tiny_bert, capsys):
    learned = {}
    for rate in (0.1, 0.7):
        out = train(tmp_path, tiny_bert, tied_pairs(64, rate, seed=7), "loss.tie_nu=learn", "train.epochs=6",
                    dev_rows=tied_pairs(16, rate, seed=8), name=f"rate{rate}")
        metrics = log(out)
        assert metrics[0]["tie_nu"] != 1.0 and "tie_nu" in metrics[-1]
        learned[rate] = json.loads((out / "model" / "chatrlhf.json").read_text())["tie_nu"]
        assert learned[rate] == pytest.approx(metrics[-1]["tie_nu"])
    # Starting from nu = 1, few ties pull it down and many push it up.
    assert learned[0.1] < 0.8 < 1.2 < learned[0.7]
    assert "learned tie parameter nu" in capsys.readouterr().out


def test_tie_nu_learn_without_ties_trains_plain_bradley_terry(tmp_path, tiny_bert, capsys):
    out = train(tmp_path, tiny_bert, separable_pairs(16, seed=9), "loss.tie_nu=learn", "train.max_steps=2")
    captured = capsys.readouterr()
    assert "no ties; it trains plain Bradley-Terry" in captured.err + captured.out
    assert "tie_nu" not in log(out)[-1]


def test_length_balance_weighs_longer_and_shorter_wins_alike_per_source():
    from chatrlhf.data.batching import Group

    def pair(source, chosen_longer):
        long, short = "a long reply " * 3, "short"
        return Group("p", [long, short] if chosen_longer else [short, long], [0, 1], source=source)

    # Source x: the longer reply wins 3 times in 4; source y: once in 2; a 3-reply ranking in z.
    groups = [pair("x", True), pair("x", True), pair("x", True), pair("x", False), pair("y", True), pair("y", False),
              Group("p", ["aaa", "a", "aa"], [0, 1, 2], source="z"), pair("z", False)]
    reward.balance_lengths(groups, log=lambda *a: None)
    weights = [g.weight for g in groups]
    # x: 1 / (2 * 3/4) = 2/3 for a longer win, 1 / (2 * 1/4) = 2 for a shorter win; y is balanced.
    assert weights[:6] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2, 1, 1])
    for source in "xyz":
        mine = [g for g in groups if g.source == source]
        assert sum(g.weight for g in mine) == pytest.approx(len(mine))  # weights average 1 per source
        if source != "z":  # and the weighted pairs the longer reply wins are one half
            longer_wins = sum(g.weight for g in mine if len(g.replies[0]) > len(g.replies[1]))
            assert longer_wins / len(mine) == pytest.approx(0.5)


def test_length_balance_changes_the_loss_and_is_off_by_default(tmp_path, tiny_bert):
    rows = separable_pairs(32, seed=11)
    for row in rows[:24]:  # the chosen reply is longer in 24 of 32 pairs
        row["chosen"] += " and more words here"
    plain = log(train(tmp_path, tiny_bert, rows, "train.max_steps=2", name="plain"))
    balanced = log(train(tmp_path, tiny_bert, rows, "train.max_steps=2", "loss.length_balance=true", name="balanced"))
    assert plain[0]["loss"] != pytest.approx(balanced[0]["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="loss.length_balance is for loss.objective=comparisons"):
        cfg.load(RewardConfig, overrides=["loss.length_balance=true", "loss.objective=regression"])


def test_eval_on_a_presets_dev_mixture_reports_each_source_with_length_baselines(tmp_path, tiny_bert, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", separable_pairs(40, seed=12))
    b = write_jsonl(tmp_path / "b.jsonl", separable_pairs(30, seed=13))
    out = train(tmp_path, tiny_bert, separable_pairs(64, seed=14), "train.max_steps=4")
    preset = tmp_path / "p.yaml"
    preset.write_text(f"data:\n  dev:\n    - {{path: {a}, name: first, holdout: 0.5}}\n    - {{path: {b}, name: second}}\n")
    capsys.readouterr()
    assert main(["reward", "eval", str(out / "model"), str(preset), "--json", str(tmp_path / "m.json"),
                 "--report", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result["sources"]) == {"first", "second"} and result["sources"]["second"]["pairs"] == 30
    assert "  second accuracy" in printed and "mean over 2 sources" in printed
    figures = json.loads((tmp_path / "report" / "report.json").read_text())["sources"]
    for source in ("first", "second"):
        f = figures[source]
        assert f["accuracy"] == pytest.approx(result["sources"][source]["accuracy"])
        assert f["accuracy_interval"][0] <= f["accuracy"] <= f["accuracy_interval"][1]
        assert 0 <= f["longer_wins_accuracy"] <= 1 and 0 <= f["shorter_wins_accuracy"] <= 1
    assert "Per source" in (tmp_path / "report" / "report.html").read_text()

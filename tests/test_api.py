"""The Python API (chatrlhf.api): RewardModel scores as `chatrlhf reward score` does, compares and
evaluates as `reward eval` does, and the training functions take the presets' configs. Tiny models
built in the tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

import chatrlhf
from chatrlhf import api, cli, models
from chatrlhf.api import RewardModel
from chatrlhf.config import RewardConfig
from conftest import separable_pairs, spread_bert, write_jsonl

MEAN, STD = 0.5, 2.0


@pytest.fixture(scope="module")
def bert_dir(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert with large weights (rewards far apart) and chatrlhf.json: max_length, mean, std."""
    folder = spread_bert(tiny_bert, tmp_path_factory.mktemp("api") / "bert")
    (folder / models.METADATA_FILE).write_text(json.dumps({"max_length": 48, "reward_mean": MEAN,
                                                           "reward_std": STD}))
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama, tmp_path_factory) -> str:
    """tiny_llama as a reward model (a decoder with a chat template), its head saved."""
    folder = tmp_path_factory.mktemp("api") / "llama"
    torch.manual_seed(2)
    model, tokenizer = models.load_reward_model(tiny_llama)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Pairs with text and chat prompts."""
    rows = separable_pairs(12, 0) + separable_pairs(12, 1, chat=True)
    return write_jsonl(tmp_path_factory.mktemp("api_data") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def rankings(tmp_path_factory) -> str:
    """Rankings of 3 replies (for the ranking metrics), one prompt long enough to be cut."""
    rows = [{"kind": "ranking", "prompt": r["prompt"] + (" the" * 60 if i == 0 else ""),
             "replies": [r["chosen"], r["chosen"] + " " + r["rejected"], r["rejected"]], "ranks": [0, 1, 2]}
            for i, r in enumerate(separable_pairs(10, 2))]
    return write_jsonl(tmp_path_factory.mktemp("api_data") / "rankings.jsonl", rows)


def records_in_order(path: str) -> tuple[list, list[str]]:
    """The (prompt, reply) of every reply of a file of pairs, in `reward score`'s order."""
    prompts, replies = [], []
    for line in open(path):
        row = json.loads(line)
        prompts += [row["prompt"]] * 2
        replies += [row["chosen"], row["rejected"]]
    return prompts, replies


@pytest.mark.parametrize("which", ["bert_dir", "llama_dir"])
def test_score_equals_reward_score_command(which, request, data, tmp_path):
    folder = request.getfixturevalue(which)
    out = tmp_path / "rewards.jsonl"
    assert cli.main(["reward", "score", folder, data, "--output", str(out)]) == 0
    expected = [r for line in out.read_text().splitlines() for r in json.loads(line)["rewards"]]
    reward_model = RewardModel.load(folder)
    prompts, replies = records_in_order(data)
    rewards = reward_model.score(prompts, replies)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert max(rewards) - min(rewards) > 1e-3, "the test model should tell the replies apart"
    if which == "bert_dir":
        assert reward_model.max_length == 48 and reward_model.can_normalize
        torch.testing.assert_close(reward_model.score(prompts, replies, normalize=True),
                                   [(r - MEAN) / STD for r in expected], atol=1e-5, rtol=0)
        assert reward_model.cut_replies == 0
        reward_model.score(["the " * 100], ["good"])
        assert reward_model.cut_replies == 1
    else:
        with pytest.raises(ValueError, match="reward_mean"):
            reward_model.score(prompts, replies, normalize=True)


def test_compare_gives_bradley_terry_probabilities_and_a_ranking(bert_dir):
    reward_model = RewardModel.load(bert_dir)
    prompt = [{"role": "user", "content": "is it good"}]
    replies = ["good", "bad bad", "the a", "it is good"]
    result = reward_model.compare(prompt, replies)
    rewards = reward_model.score([prompt] * 4, replies)
    torch.testing.assert_close(result["rewards"], rewards, atol=1e-6, rtol=0)
    assert result["ranking"] == sorted(range(4), key=lambda i: -rewards[i])
    assert rewards[result["ranking"][0]] == max(rewards)
    p = result["probabilities"]
    for i in range(4):
        assert p[i][i] == 0.5
        for j in range(4):
            assert p[i][j] == pytest.approx(1 / (1 + math.exp(rewards[j] - rewards[i])), abs=1e-9)
            assert p[i][j] + p[j][i] == pytest.approx(1.0)
    best, worst = result["ranking"][0], result["ranking"][-1]
    assert p[best][worst] > 0.5


@pytest.mark.parametrize("file", ["data", "rankings"])
def test_evaluate_equals_reward_eval(file, request, bert_dir, tmp_path):
    path = request.getfixturevalue(file)
    out = tmp_path / "eval.json"
    assert cli.main(["reward", "eval", bert_dir, path, "--json", str(out)]) == 0
    expected = json.loads(out.read_text())
    result = RewardModel.load(bert_dir).evaluate(path)
    assert set(result) == set(expected) and {"accuracy", "cut_replies"} <= set(result)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert result["pairs"] == (24 if file == "data" else 30)
    if file == "rankings":
        assert "mean_kendall_tau" in result and result["cut_replies"] == 3


def test_train_reward_from_a_dict_config(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(48, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", separable_pairs(24, 1))
    config = {"model": {"name": tiny_bert, "max_length": 48},
              "data": {"train": train, "dev": dev},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8, "lr": 2e-3}}
    result = chatrlhf.train_reward(config)
    assert result["pairs"] == 24 and {"accuracy", "reward_mean", "reward_std"} <= set(result)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()] == [1, 2, 3, 4]
    trained = RewardModel.load(str(tmp_path / "run" / "model"))
    assert trained.can_normalize and trained.max_length == 48
    assert trained.evaluate(dev)["accuracy"] == pytest.approx(result["accuracy"])
    assert trained.reward_mean == pytest.approx(result["reward_mean"])


def test_configs_from_yaml_dataclass_and_overrides(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "minilm"}, "train": {"lr": 1e-4}}))
    from_yaml = api._config(RewardConfig, preset, ["train.batch_size=4", "--loss.centering", "0.1"])
    assert (from_yaml.train.lr, from_yaml.train.batch_size, from_yaml.loss.centering) == (1e-4, 4, 0.1)
    from_dataclass = api._config(RewardConfig, from_yaml, {"train": {"lr": 3e-5}})
    assert (from_dataclass.train.lr, from_dataclass.train.batch_size) == (3e-5, 4)
    assert api._config(RewardConfig, from_yaml, None) is from_yaml
    with pytest.raises(ValueError, match="unknown config key"):
        api._config(RewardConfig, {"train": {"learning_rate": 1}}, None)
    with pytest.raises(TypeError, match="a dict or a YAML path"):
        api._config(RewardConfig, 3, None)


def test_import_chatrlhf_stays_light():
    code = ("import sys, chatrlhf; heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "assert {'RewardModel', 'train_reward', 'reward_function'} <= set(dir(chatrlhf))")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert chatrlhf.RewardModel is RewardModel and chatrlhf.train_ppo is api.train_ppo
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        chatrlhf.nothing  # noqa: B018

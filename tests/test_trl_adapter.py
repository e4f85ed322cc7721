"""`chatrlhf.api.reward_function`: a reward model, local or served, as a TRL reward function
(``GRPOTrainer(reward_funcs=...)``: ``fn(prompts, completions, **kwargs) -> list[float]``, prompts and
completions as strings or as chat messages). Called here exactly as TRL calls its reward functions;
the served model runs on a real server on loopback."""

from __future__ import annotations


import pytest

from chatrlhf.api import RewardModel, reward_function
from chatrlhf.serve import create_app
from conftest import running, spread_bert

KEY = "trl-test-key"
PROMPTS = ["the cat sat on the mat", "is it good"]
COMPLETIONS = ["yes it was", "good good"]
CHAT_PROMPTS = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": p}] for p in PROMPTS]
CHAT_COMPLETIONS = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert with large weights, so different texts get clearly different rewards."""
    return str(spread_bert(tiny_bert, tmp_path_factory.mktemp("trl") / "model"))


@pytest.fixture(scope="module")
def reward_model(model_dir) -> RewardModel:
    return RewardModel.load(model_dir)


@pytest.fixture(scope="module")
def url(model_dir):
    with running(create_app(model_dir, api_key=KEY)) as base:
        yield base


def trl_call(fn, prompts, completions) -> list[float]:
    """As GRPOTrainer calls a reward function: keyword arguments, with the completions' ids and
    the dataset's other columns among them."""
    return fn(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * len(prompts),
              ground_truth=["x"] * len(prompts), trainer_state=None)


def test_local_reward_function_matches_the_model(reward_model, model_dir):
    fn = reward_function(reward_model)
    assert fn.__name__ == "chatrlhf_reward"  # TRL logs each reward function under its name
    expected = reward_model.score(PROMPTS, COMPLETIONS)
    assert trl_call(fn, PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-6)
    assert max(expected) - min(expected) > 1e-3
    # Conversational data: message lists; a completion's assistant messages are its text, and
    # contents may come as typed parts.
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": c}]}] for c in COMPLETIONS]
    chat_expected = reward_model.score(CHAT_PROMPTS, COMPLETIONS)
    assert trl_call(fn, CHAT_PROMPTS, CHAT_COMPLETIONS) == pytest.approx(chat_expected, abs=1e-6)
    assert trl_call(fn, CHAT_PROMPTS, parts) == pytest.approx(chat_expected, abs=1e-6)
    from_path = reward_function(model_dir)  # a path is loaded
    assert trl_call(from_path, PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-6)


def test_served_reward_function_matches_the_local_one(url, reward_model, monkeypatch):
    fn = reward_function(url, api_key=KEY)
    for prompts, completions in [(PROMPTS, COMPLETIONS), (CHAT_PROMPTS, CHAT_COMPLETIONS)]:
        expected = reward_model.score(prompts, [c if isinstance(c, str) else c[0]["content"] for c in completions])
        assert trl_call(fn, prompts, completions) == pytest.approx(expected, abs=1e-5)
    # A policy's empty completion is scored, not refused; the key may come from the environment.
    monkeypatch.setenv("CHATRLHF_API_KEY", KEY)
    empty = trl_call(reward_function(url), PROMPTS, ["", "good"])
    assert empty == pytest.approx(reward_model.score(PROMPTS, ["", "good"]), abs=1e-5)
    monkeypatch.delenv("CHATRLHF_API_KEY")
    with pytest.raises(ValueError, match="401 missing or wrong API key"):
        trl_call(reward_function(url), PROMPTS, COMPLETIONS)

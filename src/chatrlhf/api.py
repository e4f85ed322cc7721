"""The Python API: score with a reward model, and run each recipe from a config.

    import chatrlhf

    reward_model = chatrlhf.RewardModel.load("runs/reward/model")
    reward_model.score(["What is 2+2?"], ["4"])                 # [float]
    reward_model.compare("What is 2+2?", ["4", "5", "four"])     # rewards, probabilities, ranking
    reward_model.evaluate("dev.jsonl")                          # the metrics of `reward eval`

    metrics = chatrlhf.train_reward("configs/reward_hh_minilm.yaml", {"train": {"lr": 3e-5}})

A reward model scores exactly as ``chatrlhf reward score`` and ``chatrlhf serve`` do: each (prompt,
reply) is tokenised as in training (the model's max_length, the prompt cut from the left), so a
reward is the same number wherever it is computed. ``reward_function`` wraps a local or served
model as a TRL reward function (``GRPOTrainer(reward_funcs=...)``).

The training functions take what the YAML presets hold: a dict, a YAML path or the recipe's config
dataclass, plus optional overrides (a dict, or ``["train.lr=1e-4", ...]`` as on the command line),
and return the final held-out metrics (empty without ``data.dev``). Like the ``chatrlhf`` command,
they print progress; unlike it, they leave the allocator alone (``training.keep_freed_memory``
makes training steps faster and the process keep its peak memory: call it yourself if you want both).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable, Union

import torch

from chatrlhf import config as cfg_lib
from chatrlhf import metrics, models
from chatrlhf.data import load
from chatrlhf.data.batching import Group, to_groups, tokenize_groups
from chatrlhf.recipes.reward import score_groups

Prompt = Union[str, list]  # text, or chat messages [{"role": ..., "content": ...}] before the reply
Config = Union[dict, str, Path, object]  # a dict, a YAML preset, or the recipe's config dataclass


class RewardModel:
    """A reward model ready to score (prompt, reply) pairs: the model, its tokenizer and the
    settings it was trained with.

    Build one with ``RewardModel.load``. Prompts are text or chat messages; a chat is rendered
    with the tokenizer's chat template when it has one, else in the HH-RLHF layout, exactly as
    in training (``data.tokenize.render``).

    Attributes:
        model: the ``AutoModelForSequenceClassification`` (one output), in eval mode.
        tokenizer: its tokenizer (with a pad token).
        max_length: tokens per (prompt, reply); longer inputs lose the start of their prompt.
        max_reply_tokens: the reply's share when cutting (None: 3/4 of what max_length leaves).
        reward_mean, reward_std: the dev rewards' moments recorded at training, or None.
        batch_tokens: padded tokens per forward pass.
        cut_replies: how many scored (prompt, reply) pairs were cut to max_length so far.
    """

    def __init__(self, model, tokenizer, max_length: int = 512, max_reply_tokens: int | None = None,
                 reward_mean: float | None = None, reward_std: float | None = None,
                 batch_tokens: int = 16384):
        self.model, self.tokenizer = model.eval(), tokenizer
        positions = getattr(model.config, "max_position_embeddings", None)
        # Longer inputs would index past the position table: cut them instead of failing.
        self.max_length = min(max_length, positions) if positions else max_length
        self.max_reply_tokens = max_reply_tokens
        self.reward_mean, self.reward_std = reward_mean, reward_std
        self.batch_tokens = batch_tokens
        self.cut_replies = 0

    @classmethod
    def load(cls, path_or_name: str, max_length: int | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32, batch_tokens: int = 16384) -> "RewardModel":
        """Load a reward model.

        Args:
            path_or_name: a folder saved by ``chatrlhf reward train`` (its ``chatrlhf.json``
                gives max_length and the reward mean/std), an embedded name ("minilm",
                "smollm2-135m"), a hub id or any folder ``transformers`` loads (a new scalar
                head is then initialised at random: only useful for tests).
            max_length: tokens per (prompt, reply); default the training max_length, else 512.
            device: where the model runs ("cuda", "cuda:1", ...); default the CPU.
            dtype: the weights' dtype.
            batch_tokens: padded tokens per forward pass when scoring.
        """
        model, tokenizer = models.load_reward_model(path_or_name, dtype=dtype, dropout=False)
        if device is not None:
            model.to(device)
        info = models.read_metadata(models.resolve(path_or_name))
        return cls(model, tokenizer, max_length or info.get("max_length", 512), info.get("max_reply_tokens"),
                   info.get("reward_mean"), info.get("reward_std"), batch_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def can_normalize(self) -> bool:
        """Whether the model recorded its dev rewards' mean and std (trained with a dev set)."""
        return self.reward_mean is not None and bool(self.reward_std)

    def score(self, prompts: list[Prompt], replies: list[str], normalize: bool = False) -> list[float]:
        """The reward of each (prompt, reply).

        Args:
            prompts: N prompts, each text or a list of chat messages ending before the reply.
            replies: N reply texts.
            normalize: return (r - reward_mean) / reward_std, the moments recorded at training.
        Returns:
            N floats. Each pair is scored on its own: its reward does not depend on the others.
        """
        return self.score_encoded(self.encode(prompts, replies), normalize=normalize)

    def encode(self, prompts: list[Prompt], replies: list[str]) -> list[Group]:
        """Tokenise (prompt, reply) pairs as ``score`` does: one single-reply ``Group`` each,
        its token ids in ``input_ids[0]`` (counted in ``cut_replies`` when cut)."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        groups = [Group(p, [r], [0]) for p, r in zip(prompts, replies)]
        self.cut_replies += tokenize_groups(groups, self.tokenizer, self.max_length, self.max_reply_tokens)
        return groups

    def score_encoded(self, groups: list[Group], normalize: bool = False,
                      batch_tokens: int | None = None) -> list[float]:
        """Rewards of groups made by ``encode``, in their order (forward passes of at most
        ``batch_tokens`` padded tokens, default ``self.batch_tokens``)."""
        if not groups:
            return []
        rewards = [group[0] for group in score_groups(self.model, groups, self.tokenizer.pad_token_id,
                                                      batch_tokens or self.batch_tokens)]
        return self.normalize(rewards) if normalize else rewards

    def normalize(self, rewards: list[float]) -> list[float]:
        """(r - reward_mean) / reward_std; ValueError for a model without recorded moments."""
        if not self.can_normalize:
            raise ValueError(f"this model has no reward_mean/reward_std in its {models.METADATA_FILE}: "
                             "it cannot normalize (train it with a dev set to record them)")
        return [(r - self.reward_mean) / self.reward_std for r in rewards]

    def compare(self, prompt: Prompt, replies: list[str]) -> dict:
        """Replies to one prompt against each other, under the Bradley-Terry model the reward
        model was trained with: P(i better than j) = sigmoid(r_i - r_j).

        Returns:
            A dict: `rewards` (K floats), `probabilities` (a K x K nested list, `[i][j]` =
            P(reply i better than reply j), 0.5 on the diagonal), `ranking` (reply indices,
            best first).
        """
        return compare_rewards(self.score([prompt] * len(replies), replies))

    def evaluate(self, file, reader: str = "auto", fields: dict | None = None, skip_invalid: bool = False,
                 nan_as_missing: bool = False, allow_empty: bool = False, **options) -> dict:
        """The metrics of ``chatrlhf reward eval`` on a file of pairs, rankings or scored samples.

        Args:
            file: a path (or ``datasets.Dataset``) that ``chatrlhf.data.load`` reads.
            reader, fields, skip_invalid, nan_as_missing, allow_empty, **options: as
                ``chatrlhf.data.load`` (and the ``reward eval`` options of the same names).
        Returns:
            {"groups", "pairs", "human_ties", "accuracy"} (pairwise accuracy against the human
            order; ties not counted), plus "best_vs_worst_accuracy" and "mean_kendall_tau" when
            some group has more than 2 replies, and "cut_replies". Each group's replies are cut
            to the same prompt tokens, as in training, so the accuracy equals the training run's.
        """
        loaded = load(file, reader=reader, fields=fields, skip_invalid=skip_invalid,
                      nan_as_missing=nan_as_missing, allow_empty=allow_empty, **options)
        print(loaded.summary(), file=sys.stderr)
        groups = to_groups(loaded.records, "comparisons")
        cut = tokenize_groups(groups, self.tokenizer, self.max_length, self.max_reply_tokens, same_prompt=True)
        rewards = score_groups(self.model, groups, self.tokenizer.pad_token_id, self.batch_tokens)
        result = metrics.summarize(rewards, [g.ranks for g in groups])
        result["cut_replies"] = cut
        return result


def compare_rewards(rewards: list[float]) -> dict:
    """Rewards of K replies -> {"rewards", "probabilities" (K x K, Bradley-Terry), "ranking"}."""
    probabilities = [[_sigmoid(a - b) for b in rewards] for a in rewards]
    ranking = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    return {"rewards": list(rewards), "probabilities": probabilities, "ranking": ranking}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---- TRL ------------------------------------------------------------------------------------

def reward_function(model_or_url: Union[RewardModel, str], normalize: bool = False,
                    api_key: str | None = None) -> Callable[..., list[float]]:
    """A reward model as a TRL reward function: ``GRPOTrainer(reward_funcs=reward_function(...))``.

    Args:
        model_or_url: a ``RewardModel``; a path or name for ``RewardModel.load``; or the URL of a
            ``chatrlhf serve`` server ("http://host:8000"), scored through ``RewardClient``.
        normalize: (r - mean) / std with the moments recorded at training.
        api_key: the server's key (default: $CHATRLHF_API_KEY); only for a URL.
    Returns:
        ``fn(prompts, completions, **kwargs) -> list[float]``, TRL's signature: prompts and
        completions are strings, or chat messages (a completion's assistant messages are joined;
        message contents may be lists of {"type": "text", "text": ...} parts). Other keyword
        arguments TRL passes (completion_ids, trainer_state, dataset columns) are ignored. An
        empty completion is scored like any other reply.
    """
    if isinstance(model_or_url, str) and model_or_url.startswith(("http://", "https://")):
        from chatrlhf.client import RewardClient

        client = RewardClient(model_or_url, api_key=api_key)
        scorer = lambda prompts, replies: client.score(prompts, replies, normalize=normalize)  # noqa: E731
    else:
        model = model_or_url if isinstance(model_or_url, RewardModel) else RewardModel.load(model_or_url)
        scorer = lambda prompts, replies: model.score(prompts, replies, normalize=normalize)  # noqa: E731

    def chatrlhf_reward(prompts: list, completions: list, **kwargs) -> list[float]:
        return scorer([_prompt(p) for p in prompts], [_completion(c) for c in completions])

    return chatrlhf_reward


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _prompt(prompt) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    return [{"role": m["role"], "content": _text(m["content"])} for m in prompt]


def _completion(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(_text(m["content"]) for m in completion if m.get("role", "assistant") == "assistant")


# ---- training -------------------------------------------------------------------------------

def train_reward(config: Config, overrides: dict | list[str] | None = None) -> dict:
    """Train a reward model, as ``chatrlhf reward train`` (recipes/reward.py).

    Args:
        config: a ``RewardConfig``, a dict of its sections ({"model": {...}, "data": {...},
            "loss": {...}, "train": {...}}), or a YAML preset's path.
        overrides: applied over ``config``: a nested dict, or ["train.lr=1e-4", ...].
    Returns:
        the final dev metrics (accuracy, pairs, reward_mean, reward_std, ...); {} without data.dev.
        The model is saved in ``train.output_dir``/model.
    """
    from chatrlhf.recipes import reward

    return reward.train(_config(cfg_lib.RewardConfig, config, overrides))


def train_sft(config: Config, overrides: dict | list[str] | None = None) -> dict:
    """Supervised fine-tuning, as ``chatrlhf sft`` (recipes/sft.py); ``config`` an ``SFTConfig``,
    a dict or a YAML path, as ``train_reward``. Returns the final dev loss and perplexity."""
    from chatrlhf.recipes import sft

    return sft.train(_config(sft.SFTConfig, config, overrides))


def train_dpo(config: Config, overrides: dict | list[str] | None = None, report: str | None = None) -> dict:
    """DPO (and cDPO, IPO, Plackett-Luce), as ``chatrlhf dpo`` (recipes/dpo.py); ``config`` a
    ``DPOConfig``, a dict or a YAML path, as ``train_reward``; ``report``: a folder for the
    report of the dev implicit rewards. Returns the final dev metrics."""
    from chatrlhf.recipes import dpo

    return dpo.train(_config(dpo.DPOConfig, config, overrides), report=report)


def train_ppo(config: Config, overrides: dict | list[str] | None = None,
              reward_fn: Union[RewardModel, Callable[[list, list[str]], list[float]], None] = None) -> dict:
    """PPO against a reward model, as ``chatrlhf ppo`` (recipes/ppo.py); ``config`` a
    ``PPOConfig``, a dict or a YAML path, as ``train_reward``.

    Args:
        reward_fn: instead of the config's reward source: a ``RewardModel`` or any
            ``fn(prompts, replies) -> rewards``.
    Returns:
        the last held-out evaluation (reward, reward_sem, kl, prompts); {} without data.dev.
    """
    from chatrlhf.recipes import ppo

    if isinstance(reward_fn, RewardModel):
        reward_fn = reward_fn.score
    return ppo.train(_config(ppo.PPOConfig, config, overrides), reward_fn=reward_fn)


def train_grpo(config: Config, overrides: dict | list[str] | None = None,
               reward_fns: list[Union[RewardModel, Callable[[list, list[str]], list[float]]]] | None = None) -> dict:
    """GRPO, Dr. GRPO, RLOO or REINFORCE++ (``grpo.algorithm``), as ``chatrlhf grpo``
    (recipes/grpo.py); ``config`` a ``GRPOConfig``, a dict or a YAML path, as ``train_reward``.

    Args:
        reward_fns: rewards added to the config's (weighted by ``reward.weights``, after them):
            ``RewardModel``s or ``fn(prompts, replies) -> rewards``.
    Returns:
        the last held-out evaluation (reward, reward_sem, judge, judge_sem, kl, prompts); {}
        without data.dev.
    """
    from chatrlhf.recipes import grpo

    functions = [fn.score if isinstance(fn, RewardModel) else fn for fn in reward_fns or []]
    return grpo.train(_config(cfg_lib.GRPOConfig, config, overrides), reward_fns=functions)


def _config(cls, config: Config, overrides: dict | list[str] | None):
    """A recipe's config from a dataclass, a dict or a YAML path, with overrides on top."""
    if isinstance(config, cls):
        if not overrides:
            return config
        config = cfg_lib.to_dict(config)
    if isinstance(config, dict):
        extra = cfg_lib.parse_overrides(overrides) if isinstance(overrides, list) else overrides or {}
        return cfg_lib.from_dict(cls, cfg_lib.merge(config, extra))
    if isinstance(config, (str, os.PathLike)):
        return cfg_lib.load(cls, config, overrides)
    raise TypeError(f"config: expected a {cls.__name__}, a dict or a YAML path, found {type(config).__name__}")

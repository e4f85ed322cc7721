"""chatrlhf: align chat models with human feedback, starting from a reward model trained on comparisons.

The Python API (``chatrlhf.api``) is imported on first use, so ``import chatrlhf`` stays light:

    import chatrlhf

    reward_model = chatrlhf.RewardModel.load("runs/reward/model")
    chatrlhf.train_reward({"data": {"train": "pairs.jsonl"}})
"""

__version__ = "0.3.4"

_API = ("RewardModel", "reward_function", "train_reward", "train_sft", "train_dpo", "train_ppo", "train_grpo")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from chatrlhf import api

        return getattr(api, name)
    raise AttributeError(f"module 'chatrlhf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

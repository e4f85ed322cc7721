"""Configs: presets load, overrides win, bad values are named."""

from pathlib import Path

import pytest

from chatrlhf import config
from chatrlhf.config import RewardConfig

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def config_class(preset: Path):
    """A preset's config class, from the recipe its name starts with (reward_..., dpo_...)."""
    import importlib

    recipe = preset.name.split("_")[0]
    module = importlib.import_module(f"chatrlhf.recipes.{recipe}")
    names = {"reward": "RewardConfig", "sft": "SFTConfig", "dpo": "DPOConfig", "ppo": "PPOConfig",
             "label": "LabelConfig"}
    return RewardConfig if recipe == "reward" else getattr(module, names[recipe])


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_loads(preset):
    loaded = config.load(config_class(preset), preset)
    assert loaded == config.from_dict(type(loaded), config.to_dict(loaded))  # a serialised config


def test_overrides_in_both_forms_win_over_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 1.0e-3\n  batch_size: 4\nmodel:\n  name: x\n")
    loaded = config.load(RewardConfig, preset, ["train.lr=2e-5", "--model.name", "y", "--train.bf16=true"])
    assert loaded.train.lr == 2e-5 and loaded.train.batch_size == 4
    assert loaded.model.name == "y" and loaded.train.bf16 is True


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected float, found 'fast'"),
    ("train.nope=1", "unknown config key(s) ['train.nope']"),
    ("loss.objective=pointwise", "expected one of ['comparisons', 'regression']"),
    ("train.batch_size=0", "train.batch_size: expected >= 1, found 0"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError) as error:
        config.load(RewardConfig, None, [override])
    assert message in str(error.value)

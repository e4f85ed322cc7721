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
    names = {"reward": "RewardConfig", "sft": "SFTConfig", "dpo": "DPOConfig", "ppo": "PPOConfig", "grpo": "GRPOConfig",
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


def test_a_removed_setting_says_when_and_what_to_do(tmp_path):
    preset = tmp_path / "old.yaml"
    preset.write_text("train:\n  compile: true\n")
    with pytest.raises(ValueError) as error:
        config.load(RewardConfig, preset)
    assert str(error.value).startswith("train.compile was removed in chatrlhf 0.2.0: ")
    assert str(error.value).endswith("(CHANGELOG.md)")


def test_a_renamed_setting_names_its_new_key(monkeypatch):
    monkeypatch.setitem(config.RENAMED, "loss.margin", ("loss.use_margin", "9.9", ""))
    with pytest.raises(ValueError) as error:
        config.load(RewardConfig, None, ["loss.margin=true", "train.lr=1e-4"])
    assert str(error.value) == "loss.margin was renamed to loss.use_margin in chatrlhf 9.9 (CHANGELOG.md)"
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['loss.other'\]"):  # others as before
        config.load(RewardConfig, None, ["loss.other=1"])


def test_flat_dict_gives_every_setting_under_its_dotted_key():
    flat = config.flat_dict(config.load(RewardConfig, None, ["data.fields={chosen: a}"]))
    assert flat["train.lr"] == 5e-5 and flat["data.fields.chosen"] == "a" and flat["data.dev"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())

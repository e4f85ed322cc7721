"""`train.log_with`: the numbers of metrics.jsonl also go to TensorBoard or Weights & Biases
(offline) through Accelerate's trackers."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatrlhf.cli import main
from conftest import read_metrics, separable_pairs, write_jsonl


def train(tmp_path, command: list[str], model: str, rows: list[dict], *extra: str) -> Path:
    out = tmp_path / "run"
    assert main([*command, f"model.name={model}", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
                 f"train.output_dir={out}", "model.max_length=48", "train.batch_size=8", "train.max_steps=3",
                 *extra]) == 0
    return out


def scalars(folder: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar in the TensorBoard events of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def logged_losses(out: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in read_metrics(out) if "loss" in entry}


def test_reward_losses_reach_tensorboard(tmp_path, tiny_bert):
    pytest.importorskip("tensorboard")
    out = train(tmp_path, ["reward", "train"], tiny_bert, separable_pairs(24, seed=1),
                "train.log_with=tensorboard")
    assert list((out / "reward").glob("events.out.tfevents.*"))  # the tracker's folder: output_dir/<recipe>
    expected = logged_losses(out)
    assert sorted(expected) == [1, 2, 3]
    assert scalars(out / "reward", "loss") == pytest.approx(expected, rel=1e-6)  # stored as float32


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_policy_losses_reach_tensorboard(tmp_path, tiny_llama, recipe):
    pytest.importorskip("tensorboard")
    rows = separable_pairs(24, seed=1)  # SFT trains on the chosen replies
    out = train(tmp_path, [recipe], tiny_llama, rows, "train.log_with=tensorboard")
    expected = logged_losses(out)
    assert sorted(expected) == [1, 2, 3]
    assert scalars(out / recipe, "loss") == pytest.approx(expected, rel=1e-6)


def test_wandb_offline_writes_a_local_run(tmp_path, tiny_bert, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_home").mkdir()
    train(tmp_path, ["reward", "train"], tiny_bert, separable_pairs(24, seed=1), "train.log_with=wandb")
    # The run's record is written by wandb's own service process, after the run has finished; it
    # is whole once the service stops (as at the command's exit).
    wandb.teardown()
    runs = list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads
    # The settings and the steps' numbers are in it (its records are protobuf, keys stored as text).
    assert b"train.lr" in record.read_bytes() and b"grad_norm" in record.read_bytes()

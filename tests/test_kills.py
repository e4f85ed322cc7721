"""`chatrlhf reward train` killed with SIGKILL and resumed, and stopped by non-finite values
(issue 10, items 1 and 2). Real subprocesses of the CLI on the tiny BERT of conftest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf import training
from conftest import separable_pairs, write_jsonl

STEPS = 12
# One thread per process: the result does not depend on it, and on a busy 2-core machine two
# OpenMP threads per process make a tiny model's backward a hundred times slower.
# Unbuffered: a SIGKILL must not take the "resumed from" lines still sitting in a stdout buffer.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def command(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "chatrlhf", "reward", "train", f"model.name={model}",
            f"data.train={data}", f"train.output_dir={out}", "model.max_length=48",
            "train.batch_size=4", "train.lr=2e-3", "train.warmup_ratio=0.1", f"train.max_steps={STEPS}",
            "train.save_every=1", "train.keep_checkpoints=2", "train.resume=true", *extra]


def logged_steps(out: Path) -> list[int]:
    file = out / "metrics.jsonl"
    if not file.exists():
        return []
    steps = []
    for line in file.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def staging_folders(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob(".step-*"))


def run_until(cmd: list[str], log: Path, killed_when, timeout: float = 120) -> bool:
    """Run ``cmd``; SIGKILL it the moment ``killed_when()`` holds. True if it was killed, False
    if it ended by itself (then it must have succeeded)."""
    with log.open("a") as stderr:
        process = subprocess.Popen(cmd, stdout=stderr, stderr=stderr, env=ENV)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if killed_when():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            assert time.monotonic() < deadline, "the run took too long"
            time.sleep(0.0005)
    assert process.returncode == 0, log.read_text()[-3000:]
    return False


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_the_same_model_bitwise(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(48, seed=11))
    whole = tmp_path / "whole"
    assert not run_until(command(tiny_bert, data, whole), tmp_path / "whole.log", lambda: False)

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    before: list[Path] = []  # staging folders when the run started: a kill mid-write may leave one

    def new_staging() -> list[Path]:
        return [p for p in staging_folders(out) if p not in before]

    kills = [
        # Mid-run: step 3 logged, its checkpoint being written or about to be.
        ("after step 3 was logged", lambda: len(logged_steps(out)) >= 3),
        # During a checkpoint write of this run: its staging folder exists, not yet renamed.
        ("during a checkpoint write", lambda: bool(new_staging())),
        ("after step 9 was logged", lambda: len(logged_steps(out)) >= 9),
    ]
    progress = []
    for moment, condition in kills:
        before = staging_folders(out)
        assert run_until(command(tiny_bert, data, out), log, condition), f"not killed {moment}"
        progress.append((moment, logged_steps(out), [p.name for p in new_staging()]))
    during_write = progress[1][2]
    assert during_write, f"the kill during a checkpoint write left no staging folder: {progress}"
    assert not run_until(command(tiny_bert, data, out), log, lambda: False)

    text = log.read_text()
    assert "ignoring 1 unfinished checkpoint folder(s)" in text and during_write[0] in text
    assert text.count("resumed from") == 3
    assert not staging_folders(out), "staging folders of killed writes are removed"
    # Every step logged exactly once: lines of steps done again after a resume are replaced.
    assert logged_steps(out) == list(range(1, STEPS + 1))
    losses = lambda folder: [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(out) == losses(whole)
    expected, found = weights(whole / "model"), weights(out / "model")
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), f"{name} differs after kills and resumes"


def test_truncated_weights_or_state_fall_back_to_the_previous_checkpoint(tmp_path, tiny_bert, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(24, seed=12))
    out = tmp_path / "run"
    assert not run_until(command(tiny_bert, data, out, "train.max_steps=3"), tmp_path / "log", lambda: False)
    newest, older = out / "checkpoints" / "step-0000003", out / "checkpoints" / "step-0000002"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    (out / "checkpoints" / ".step-0000004-abc").mkdir()  # a write killed before its rename
    assert training.latest_checkpoint(out) == older
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err and ".step-0000004-abc" in err
    (older / training.STATE_FILE).write_bytes(b"")
    assert training.latest_checkpoint(out) is None
    assert "step-0000002 is unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("objective, row, setting", [
    # Finite in the file (float64), infinite once a float32 tensor: the loss becomes inf.
    ("comparisons", {"prompt": "the a", "chosen": "good", "rejected": "bad", "margin": 1e300},
     "loss.use_margin=true"),
    ("regression", {"kind": "scored", "prompt": "the a", "reply": "good", "score": -1e300},
     "loss.objective=regression"),
])
def test_non_finite_loss_stops_with_step_and_records_and_keeps_the_last_checkpoint(
        tmp_path, tiny_bert, objective, row, setting):
    if objective == "comparisons":
        rows = [{**r, "margin": 0.5} for r in separable_pairs(23, seed=13)]
    else:
        rows = [{"kind": "scored", "prompt": r["prompt"], "reply": reply, "score": float(score)}
                for r in separable_pairs(23, seed=13) for reply, score in ((r["chosen"], 1), (r["rejected"], 0))]
    bad_line = len(rows) // 2
    rows.insert(bad_line, row)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out, log = tmp_path / "run", tmp_path / "log"
    cmd = command(tiny_bert, data, out, setting, "train.max_steps=100", "train.epochs=1")
    with log.open("w") as stderr:
        returncode = subprocess.run(cmd, stdout=stderr, stderr=stderr, env=ENV).returncode
    text = log.read_text()
    assert returncode == 2 and "error: non-finite loss inf" in text, text[-2000:]
    message = text[text.index("error: non-finite"):]
    step = int(message.split(" at step ")[1].split(",")[0])
    assert f"record {bad_line} (prompt 'the a')" in message and data in message
    assert not (out / "model").exists(), "no final model from a failed run"
    # Steps 1 .. step-1 finished and were checkpointed; the newest is intact and loads.
    assert logged_steps(out) == list(range(1, step))
    if step > 1:
        last = training.latest_checkpoint(out)
        assert last == out / "checkpoints" / f"step-{step - 1:07d}"
        assert all(torch.isfinite(t).all() for t in weights(last).values())

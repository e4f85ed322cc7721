"""`chatrlhf reward train` under `accelerate launch` with 2 processes on the CPU (gloo) gives the
result of one process with the same global batch (issue 10, item 3), and every shipped
accelerate config loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import separable_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu_2proc.yaml": ("MULTI_GPU", None), "ddp.yaml": ("MULTI_GPU", None),
                "fsdp.yaml": ("FSDP", None), "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
                "deepspeed_zero3.yaml": ("DEEPSPEED", 3)}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, stage) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert config.distributed_type.value == kind, name
        assert (config.deepspeed_config or {}).get("zero_stage") == stage, name
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_and_two_processes(tmp_path, command: str, settings: list[str]) -> tuple[Path, Path]:
    """Run ``chatrlhf COMMAND settings`` in one process and under ``accelerate launch`` with two
    (cpu_2proc.yaml); returns the two output folders (tmp_path/one, tmp_path/two)."""
    one, two = tmp_path / "one", tmp_path / "two"
    runs = {
        one: [sys.executable, "-m", "chatrlhf", command, f"train.output_dir={one}", *settings],
        two: [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
              "--main_process_port", str(free_port()), "-m", "chatrlhf", command, f"train.output_dir={two}", *settings],
    }
    for out, cmd in runs.items():
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        print(f"{out.name}: {time.perf_counter() - started:.1f} s")
    assert "2 processes (MULTI_CPU on cpu)" in done.stdout
    return one, two


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path, tiny_bert):
    # 46 groups in batches of 5: nine batches split 3 + 2 between the processes, and a last
    # batch of one group that process 1 runs at weight 0. grad_accum=2 goes through no_sync.
    data = write_jsonl(tmp_path / "train.jsonl", separable_pairs(46, seed=21))
    settings = [f"model.name={tiny_bert}", f"data.train={data}", "model.max_length=48",
                "train.batch_size=5", "train.grad_accum=2", "train.max_steps=5", "train.lr=2e-3",
                "train.warmup_ratio=0.0", "train.save_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    runs = {
        one: [sys.executable, "-m", "chatrlhf", "reward", "train", f"train.output_dir={one}", *settings],
        two: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
              "-m", "chatrlhf", "reward", "train", f"train.output_dir={two}", *settings],
    }
    for out, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (MULTI_CPU on cpu)" in done.stdout

    logs = [[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] for out in (one, two)]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4, 5], "logged once, by the main process"
    # The loss of the whole global batch, the same up to the order of float sums.
    for a, b in zip(*logs):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]
    assert (two / "checkpoints" / "step-0000004").is_dir()

    expected, found = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in expected:
        difference = (expected[name] - found[name]).abs().max().item()
        # The head's bias has no gradient under a pairwise loss (it cancels in r_c - r_r):
        # Adam turns rounding noise into lr-sized steps there; it shifts every reward alike.
        assert difference < (1e-2 if name == "classifier.bias" else 1e-4), f"{name}: {difference}"
    # What a user checks: reward differences (what the loss sees) agree.
    tokenizer = AutoTokenizer.from_pretrained(one / "model")
    rows = separable_pairs(16, seed=22)
    margins = []
    for out in (one, two):
        model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
        batch = tokenizer([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                          padding=True, return_tensors="pt")
        with torch.no_grad():
            rewards = model(**batch).logits[:, 0]
        margins.append(rewards[:16] - rewards[16:])
    torch.testing.assert_close(margins[1], margins[0], atol=1e-4, rtol=0)
    assert margins[0].abs().max() > 1e-3, "the models should have learnt something"

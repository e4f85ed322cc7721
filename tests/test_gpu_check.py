"""bench/gpu_check.py, the GPU check, as a smoke test on the CPU: tiny models built by the script,
every recipe run through the real CLI in its own process, one table row per run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_recipe_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = done.stdout[done.stdout.index("recipe  config"):]
    rows = {(m[1], m[2]): m[3] for m in re.finditer(r"^(reward|sft|dpo|ppo)\s+(CPU|FSDP2 x1)\s+(.*)$",
                                                    table, re.MULTILINE)}
    assert set(rows) == {(r, "CPU") for r in ("reward", "sft", "dpo", "ppo")} | {("reward", "FSDP2 x1"),
                                                                                  ("sft", "FSDP2 x1")}
    for recipe in ("reward", "sft", "dpo", "ppo"):
        # steps, a median step time in seconds, peak GPU memory n/a on the CPU, status ok
        assert re.search(r"\s3\s+\d+\.\d{3}\s+n/a\s+ok$", rows[recipe, "CPU"]), rows[recipe, "CPU"]
        assert (tmp_path / "runs" / f"{recipe}-single" / "model" / "config.json").exists()
    for recipe in ("reward", "sft"):
        assert rows[recipe, "FSDP2 x1"].endswith("skipped: needs a GPU")

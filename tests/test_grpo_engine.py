"""`chatrlhf grpo` under `accelerate launch` with 2 processes on the CPU (gloo) gives the run of one
process: the same replies (each drawn with its own seed), the same advantages (the rollout gathered
on every process), the same losses and metrics (each process's share of a micro-batch weighed into
the rollout's loss) and the same trained policy."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import separable_pairs, write_jsonl
from test_scale_out import one_and_two_processes


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder) -> dict:
    """The saved weights: the LoRA adapter's where there is one."""
    adapter = folder / "adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    # LoRA (reference: the adapter off), two iterations reuse the first one's log-probabilities
    ["grpo.algorithm=grpo", "policy.lora_r=4", "grpo.num_iterations=2"],
    # the KL in the rewards (sampling-time log-probabilities before any update), batch whitening,
    # a frozen reference copy, full fine-tuning
    ["grpo.algorithm=reinforce_pp"],
], ids=["grpo-lora", "reinforce_pp-full"])
def test_two_cpu_processes_match_one_process(tmp_path, tiny_llama, settings):
    # 3 prompts x 2 replies a step: 2 + 1 groups per process. grad_accum=2 makes micro-batches
    # of 2 groups (1 + 1) and 1 group, where process 1 has none and runs one at weight 0. Held-out:
    # 5 prompts (3 + 2 per process) at steps 0 and 2, judged by a second function.
    train, dev = (write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, 0)),
                  write_jsonl(tmp_path / "dev.jsonl", separable_pairs(16, 1)))
    common = [f"policy.name={tiny_llama}", f"data.train={train}", f"data.dev={dev}", "data.dev_limit=5",
              "reward.functions=[count:good]", "eval.judge=count:bad", "generation.max_new_tokens=6",
              "grpo.prompts_per_step=3", "grpo.group_size=2", "grpo.beta=0.1", "train.grad_accum=2",
              "train.steps=2", "train.lr=2e-2", "train.sample_every=1", "train.samples=6", *settings]
    one, two = one_and_two_processes(tmp_path, "grpo", common)

    logs = [rows(out / "metrics.jsonl") for out in (one, two)]
    assert [e["step"] for e in logs[1]] == [0, 1, 2], "logged once per step, by the main process"
    for a, b in zip(*logs):
        for key in ("reward", "reward_group_std", "zero_signal", "loss", "clip_fraction", "entropy", "kl",
                    "response_length", "grad_norm", "eval_reward", "eval_judge", "eval_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert all("kl" in e for e in logs[0][1:]) and "eval_judge" in logs[0][0]
    for name, count in (("samples.jsonl", 12), ("eval_samples.jsonl", 10)):
        replies = [[(r["step"], r["reply"], r["score"]) for r in rows(out / name)] for out in (one, two)]
        assert replies[0] == replies[1] and len(replies[0]) == count, name
    assert (two / "checkpoints" / "step-0000002" / "trainer_state.pt").is_file()

    expected, found = weights(one / "model"), weights(two / "model")
    assert expected.keys() == found.keys()
    for name in expected:
        assert found[name].float().allclose(expected[name].float(), rtol=1e-4, atol=1e-5), name

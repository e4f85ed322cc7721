"""`chatrlhf ppo` under `accelerate launch` with 2 processes on the CPU (gloo) gives the run of one
process: the same replies (each prompt's reply sampled with its own seed), the same losses (token
means over the whole minibatch, gathered rollout) and the same trained policy."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import separable_pairs, write_jsonl
from test_scale_out import one_and_two_processes


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path, tiny_llama):
    # 9 prompts: 5 + 4 per process. Minibatches of 3 in grad_accum=2 micro-batches of 2 + 1: in
    # the second, process 1 has no reply and runs one at weight 0. 5 held-out prompts: 3 + 2.
    train, dev = (write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, 0)),
                  write_jsonl(tmp_path / "dev.jsonl", separable_pairs(16, 1)))
    settings = [f"policy.name={tiny_llama}", f"data.train={train}", f"data.dev={dev}", "data.dev_limit=5",
                "reward.function=count:good", "generation.max_new_tokens=6", "ppo.rollout_prompts=9",
                "ppo.minibatch_size=3", "train.grad_accum=2", "train.steps=2", "train.lr=1e-3",
                "train.critic_lr=1e-3", "train.sample_every=1", "train.samples=9"]
    one, two = one_and_two_processes(tmp_path, "ppo", settings)

    logs = [rows(out / "metrics.jsonl") for out in (one, two)]
    assert [e["step"] for e in logs[1]] == [0, 1, 2], "logged once per step, by the main process"
    for a, b in zip(*logs):
        for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "explained_variance",
                    "grad_norm", "critic_grad_norm", "eval_reward", "eval_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for name in ("samples.jsonl", "eval_samples.jsonl"):
        replies = [[(r["step"], r["reply"]) for r in rows(out / name)] for out in (one, two)]
        assert replies[0] == replies[1] and len(replies[0]) == {"samples.jsonl": 18, "eval_samples.jsonl": 10}[name]
    assert (two / "checkpoints" / "step-0000002" / "trainer_state.pt").is_file()

    expected, found = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    start = load_file(f"{tiny_llama}/model.safetensors")
    assert any((expected[name] - start[name]).abs().max() > 1e-3 for name in start), "the policy should have trained"
    for name in expected:
        difference = (expected[name] - found[name]).abs().max().item()
        assert difference < 1e-4, f"{name}: {difference}"

"""`chatrlhf grpo` end to end on tiny models built in the tests: the reward goes up, resume is exact,
beta = 0 runs no reference forward, every algorithm runs, the shared prompt cache samples exactly
the replies of plain generation, several rewards add up with their weights, Python reward
functions load by name (for PPO too), and the held-out judge is reported beside the reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import separable_pairs, write_jsonl

from chatrlhf import cli, sampling, sharing
from chatrlhf import config as cfg_lib
from chatrlhf.config import GRPOConfig
from chatrlhf.policy import load_policy
from chatrlhf.recipes import grpo, ppo
from test_ppo import reward_model  # noqa: F401 (a fixture: tiny_bert saved as `reward train` saves it)

REPO = Path(__file__).resolve().parents[1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path) -> tuple[str, str]:
    return (write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, 0)),
            write_jsonl(tmp_path / "dev.jsonl", separable_pairs(16, 1)))


def base_args(tiny_llama, prompts, out, *extra) -> list[str]:
    return ["grpo", f"policy.name={tiny_llama}", f"data.train={prompts[0]}", f"data.dev={prompts[1]}",
            "data.dev_limit=8", f"train.output_dir={out}", "generation.max_new_tokens=6", "grpo.prompts_per_step=4",
            "grpo.group_size=4", "train.lr=2e-2", "reward.functions=[count:good]", *extra]


def config_of(tiny_llama, prompts, out, **sections) -> GRPOConfig:
    values = {"policy": {"name": tiny_llama}, "data": {"train": prompts[0]}, "reward": {"functions": ["count:good"]},
              "generation": {"max_new_tokens": 6}, "grpo": {"prompts_per_step": 4, "group_size": 4},
              "train": {"output_dir": str(out), "steps": 2, "lr": 2e-2, "sample_every": 0}}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section}
    return cfg_lib.from_dict(GRPOConfig, values)


@pytest.mark.slow
def test_grpo_raises_a_rule_based_reward(tiny_llama, prompts, tmp_path):
    """Reward = how often "good" is in the reply (1/70 of the vocabulary at the start)."""
    out = tmp_path / "run"
    assert cli.main(base_args(tiny_llama, prompts, out, "grpo.prompts_per_step=8", "train.steps=10",
                              "train.eval_every=0", "train.sample_every=5", "eval.judge=count:the")) == 0
    log = rows(out / "metrics.jsonl")
    steps = [r for r in log if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert sum(r["reward"] for r in steps[-3:]) / 3 > sum(r["reward"] for r in steps[:3]) / 3 + 0.5
    for key in ("reward_std", "reward_group_std", "zero_signal", "entropy", "clip_fraction", "response_length",
                "time_generation", "time_scoring", "time_training"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    assert "kl" not in steps[0]  # beta = 0 and no LoRA: no reference at all
    assert all(0 <= r["zero_signal"] <= 1 and r["zero_signal_groups"] == round(r["zero_signal"] * 8) for r in steps)
    evals = [r for r in log if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 10]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"]
    held_out = rows(out / "eval_samples.jsonl")
    assert [s["step"] for s in held_out] == [0] * 8 + [10] * 8
    assert all(s["score"] == s["reply"].split().count("good") for s in held_out)
    assert all(s["judge"] == s["reply"].split().count("the") for s in held_out)  # the second judge
    assert sum(s["judge"] for s in held_out[8:]) / 8 == pytest.approx(evals[-1]["eval_judge"])
    samples = rows(out / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 5, 10}
    assert all(s["score"] == s["reply"].split().count("good") for s in samples)
    assert (out / "curves.png").stat().st_size > 1000
    trained, _ = load_policy(str(out / "model"))
    start, _ = load_policy(tiny_llama)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


@pytest.mark.slow
@pytest.mark.parametrize("lora_r,beta,iterations", [(0, 0.0, 1), (4, 0.05, 2)])
def test_resume_continues_exactly(tiny_llama, prompts, tmp_path, lora_r, beta, iterations):
    args = base_args(tiny_llama, prompts, tmp_path / "whole", "train.steps=4", "train.save_every=2", "train.eval_every=0",
                     "data.dev=null", f"policy.lora_r={lora_r}", f"grpo.beta={beta}", f"grpo.num_iterations={iterations}")
    assert cli.main(args) == 0
    whole = rows(tmp_path / "whole" / "metrics.jsonl")
    # A run killed after its step-2 checkpoint, then resumed.
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    (tmp_path / "whole" / "checkpoints" / "step-0000002").rename(tmp_path / "cut" / "checkpoints" / "step-0000002")
    args[args.index(f"train.output_dir={tmp_path / 'whole'}")] = f"train.output_dir={tmp_path / 'cut'}"
    assert cli.main([*args, "train.resume=true"]) == 0
    resumed = rows(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(whole[2:], resumed):
        for key in ("reward", "loss", "clip_fraction", "entropy", "grad_norm", *(("kl",) if beta else ())):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("lora_r", [0, 4])
def test_beta_zero_runs_no_reference_forward(tiny_llama, prompts, tmp_path, monkeypatch, lora_r):
    """beta = 0: one policy forward per step (num_iterations 1, the sampling-time log-probabilities
    are its own, detached), no reference pass and, without LoRA, no reference model loaded.
    beta > 0: one reference pass more."""
    calls = []
    real = sharing.policy_logps
    monkeypatch.setattr(sharing, "policy_logps", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k))
    for beta, expected in ((0.0, [True]), (0.1, [False, True])):
        run = grpo.setup(config_of(tiny_llama, prompts, tmp_path / str(beta), grpo={"beta": beta},
                                   policy={"lora_r": lora_r}))
        assert (run.reference is None) == (beta == 0 or lora_r > 0)
        items = run.train_items[:4]
        batch = grpo.rollout(run, items, 4, list(range(16)))
        calls.clear()
        entry = grpo.grpo_step(run, batch, 0)
        assert calls == expected, beta
        assert ("kl" in entry) == (beta > 0)


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_every_algorithm_takes_a_step(tiny_llama, prompts, tmp_path, algorithm):
    run = grpo.setup(config_of(tiny_llama, prompts, tmp_path, grpo={"algorithm": algorithm, "beta": 0.05},
                               policy={"lora_r": 4}))
    batch = grpo.rollout(run, run.train_items[:4], 4, list(range(16)))
    batch.scores = torch.arange(16.0) % 3  # a signal in every group
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters() if p.requires_grad}
    entry = grpo.grpo_step(run, batch, 0)
    assert entry["zero_signal"] == 0 and entry["kl"] == pytest.approx(0.0, abs=1e-5)  # starts as the reference
    assert any(not torch.equal(p, before[n]) for n, p in run.policy.named_parameters() if p.requires_grad)


def test_grad_accum_does_not_change_the_update(tiny_llama, prompts, tmp_path):
    """train.grad_accum=2 runs each rollout as two micro-batches of whole groups: the loss's
    denominators are the whole rollout's, so the update is that of grad_accum=1."""
    entries, weights = [], []
    for accum in (1, 2):
        run = grpo.setup(config_of(tiny_llama, prompts, tmp_path / str(accum), grpo={"algorithm": "grpo"},
                                   train={"grad_accum": accum}))
        batch = grpo.rollout(run, run.train_items[:4], 4, list(range(16)))
        batch.scores = torch.arange(16.0) % 3
        entries.append(grpo.grpo_step(run, batch, 0))
        weights.append({n: p.detach().clone() for n, p in run.policy.named_parameters()})
    for key in ("loss", "grad_norm", "entropy"):
        assert entries[1][key] == pytest.approx(entries[0][key], rel=1e-5, abs=1e-6), key
    for name, value in weights[0].items():  # Adam's step is lr * g / (|g| + eps): a weight whose
        # gradient is near 0 moves by a float32 rounding-sized amount that Adam scales up; 1e-5 is
        # 1/2000 of a step at lr 2e-2
        torch.testing.assert_close(weights[1][name], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_shared_prompt_cache_samples_the_plain_replies(tiny_llama, prompts, tmp_path, lora):
    """The prompts' KV cache computed once and repeated K times gives the replies of generating
    from K copies of each prompt, with the same seeds (and greedy); so does generate() itself."""
    model, tokenizer = load_policy(tiny_llama, lora=lora)
    if lora:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    items = ppo.load_prompts(prompts[0], config_of(tiny_llama, prompts, tmp_path), tokenizer, 5, print)
    assert len({len(item.input_ids) for item in items}) > 1  # left padding is used
    prompt_ids = [item.input_ids for item in items]
    for seeds in (list(range(100, 120)), None):
        options = (4, seeds, tokenizer.pad_token_id, [2], 8, 0.9, 0.95)
        plain = sampling.sample(model, prompt_ids, *options, share_cache=False)
        shared = sampling.sample(model, prompt_ids, *options, share_cache=True)
        assert shared[0] == plain[0] and torch.equal(shared[1], plain[1])
        ids, mask = sampling.left_pad(prompt_ids, tokenizer.pad_token_id)
        through_generate = sampling._generate(model, ids, mask, *options)
        assert through_generate[0] == plain[0] and torch.equal(through_generate[1], plain[1])
    assert len({tuple(r) for r in plain[0][:4]}) == 1  # greedy: a group's K replies are equal
    sampled = sampling.sample(model, prompt_ids, 4, list(range(20)), tokenizer.pad_token_id, [2], 8, 0.9, 0.95)[0]
    assert len({tuple(r) for r in sampled[:4]}) > 1  # sampled: they differ


def test_several_rewards_with_weights(tiny_llama, prompts, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, replies):\n    return [float(len(r.split())) for r in replies]\n")
    (tmp_path / "other.py").write_text("def has_a(prompts, replies):\n    return [float('a' in r.split()) for r in replies]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert cli.main(base_args(tiny_llama, prompts, out, "data.dev=null", "train.steps=1", "train.samples=16",
                              f"reward.functions=[count:good, my_rewards:length, {tmp_path / 'other.py'}:has_a]",
                              "reward.weights=[2.0, 0.5, -1.0]")) == 0
    for s in rows(out / "samples.jsonl"):
        words = s["reply"].split()
        assert s["score"] == pytest.approx(2 * words.count("good") + 0.5 * len(words) - float("a" in words))
    entry = rows(out / "metrics.jsonl")[0]
    assert {"reward/count:good", "reward/my_rewards:length"} <= set(entry)
    assert cli.main(base_args(tiny_llama, prompts, tmp_path / "bad", "reward.weights=[1, 2]")) == 2


def test_reward_function_names(tmp_path, monkeypatch, capsys, tiny_llama, prompts):
    """PPO's reward.function and GRPO's reward.functions read the same names."""
    assert ppo.reward_function("count:good")(["p", "p"], ["good good x", "bad"]) == [2.0, 0.0]
    (tmp_path / "rules.py").write_text("def ones(prompts, replies):\n    return [1.0] * len(replies)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ppo.reward_function("rules:ones")(["p"], ["r"]) == [1.0]
    assert ppo.reward_function(f"{tmp_path / 'rules.py'}:ones")(["p"], ["r"]) == [1.0]
    for bad, message in (("length", "module:function"), ("rules:twos", "no function"), ("nowhere:f", "cannot import")):
        with pytest.raises(ValueError, match=message):
            ppo.reward_function(bad)
    out = tmp_path / "ppo"  # PPO takes the module syntax
    assert cli.main(["ppo", f"policy.name={tiny_llama}", f"data.train={prompts[0]}", f"train.output_dir={out}",
                     "generation.max_new_tokens=4", "ppo.rollout_prompts=4", "ppo.minibatch_size=4", "train.steps=1",
                     "reward.function=rules:ones", "train.sample_every=1"]) == 0
    assert {s["score"] for s in rows(out / "samples.jsonl")} == {1.0}
    assert cli.main(["grpo", f"policy.name={tiny_llama}", f"data.train={prompts[0]}",
                     f"train.output_dir={tmp_path / 'none'}"]) == 2
    assert "no reward" in capsys.readouterr().err


def test_shipped_preset_loads():
    config = cfg_lib.load(GRPOConfig, REPO / "configs" / "grpo_hh_smollm2.yaml")
    assert config.policy.name == "smollm2-135m" and config.policy.lora_r == 16
    assert config.data.train.endswith("harmless-base/train.jsonl.gz")
    assert config.reward.model == cfg_lib.load(ppo.PPOConfig, REPO / "configs" / "ppo_hh_smollm2.yaml").reward.model
    assert config.eval.judge


def test_reward_from_a_scoring_server_and_a_model_judge(tiny_llama, prompts, reward_model, tmp_path):
    """--reward-url scores with a `chatrlhf serve` server; eval.judge takes a reward model folder.
    Both give the scores a user would get from the model directly."""
    from conftest import running
    from test_ppo import scorer_of

    from chatrlhf.serve import create_app

    out = tmp_path / "run"
    with running(create_app(reward_model)) as url:
        assert cli.main([*base_args(tiny_llama, prompts, out, "train.steps=1", "train.samples=16", "reward.functions=[]",
                                    f"eval.judge={reward_model}"), "--reward-url", url]) == 0
    score = scorer_of(reward_model, 48)
    samples = rows(out / "samples.jsonl")
    assert [s["score"] for s in samples] == pytest.approx(score([s["prompt"] for s in samples],
                                                                [s["reply"] for s in samples]), abs=1e-4)
    held_out = rows(out / "eval_samples.jsonl")
    assert [s["judge"] for s in held_out] == pytest.approx(score([s["prompt"] for s in held_out],
                                                                 [s["reply"] for s in held_out]), abs=1e-4)

"""`chatrlhf ppo` end to end on tiny models built in the tests: the reward goes up, left padding and
EOS masking are right, resume is exact, a LoRA run leaves the base weights (the reference)
bit-equal, gradient accumulation does not change the update, and every reward source (rule, saved
reward model with another tokenizer, scoring server) gives the scores a user would get from it
directly. 1 against 2 processes: test_ppo_engine.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import running, separable_pairs, write_jsonl

from chatrlhf import cli, models, sampling
from chatrlhf import config as cfg_lib
from chatrlhf.data.batching import Group, tokenize_groups
from chatrlhf.policy import load_policy
from chatrlhf.recipes import ppo
from chatrlhf.recipes.reward import score_groups
from chatrlhf.serve import create_app

REPO = Path(__file__).resolve().parents[1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path) -> tuple[str, str]:
    return (write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, 0)),
            write_jsonl(tmp_path / "dev.jsonl", separable_pairs(16, 1)))


def base_args(tiny_llama, prompts, out) -> list[str]:
    return ["ppo", f"policy.name={tiny_llama}", f"data.train={prompts[0]}", f"data.dev={prompts[1]}",
            "data.dev_limit=16", f"train.output_dir={out}", "generation.max_new_tokens=6",
            "ppo.rollout_prompts=16", "ppo.minibatch_size=8", "train.lr=1e-2", "train.critic_lr=1e-2"]


@pytest.mark.slow
def test_ppo_raises_a_rule_based_reward(tiny_llama, prompts, tmp_path):
    """Reward = how often "good" is in the reply (1/70 of the vocabulary at the start)."""
    out = tmp_path / "run"
    assert cli.main([*base_args(tiny_llama, prompts, out), "reward.function=count:good", "train.steps=10",
                     "train.eval_every=0", "train.sample_every=5"]) == 0
    log = rows(out / "metrics.jsonl")
    steps = [r for r in log if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    first, last = steps[:3], steps[-3:]
    assert sum(r["reward"] for r in last) / 3 > sum(r["reward"] for r in first) / 3 + 1.0
    evals = [r for r in log if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 10]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 1.0
    assert evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert evals[-1]["eval_kl"] > 0.5
    for key in ("kl", "entropy", "clip_fraction", "value_loss", "explained_variance", "response_length"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert all(0 < r["response_length"] <= 6 for r in steps)
    samples = rows(out / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 5, 10}
    assert all(s["score"] == s["reply"].split().count("good") for s in samples)
    held_out = rows(out / "eval_samples.jsonl")
    assert [s["step"] for s in held_out] == [0] * 16 + [10] * 16
    assert all(s["score"] == s["reply"].split().count("good") for s in held_out)
    assert sum(s["score"] for s in held_out[16:]) / 16 == pytest.approx(evals[-1]["eval_reward"])
    assert (out / "curves.png").stat().st_size > 1000
    trained, _ = load_policy(str(out / "model"))
    start, _ = load_policy(tiny_llama)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_continues_exactly(tiny_llama, prompts, tmp_path, lora_r):
    args = [*base_args(tiny_llama, prompts, tmp_path / "whole"), "reward.function=count:good", "train.steps=4",
            "train.save_every=2", "train.eval_every=0", "data.dev=null", f"policy.lora_r={lora_r}"]
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
        for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "kl_coef"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_lora_reference_stays_the_starting_policy(tiny_llama, prompts, tmp_path):
    """With LoRA the reference is the policy with its adapter off, so the frozen base weights must
    stay bit-equal to the starting ones for the whole run: merging the adapter into them for each
    rollout and unmerging it after (W + BA - BA) drifts them by rounding, step after step."""
    config = cfg_lib.load(ppo.PPOConfig, None, {
        "policy": {"name": tiny_llama, "lora_r": 4, "lora_alpha": 64}, "data": {"train": prompts[0]},
        "reward": {"function": "count:good"}, "generation": {"max_new_tokens": 6},
        "ppo": {"rollout_prompts": 8, "minibatch_size": 4},
        "train": {"output_dir": str(tmp_path), "steps": 3, "lr": 1e-2, "sample_every": 0}})
    run = ppo.setup(config)
    start = {name: p.detach().clone() for name, p in run.policy.named_parameters()}
    ppo.fit(run)
    frozen = {name: p for name, p in run.policy.named_parameters() if not p.requires_grad}
    assert len(frozen) > 10
    assert [name for name, p in frozen.items() if not torch.equal(p, start[name])] == []
    assert any(not torch.equal(p, start[name]) for name, p in run.policy.named_parameters() if "lora_B" in name)


def test_grad_accum_splits_a_minibatch_without_changing_the_update(tiny_llama, prompts, tmp_path):
    """train.grad_accum=2 runs each minibatch of 8 replies as two micro-batches of 4: the losses
    are token means over the whole minibatch, so the run is the one of grad_accum=1."""
    logs, weights = [], []
    for grad_accum in (1, 2):
        out = tmp_path / f"accum{grad_accum}"
        assert cli.main([*base_args(tiny_llama, prompts, out), "reward.function=count:good", "train.steps=2",
                         "data.dev=null", f"train.grad_accum={grad_accum}"]) == 0
        logs.append(rows(out / "metrics.jsonl"))
        weights.append(load_policy(str(out / "model"))[0].state_dict())
    for a, b in zip(*logs):
        for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-5, rtol=0)


def test_reply_mask_stops_at_the_first_stop_token():
    reply_ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 9, 9, 3], [2, 2, 2, 2]])
    mask, ended = sampling.reply_mask(reply_ids, [2, 3])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_left_padded_log_probs_equal_unpadded_ones(tiny_llama, prompts, tmp_path, lora_r):
    """Each reply's log-probabilities in the padded batch equal those of the same prompt + reply
    run alone, and nothing after the first EOS counts. With LoRA (a trained adapter) the
    reference is the model with the adapter off."""
    config = cfg_lib.load(ppo.PPOConfig, None, {
        "policy": {"name": tiny_llama, "lora_r": lora_r}, "data": {"train": prompts[0]},
        "reward": {"function": "count:good"}, "generation": {"max_new_tokens": 12},
        "train": {"output_dir": str(tmp_path)}})
    run = ppo.setup(config)
    if lora_r:
        assert run.reference is None
        with torch.no_grad():
            for name, param in run.policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)  # an adapter that changes the model
    items = run.train_items[:8]
    assert len({len(i.input_ids) for i in items}) > 1  # prompts of several lengths: padding is used
    rollout = ppo.generate(run, items, list(range(len(items))))
    eos = run.tokenizer.eos_token_id
    for row, item in enumerate(items):
        n = int(rollout.mask[row].sum())
        reply = rollout.input_ids[row, rollout.prompt_width:rollout.prompt_width + n]
        assert eos not in reply[:-1].tolist()
        assert bool(rollout.ended[row]) == (reply[-1].item() == eos)
        ids = torch.tensor([item.input_ids + reply.tolist()])
        alone, _ = ppo.policy_forward(run.policy, ids, torch.ones_like(ids), len(item.input_ids), 1.0)
        torch.testing.assert_close(rollout.logps[row, :n], alone[0], atol=1e-5, rtol=1e-5)
        if lora_r:
            start, _ = load_policy(tiny_llama)
            reference, _ = ppo.policy_forward(start, ids, torch.ones_like(ids), len(item.input_ids), 1.0)
            torch.testing.assert_close(rollout.reference_logps[row, :n], reference[0], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(rollout.logps[row, :n], rollout.reference_logps[row, :n], atol=1e-3)
        assert rollout.replies[row] == run.tokenizer.decode(reply, skip_special_tokens=True).strip()


def scorer_of(model_dir: str, max_length: int):
    """Rewards as `chatrlhf reward score` computes them."""
    model, tokenizer = models.load_reward_model(model_dir)

    def rewards(prompt_list, replies):
        groups = [Group(p, [r], [0]) for p, r in zip(prompt_list, replies)]
        tokenize_groups(groups, tokenizer, max_length)
        return [g[0] for g in score_groups(model, groups, tokenizer.pad_token_id)]
    return rewards


@pytest.fixture(scope="module")
def reward_model(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert (a BERT tokenizer, not the policy's) with chatrlhf.json, as `reward train` saves it."""
    import shutil

    folder = tmp_path_factory.mktemp("ppo_reward") / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / models.METADATA_FILE).write_text(json.dumps({"max_length": 48}))
    return str(folder)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses an Accelerator with another mixed
    precision than the first one's: a bf16 run after float32 ones in the same pytest process
    needs it reset (`chatrlhf ppo` runs once per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_reward_model_with_another_tokenizer(tiny_llama, prompts, reward_model, tmp_path, fresh_accelerate_state):
    out = tmp_path / "run"
    assert cli.main([*base_args(tiny_llama, prompts, out), f"reward.model={reward_model}", "train.steps=2",
                     "train.sample_every=1", "train.samples=16", "data.dev=null", "train.bf16=true"]) == 0
    samples = rows(out / "samples.jsonl")
    expected = scorer_of(reward_model, 48)([s["prompt"] for s in samples], [s["reply"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert "reward_inputs_cut" in rows(out / "metrics.jsonl")[-1]


def test_reward_from_a_scoring_server(tiny_llama, prompts, reward_model, tmp_path):
    out = tmp_path / "run"
    with running(create_app(reward_model)) as url:
        assert cli.main([*base_args(tiny_llama, prompts, out), "--reward-url", url, "train.steps=1",
                         "train.samples=16", "data.dev=null"]) == 0
    samples = rows(out / "samples.jsonl")
    expected = scorer_of(reward_model, 48)([s["prompt"] for s in samples], [s["reply"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected, abs=1e-4)


def test_adaptive_kl_coefficient_moves_towards_the_target(tiny_llama, prompts, tmp_path):
    out = tmp_path / "run"
    assert cli.main([*base_args(tiny_llama, prompts, out), "reward.function=count:good", "train.steps=3",
                     "ppo.kl_target=0.01", "ppo.kl_horizon=100", "data.dev=null"]) == 0
    log = rows(out / "metrics.jsonl")
    assert log[0]["kl_coef"] == 0.05
    for before, after in zip(log, log[1:]):  # KL above the target raises beta, below lowers it
        factor = 1 + max(-0.2, min(0.2, before["kl"] / 0.01 - 1)) * 16 / 100
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * factor)
    assert log[-1]["kl_coef"] != 0.05


def test_reward_source_errors(tiny_llama, prompts, tmp_path, capsys):
    assert cli.main([*base_args(tiny_llama, prompts, tmp_path), "train.steps=1"]) == 2
    assert "exactly one reward source" in capsys.readouterr().err
    assert cli.main([*base_args(tiny_llama, prompts, tmp_path), "reward.function=length"]) == 2
    assert "count:WORD" in capsys.readouterr().err


def test_shipped_preset_loads():
    config = cfg_lib.load(ppo.PPOConfig, REPO / "configs" / "ppo_hh_smollm2.yaml")
    assert config.policy.name == "smollm2-135m"
    assert config.data.train.endswith("harmless-base/train.jsonl.gz")
    assert config.data.dev.endswith("harmless-base/dev.jsonl.gz")
    assert config.reward.model

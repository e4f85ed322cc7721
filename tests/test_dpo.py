"""DPO-family losses by hand, and `chatrlhf dpo` through the real CLI with a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from chatrlhf import losses

# ---- losses ---------------------------------------------------------------------------------

# policy chosen -1, rejected -3; reference -2 for both: h = (-1 + 2) - (-3 + 2) = 2.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0]), torch.tensor([-3.0])
REFERENCE = torch.tensor([-2.0])


def test_sigmoid_dpo_by_hand():
    # beta = 0.5: beta * h = 1, -log sigmoid(1) = log(1 + e^-1) = 0.313262
    out = losses.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, beta=0.5)
    assert_close(out, torch.tensor([0.313262]))
    # Swapping chosen and rejected: -log sigmoid(-1) = log(1 + e) = 1.313262
    out = losses.dpo_loss(POLICY_REJECTED, POLICY_CHOSEN, REFERENCE, REFERENCE, beta=0.5)
    assert_close(out, torch.tensor([1.313262]))


def test_conservative_dpo_by_hand():
    # eps = 0.1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    out = losses.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, beta=0.5, label_smoothing=0.1)
    assert_close(out, torch.tensor([0.413262]))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, label_smoothing=0.5)


def test_ipo_by_hand():
    # beta = 0.5: target 1 / (2 * 0.5) = 1, (2 - 1)^2 = 1; beta = 0.25: target 2, loss 0
    assert_close(losses.ipo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, beta=0.5), torch.tensor([1.0]))
    assert_close(losses.ipo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, beta=0.25), torch.tensor([0.0]))


def test_plackett_luce_by_hand():
    # beta = 1, reference 0, rewards 2 > 1 > 0 in rank order:
    # [log(e^2 + e + 1) - 2] + [log(e + 1) - 1] + [0 - 0] = 0.407606 + 0.313262 = 0.720868
    rewards = torch.tensor([2.0, 1.0, 0.0])
    out = losses.plackett_luce_loss(rewards, torch.zeros(3), torch.tensor([0, 1, 2]), [3], beta=1.0)
    assert_close(out, torch.tensor([0.720868]))


def test_plackett_luce_ties_by_hand():
    # Breslow: ranks [0, 0, 1], rewards 1, 1, 0: each tied reply faces {1, 1, 0}:
    # 2 * [log(2e + 1) - 1] + 0 = 2 * 0.861995 = 1.723990
    out = losses.plackett_luce_loss(torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3), torch.tensor([0, 0, 1]), [3], 1.0)
    assert_close(out, torch.tensor([1.723990]))
    # A tied pair: -log sigmoid(d) - log sigmoid(-d), smallest (2 log 2 = 1.386294) at d = 0;
    # at d = 2: log(1 + e^-2) + log(1 + e^2) = 0.126928 + 2.126928 = 2.253856
    tie = losses.plackett_luce_loss(torch.tensor([0.5, 0.5, 2.0, 0.0]), torch.zeros(4),
                                    torch.tensor([0, 0, 0, 0]), [2, 2], 1.0)
    assert_close(tie, torch.tensor([1.386294, 2.253856]))


def test_plackett_luce_with_two_replies_is_sigmoid_dpo():
    torch.manual_seed(0)
    policy, reference = torch.randn(2, 6), torch.randn(2, 6)
    beta = 0.3
    pairwise = losses.dpo_loss(policy[0], policy[1], reference[0], reference[1], beta)
    # Groups [chosen_i, rejected_i] laid out one after another, ranks [0, 1].
    flat = lambda t: torch.stack([t[0], t[1]], dim=1).reshape(-1)  # noqa: E731
    kwise = losses.plackett_luce_loss(flat(policy), flat(reference), torch.tensor([0, 1] * 6), [2] * 6, beta)
    assert_close(kwise, pairwise)
    # Listing the rejected reply first (ranks [1, 0]) changes nothing.
    swapped = lambda t: torch.stack([t[1], t[0]], dim=1).reshape(-1)  # noqa: E731
    assert_close(losses.plackett_luce_loss(swapped(policy), swapped(reference), torch.tensor([1, 0] * 6),
                                           [2] * 6, beta), pairwise)


def test_plackett_luce_does_not_depend_on_listing_order_or_batch_neighbours():
    torch.manual_seed(1)
    policy, reference = torch.randn(4), torch.randn(4)
    ranks = torch.tensor([2, 0, 3, 1])
    alone = losses.plackett_luce_loss(policy, reference, ranks, [4], 0.5)
    order = torch.tensor([3, 1, 0, 2])
    assert_close(losses.plackett_luce_loss(policy[order], reference[order], ranks[order], [4], 0.5), alone)
    # Next to a group of 2 (padding in the grid must not leak into either group).
    both = losses.plackett_luce_loss(torch.cat([torch.tensor([1.0, 0.0]), policy]),
                                     torch.cat([torch.zeros(2), reference]),
                                     torch.cat([torch.tensor([0, 1]), ranks]), [2, 4], 0.5)
    assert_close(both[1], alone[0])
    assert_close(both[0], losses.dpo_loss(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0),
                                          torch.tensor(0.0), 0.5))
    # Padding never turns into a NaN gradient.
    policy.requires_grad_(True)
    losses.plackett_luce_loss(torch.cat([torch.tensor([1.0, 0.0]), policy]), torch.cat([torch.zeros(2), reference]),
                              torch.cat([torch.tensor([0, 1]), ranks]), [2, 4], 0.5).sum().backward()
    assert torch.isfinite(policy.grad).all()


# ---- recipe ---------------------------------------------------------------------------------

from chatrlhf import config as cfg_lib  # noqa: E402
from chatrlhf import policy  # noqa: E402
from chatrlhf.cli import main  # noqa: E402
from chatrlhf.recipes import dpo  # noqa: E402
from conftest import crash_after_checkpoint, read_metrics as log, separable_pairs, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_dpo(tmp_path, model: str, rows: list[dict], *extra: str, name="run", dev_rows=None) -> Path:
    out = tmp_path / name
    args = ["dpo", f"model.name={model}", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
            f"train.output_dir={out}", "model.max_length=48", "train.batch_size=8", "train.lr=3e-3",
            "train.warmup_ratio=0.0", "loss.beta=0.5", *extra]
    if dev_rows:
        args.append(f"data.dev={write_jsonl(tmp_path / 'dev.jsonl', dev_rows)}")
    assert main(args) == 0
    return out



def test_dpo_raises_held_out_implicit_reward_accuracy(tmp_path, tiny_llama, capsys):
    out = run_dpo(tmp_path, tiny_llama, separable_pairs(96, seed=1, chat=True), "train.max_steps=30",
                  "--report", str(tmp_path / "report"), dev_rows=separable_pairs(60, seed=2))
    entries = log(out)
    assert [e['step'] for e in entries] == list(range(1, 31))
    final = entries[-1]
    assert final["dev_accuracy"] > 0.85 and final["dev_accuracy_low"] > 0.6 and final["dev_reward_margin"] > 0
    printed = capsys.readouterr().out
    assert f"dev implicit-reward accuracy {final['dev_accuracy']:.4f}" in printed
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["summary"]["accuracy"] == final["dev_accuracy"] and report["summary"]["pairs"] == 60
    assert (tmp_path / "report" / "report.html").exists()


def test_lora_reference_is_the_adapter_disabled_and_no_second_model(tmp_path, tiny_llama, monkeypatch):
    loads = []
    real_load = policy.load_policy
    monkeypatch.setattr(policy, "load_policy", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    rows = separable_pairs(64, seed=3)
    out = run_dpo(tmp_path, tiny_llama, rows, "model.lora_r=8", "train.max_steps=30", "train.lr=1e-2",
                  dev_rows=separable_pairs(40, seed=4))
    assert len(loads) == 1  # the policy only
    # The cached reference equals the plain base model's log-probabilities.
    base, tokenizer = real_load(tiny_llama)
    cache = torch.load(out / dpo.REFERENCE_FILE, weights_only=False)
    first = rows[0]
    encoded = [policy.encode_prompt_response(tokenizer, first["prompt"], r, 48) for r in (first["chosen"], first["rejected"])]
    with torch.no_grad():
        expected = policy.sequence_logps(base, policy.collate_lm(encoded, tokenizer.pad_token_id))
    first_item = [values for values in cache["train"]]
    assert any(torch.allclose(torch.tensor(v), expected, atol=1e-5) for v in first_item)
    assert log(out)[-1]["dev_accuracy"] > 0.75
    assert (out / "model" / "adapter" / "adapter_config.json").exists()


def test_resume_after_a_crash_ends_with_the_same_loss(tmp_path, tiny_llama, monkeypatch):
    rows = separable_pairs(48, seed=5)
    settings = ("train.max_steps=6", "train.save_every=3", "train.batch_size=4")
    whole = log(run_dpo(tmp_path, tiny_llama, rows, *settings, name="whole"))

    with crash_after_checkpoint(monkeypatch, dpo, at_step=3):
        run_dpo(tmp_path, tiny_llama, rows, *settings, name="crashed")
    # Without the cache, the full fine-tuned resume must load the original weights as reference.
    (tmp_path / "crashed" / dpo.REFERENCE_FILE).unlink()
    resumed = log(run_dpo(tmp_path, tiny_llama, rows, *settings, "train.resume=true", name="crashed"))
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed[3:]] == pytest.approx([e["loss"] for e in whole[3:]], abs=1e-6)


def rankings(n: int, seed: int, tie_every: int = 0) -> list[dict]:
    rows = []
    for i, r in enumerate(separable_pairs(n, seed)):
        tie = tie_every and i % tie_every == 0
        rows.append({"kind": "ranking", "prompt": r["prompt"], "replies": [r["chosen"], "the of", r["rejected"]],
                     "ranks": [0, 0 if tie else 1, 2]})
    return rows


def test_plackett_luce_on_rankings_with_ties(tmp_path, tiny_llama, capsys):
    out = run_dpo(tmp_path, tiny_llama, rankings(48, seed=6, tie_every=4), "loss.type=plackett_luce",
                  "train.max_steps=20", dev_rows=rankings(30, seed=7))
    assert "12 groups with tied replies use the Breslow tie model" in capsys.readouterr().out
    assert log(out)[-1]["dev_accuracy"] > 0.75 and "dev_mean_kendall_tau" in log(out)[-1]
    run_dpo(tmp_path, tiny_llama, rankings(48, seed=6, tie_every=4), "loss.type=plackett_luce",
            "loss.drop_ties=true", "train.max_steps=1", name="dropped")
    assert "excluded 12 groups with tied replies (loss.drop_ties)" in capsys.readouterr().out


def test_pairwise_losses_refuse_rankings_and_count_tied_pairs(tmp_path, tiny_llama, capsys):
    args = ["dpo", f"model.name={tiny_llama}", f"data.train={write_jsonl(tmp_path / 'r.jsonl', rankings(8, 8))}",
            f"train.output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    assert "use loss.type=plackett_luce" in capsys.readouterr().err
    rows = [{**r, "tie": i < 3} for i, r in enumerate(separable_pairs(16, seed=9))]
    rows = [{"kind": "pair", **r} for r in rows]
    run_dpo(tmp_path, tiny_llama, rows, "loss.type=ipo", "train.max_steps=1")
    assert "excluded 3 groups with tied replies (loss.type=ipo has no tie model)" in capsys.readouterr().out


@pytest.mark.parametrize("setting", ["loss.type=ipo", "loss.label_smoothing=0.1"])
def test_ipo_and_conservative_dpo_learn_too(tmp_path, tiny_llama, setting):
    out = run_dpo(tmp_path, tiny_llama, separable_pairs(64, seed=10), setting, "train.max_steps=20",
                  dev_rows=separable_pairs(40, seed=11))
    assert log(out)[-1]["dev_accuracy"] > 0.75


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": "all-linear"}])
def test_item_logps_equal_the_plain_sequence_logps(tiny_llama, lora):
    model, tokenizer = policy.load_policy(tiny_llama, lora=lora)
    rows = separable_pairs(5, seed=12)
    items = [dpo.Item(None, [policy.encode_prompt_response(tokenizer, r["prompt"], r[k], 48)
                             for k in ("chosen", "rejected")]) for r in rows]
    batch = policy.collate_lm([e for item in items for e in item.encoded], tokenizer.pad_token_id)
    for average in (False, True):
        assert_close(dpo.item_logps(model, items, average, 64), policy.sequence_logps(model, batch, average))


def test_preset_loads_and_help_lists_every_setting(capsys):
    config = cfg_lib.load(dpo.DPOConfig, ROOT / "configs" / "dpo_hh_smollm2.yaml")
    assert config.model.lora_r > 0 and config.data.allow_empty and config.loss.type == "sigmoid"
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = capsys.readouterr().out
    for section in ("model", "data", "loss", "train"):
        for field in type(getattr(config, section)).__dataclass_fields__:
            assert f"{section}.{field}=" in text
    assert "--report DIR" in text

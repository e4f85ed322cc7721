"""Sampling: the seeded inverse-CDF draws and the merged LoRA copy (the decoding loop itself is
checked against generate() in test_grpo.py)."""

from __future__ import annotations

import torch

from chatrlhf import sampling
from chatrlhf.policy import load_policy


def test_draws_follow_the_distribution_and_stay_in_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]] * 4000)
    probs = torch.softmax(logits[0], -1)
    tokens = sampling.draw(logits, [torch.Generator().manual_seed(s) for s in range(4000)])
    frequencies = torch.bincount(tokens, minlength=5).float() / 4000
    torch.testing.assert_close(frequencies, probs, atol=0.025, rtol=0)  # 4000 draws: s.e. at most 0.008
    nucleus = sampling.draw(logits, [torch.Generator().manual_seed(s) for s in range(4000)], top_p=0.8)
    # 2.0 holds 0.64 of the mass: the nucleus is {0, 1} (1 crosses 0.8), renormalised
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean() - probs[0] / probs[:2].sum()) < 0.025
    hot = sampling.draw(logits[:1].repeat(4000, 1), [torch.Generator().manual_seed(s) for s in range(4000)],
                        temperature=100.0)
    assert (hot == 4).any()  # near-uniform at a high temperature
    assert sampling.draw(logits[:3], None).tolist() == [0, 0, 0]  # greedy
    again = sampling.draw(logits[:50], [torch.Generator().manual_seed(s) for s in range(50)])
    assert again.tolist() == tokens[:50].tolist()  # a row's token depends on its seed only


def test_merged_copy_gives_the_policy_logits_and_follows_updates(tiny_llama):
    policy, _ = load_policy(tiny_llama, lora={"r": 4, "lora_alpha": 8})
    copy = sampling.MergedCopy(policy)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for _ in range(2):  # before and after the adapter changes
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name or "lora_A" in name:
                    p.add_(torch.randn_like(p) * 0.3)
            expected = policy(input_ids=ids).logits
            stale = copy.model(input_ids=ids).logits
            assert not torch.allclose(stale, expected, atol=1e-4)
            torch.testing.assert_close(copy.refresh()(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    full, _ = load_policy(tiny_llama)
    assert sampling.MergedCopy(full).refresh() is full  # without an adapter: the policy itself

"""The shared-prompt forward gives the rewards and gradients of separate forwards."""

from __future__ import annotations

import pytest
import torch

from chatrlhf import models
from chatrlhf.data.batching import collate, to_groups, tokenize_groups
from chatrlhf.data.records import Pair, Ranking
from chatrlhf.sharing import common_prefix, is_decoder, shared_prompt_rewards, split_groups


def test_common_prefix_leaves_each_sequence_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert common_prefix([[7, 1], [8, 1]]) == 0


def batch_of(tokenizer, records):
    groups = to_groups(records)
    tokenize_groups(groups, tokenizer, 64)
    return collate(groups, tokenizer.pad_token_id)


@pytest.mark.parametrize("lora", [0, 4])
def test_shared_prompt_equals_separate_forwards(tiny_llama, lora):
    model, tokenizer = models.load_reward_model(tiny_llama, {"r": lora, "lora_alpha": 8} if lora else None)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero score head and adapter, so the gradients are not trivial
        for name, p in model.named_parameters():
            if "score" in name or "lora_B" in name:
                p.normal_(0, 0.5)
    assert is_decoder(model)
    # Prompts of different lengths, chat and plain, K = 2 and K = 3, replies of different lengths.
    records = [
        Pair(prompt="the a of to and in is", chosen="good it was", rejected="bad"),
        Pair(prompt=[{"role": "user", "content": "hi"}], chosen="good", rejected="bad w1 w2 w3 w4"),
        Ranking(prompt="w5 w6", replies=["good w7", "w8", "bad bad w9 w10"], ranks=[0, 1, 2]),
    ]
    batch = batch_of(tokenizer, records)
    prefixes, _, _ = split_groups(batch["input_ids"], batch["attention_mask"], batch["group_sizes"])
    assert [len(p) for p in prefixes] == [7, 3, 2]  # something is shared in every group
    model.train()
    separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    separate_grads = torch.autograd.grad(separate.square().sum(), [p for p in model.parameters() if p.requires_grad])
    shared = shared_prompt_rewards(model, batch["input_ids"], batch["attention_mask"], batch["group_sizes"],
                                   tokenizer.pad_token_id)
    shared_grads = torch.autograd.grad(shared.square().sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-4)
    for a, b in zip(shared_grads, separate_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_encoders_are_not_shared(tiny_bert):
    model, _ = models.load_reward_model(tiny_bert)
    assert not is_decoder(model)


def test_training_with_and_without_sharing_gives_the_same_run(tmp_path, tiny_llama):
    from test_reward_recipe import log, train

    from conftest import separable_pairs

    rows = separable_pairs(24, seed=7, chat=True)
    shared = log(train(tmp_path, tiny_llama, rows, "train.max_steps=3", name="shared"))
    separate = log(train(tmp_path, tiny_llama, rows, "train.max_steps=3", "train.share_prompt=false",
                         name="separate"))
    for a, b in zip(shared, separate):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)

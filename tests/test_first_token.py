"""The first-token last layer gives the rewards and gradients of the full forward."""

from __future__ import annotations

import pytest
import torch

from chatrlhf import models
from chatrlhf.data.batching import Group, collate, tokenize_groups
from chatrlhf.first_token import first_token_only, last_layer
from conftest import separable_pairs


def rewards_and_grads(model, batch: dict, first_token: bool):
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if first_token:
        with first_token_only(model):
            rewards = model(**inputs).logits[:, 0]
    else:
        rewards = model(**inputs).logits[:, 0]
    rewards.square().sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch):
    full, full_grads = rewards_and_grads(model, batch, first_token=False)
    fast, fast_grads = rewards_and_grads(model, batch, first_token=True)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def bert_batch(tokenizer) -> dict:
    # Replies of different lengths: padding, and so a mask, in the batch.
    groups = [Group(row["prompt"], [row["chosen"], row["rejected"] + " the" * (3 * i)], [0, 1])
              for i, row in enumerate(separable_pairs(5, seed=4))]
    tokenize_groups(groups, tokenizer, max_length=64)
    return collate(groups, tokenizer.pad_token_id)


@pytest.mark.parametrize("lora,attention", [(0, "sdpa"), (0, "eager"), (4, "sdpa")])
def test_bert_first_token_equals_full_forward(tiny_bert, lora, attention):
    model, tokenizer = models.load_reward_model(tiny_bert, {"r": lora, "lora_alpha": 8} if lora else None,
                                                dropout=False)
    model.set_attn_implementation(attention)
    assert last_layer(model) is not None
    torch.manual_seed(2)
    with torch.no_grad():  # a score head and adapter that are not zero, so gradients reach everything
        for name, p in model.named_parameters():
            if "classifier" in name or "lora_B" in name:
                p.normal_(0, 0.5)
    assert_same(model, bert_batch(tokenizer))


def test_roberta_first_token_equals_full_forward():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=40, num_labels=1, pad_token_id=1)
    model = RobertaForSequenceClassification(config).eval()
    input_ids = torch.randint(3, 50, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = attention_mask[3, 4:] = 0
    input_ids[attention_mask == 0] = 1
    assert_same(model, {"input_ids": input_ids, "attention_mask": attention_mask})


def test_the_layer_is_restored_and_decoders_are_left_alone(tiny_bert, tiny_llama):
    model, tokenizer = models.load_reward_model(tiny_bert)
    batch = bert_batch(tokenizer)
    body = model.bert
    with first_token_only(model):
        assert body(input_ids=batch["input_ids"]).last_hidden_state.shape[1] == 1
    assert body(input_ids=batch["input_ids"]).last_hidden_state.shape[1] == batch["input_ids"].shape[1]
    decoder, _ = models.load_reward_model(tiny_llama)
    assert last_layer(decoder) is None

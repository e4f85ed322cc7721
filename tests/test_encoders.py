"""The padding-free, first-token forward gives the rewards and gradients of the plain forward."""

from __future__ import annotations

import pytest
import torch

from chatrlhf import encoders, models
from chatrlhf.data.batching import Group, collate, tokenize_groups
from chatrlhf.encoders import encoder_layers, packed
from conftest import separable_pairs


def rewards_and_grads(model, batch: dict, padding_free: bool):
    """padding_free False: the plain forward."""
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if not padding_free:
        rewards = model(**inputs).logits[:, 0]
    else:
        with packed(model, batch["attention_mask"]) as applies:
            assert applies
            rewards = model(**inputs).logits[:, 0]
    rewards.square().sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch):
    full, full_grads = rewards_and_grads(model, batch, False)
    fast, fast_grads = rewards_and_grads(model, batch, True)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def bert_batch(tokenizer) -> dict:
    # Replies of different lengths: padding, and so a mask, in the batch; the first two pairs
    # repeated, so some sequences have the same length.
    groups = [Group(row["prompt"], [row["chosen"], row["rejected"] + " the" * (3 * i)], [0, 1])
              for i, row in enumerate(separable_pairs(5, seed=4))]
    groups += groups[:2]
    tokenize_groups(groups, tokenizer, max_length=64)
    return collate(groups, tokenizer.pad_token_id)


def nonzero_head(model):
    torch.manual_seed(2)
    with torch.no_grad():  # a score head and adapter that are not zero, so gradients reach everything
        for name, p in model.named_parameters():
            if "classifier" in name or "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("lora,attention,checkpointing", [(0, "sdpa", False), (0, "eager", False),
                                                         (4, "sdpa", False), (0, "sdpa", True)])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "padded-rows"])
def test_bert_packed_equals_plain_forward(tiny_bert, lora, attention, checkpointing, per_sequence, monkeypatch):
    # padded-rows: the attention GPUs take (one kernel on padded rows), run here on CPU.
    if not per_sequence:
        monkeypatch.setattr(encoders, "PER_SEQUENCE_DEVICES", ())
    model, tokenizer = models.load_reward_model(tiny_bert, {"r": lora, "lora_alpha": 8} if lora else None,
                                                dropout=False)
    model.set_attn_implementation(attention)
    if checkpointing:
        models.enable_checkpointing(model)
        model.train()
    assert encoder_layers(model) is not None
    nonzero_head(model)
    assert_same(model, bert_batch(tokenizer))


@pytest.mark.parametrize("lora", [0, 4])
def test_query_key_value_run_as_one_matmul_unless_wrapped(tiny_bert, lora):
    # Plain linear maps: one matmul over the stacked weights, the modules are not called (and the
    # last layer computes no keys); under LoRA each module runs, the adapters with it.
    model, tokenizer = models.load_reward_model(tiny_bert, {"r": lora, "lora_alpha": 8} if lora else None)
    layers = encoder_layers(model)
    calls = []
    for layer in layers:
        layer.attention.self.key.register_forward_hook(lambda *args: calls.append(1))
    rewards_and_grads(model, bert_batch(tokenizer), True)
    assert len(calls) == (len(layers) if lora else 0)


def test_attention_dropout_applies_as_in_the_plain_forward(tiny_bert):
    # Attention dropout of 1 drops every attention weight: both forwards are deterministic, so the
    # packed one must match the plain (eager) one, value bias of the [CLS]-only last layer included.
    model, tokenizer = models.load_reward_model(tiny_bert, dropout=False)
    model.set_attn_implementation("eager")
    nonzero_head(model)
    model.train()
    attentions = [layer.attention.self for layer in encoder_layers(model)]
    batch = bert_batch(tokenizer)
    for attention in attentions:
        attention.dropout.p = 1.0
    assert_same(model, batch)
    with pytest.MonkeyPatch.context() as patch:  # the padded rows GPUs take, on CPU
        patch.setattr(encoders, "PER_SEQUENCE_DEVICES", ())
        assert_same(model, batch)
    for attention in attentions:
        attention.dropout.p = 0.5
    torch.manual_seed(0)
    first, _ = rewards_and_grads(model, batch, True)
    torch.manual_seed(1)
    second, _ = rewards_and_grads(model, batch, True)
    assert not torch.allclose(first, second)  # dropout is random in the packed forward too


def test_roberta_and_a_single_layer_packed_equal_plain_forward():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    for layers in (2, 1):  # with one layer, the first layer is also the last
        torch.manual_seed(0)
        config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=40, num_labels=1, pad_token_id=1)
        model = RobertaForSequenceClassification(config).eval()
        input_ids = torch.randint(3, 50, (4, 12))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 7:] = attention_mask[3, 4:] = 0
        input_ids[attention_mask == 0] = 1
        assert_same(model, {"input_ids": input_ids, "attention_mask": attention_mask})
        unpadded = torch.randint(3, 50, (3, 9))  # no padding at all: no mask anywhere
        assert_same(model, {"input_ids": unpadded, "attention_mask": torch.ones_like(unpadded)})


def test_layers_are_restored_and_other_models_and_batches_left_alone(tiny_bert, tiny_llama):
    model, tokenizer = models.load_reward_model(tiny_bert)
    batch = bert_batch(tokenizer)
    body = model.bert
    with packed(model, batch["attention_mask"]) as applies:
        assert applies
        assert body(input_ids=batch["input_ids"]).last_hidden_state.shape[1] == 1
    assert body(input_ids=batch["input_ids"]).last_hidden_state.shape == (*batch["input_ids"].shape, 32)
    left_padded = batch["attention_mask"].flip(1)
    with packed(model, left_padded) as applies:
        assert not applies
        assert body(input_ids=batch["input_ids"]).last_hidden_state.shape[1] > 1
    decoder, _ = models.load_reward_model(tiny_llama)
    assert encoder_layers(decoder) is None
    with packed(decoder, batch["attention_mask"]) as applies:
        assert not applies


def test_bf16_autocast_packed_as_close_to_float32_as_plain(tiny_bert):
    # Machines with native bf16 train under autocast (train.bf16=auto): there the packed forward
    # must round no worse than the plain one, measured against both in float32.
    model, tokenizer = models.load_reward_model(tiny_bert, dropout=False)
    nonzero_head(model)
    batch = bert_batch(tokenizer)
    exact, exact_grads = rewards_and_grads(model, batch, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = rewards_and_grads(model, batch, False)
        fast, fast_grads = rewards_and_grads(model, batch, True)
    assert fast.dtype == plain.dtype == torch.bfloat16
    tolerance = (plain.float() - exact).abs().max()
    assert (fast.float() - exact).abs().max() <= 2 * tolerance + 1e-3
    for name, grad in exact_grads.items():
        if grad.norm() < 1e-6:
            continue  # the key biases': zero up to rounding, so their relative error means nothing
        error = (fast_grads[name] - grad).norm() / grad.norm()
        assert error <= 2 * (plain_grads[name] - grad).norm() / grad.norm() + 1e-3, name

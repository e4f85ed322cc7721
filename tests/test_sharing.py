"""The shared-prompt forward gives the rewards and gradients of separate forwards."""

from __future__ import annotations

import pytest
import torch

from chatrlhf import models, sharing
from chatrlhf.data.batching import collate, to_groups, tokenize_groups
from chatrlhf.data.records import Pair, Ranking
from chatrlhf.sharing import common_prefix, is_decoder, pack, shared_prompt_rewards, split_groups
from conftest import tiny_decoder


def test_common_prefix_leaves_each_sequence_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert common_prefix([[7, 1], [8, 1]]) == 0


def test_packing_places_groups_side_by_side_and_masks_them_apart():
    prefixes, suffixes = [[1, 2, 3], [4], []], [[[6, 7], [8]], [[9], [10, 11]], [[12], [13]]]
    packed = pack(prefixes, suffixes, pad_id=0)
    # 6, 4 and 2 tokens: the longest sets the width, the two others share the second row.
    assert packed.input_ids.tolist() == [[1, 2, 3, 6, 7, 8], [4, 9, 10, 11, 12, 13]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    assert packed.reward_at == [(0, 4), (0, 5), (1, 1), (1, 3), (1, 4), (1, 5)]
    mask = packed.attention_mask[:, 0]
    assert mask[0, 5].tolist() == [True, True, True, False, False, True]  # a reply: prompt and itself
    assert mask[1, 3].tolist() == [True, False, True, True, False, False]
    assert mask[1, 4].tolist() == [False] * 4 + [True, False]  # nothing of the other group
    assert mask[1, 5].tolist() == [False] * 5 + [True]  # nor of its sibling reply


def batch_of(tokenizer, records, max_length=64):
    groups = to_groups(records)
    tokenize_groups(groups, tokenizer, max_length, same_prompt=True)
    return collate(groups, tokenizer.pad_token_id)


def assert_shared_equals_separate(model, batch, pad_id):
    separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    shared = shared_prompt_rewards(model, batch["input_ids"], batch["attention_mask"], batch["group_sizes"], pad_id)
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lora,attention,layout", [(0, "sdpa", "groups"), (4, "sdpa", "groups"), (0, "eager", "groups"),
                                                  (0, "sdpa", "rows"), (4, "sdpa", "rows"), (0, "eager", "rows"),
                                                  (0, "sdpa", "checkpointing")])
def test_shared_prompt_equals_separate_forwards(tiny_llama, lora, attention, layout, monkeypatch):
    model, tokenizer = models.load_reward_model(tiny_llama, {"r": lora, "lora_alpha": 8} if lora else None)
    model.set_attn_implementation(attention)
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
    prefixes, _ = split_groups(batch["input_ids"], batch["attention_mask"], batch["group_sizes"])
    assert [len(p) for p in prefixes] == [7, 3, 2]  # something is shared in every group
    model.train()
    separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    separate_grads = torch.autograd.grad(separate.square().sum(), [p for p in model.parameters() if p.requires_grad])
    if layout == "rows":  # as on devices other than the CPU
        monkeypatch.setattr(sharing, "PER_GROUP_DEVICES", ())
    if layout == "checkpointing":  # its backward recomputes the layers: rows
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base = model.get_base_model() if lora else model
    assert sharing.attends_per_group(base.model, batch["input_ids"].device) == (layout == "groups")
    feed_forward_rows = []  # the last layer's feed-forward block computes the rewards' tokens only
    base.model.layers[-1].mlp.down_proj.register_forward_hook(lambda m, args, out: feed_forward_rows.append(out.shape[1]))
    # All groups in one packed forward, then sorted by length in chunks of at least 2 sequences
    # (here 2, 3 and 2 replies: three forwards, the rewards put back in the batch's order).
    for rows_per_forward, chunks in ((0, [7]), (2, [2, 3, 2])):
        feed_forward_rows.clear()
        shared = shared_prompt_rewards(model, batch["input_ids"], batch["attention_mask"], batch["group_sizes"],
                                       tokenizer.pad_token_id, rows_per_forward)
        shared_grads = torch.autograd.grad(shared.square().sum(),
                                           [p for p in model.parameters() if p.requires_grad])
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-4)
        for a, b in zip(shared_grads, separate_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        if layout == "groups":
            assert feed_forward_rows == chunks
    assert model.config._attn_implementation == attention  # put back after each forward


@pytest.mark.parametrize("window, layout", [(64, "groups"), (8, "rows")])
def test_a_sliding_window_longer_than_every_sequence_keeps_single_rows(tiny_llama, window, layout):
    _, tokenizer = models.load_reward_model(tiny_llama)
    model = tiny_decoder(tokenizer, "mistral", window=window)
    batch = batch_of(tokenizer, [Pair(prompt="the a of to and in is", chosen="good it was", rejected="bad"),
                                 Ranking(prompt="w5 w6", replies=["good w7", "w8", "bad bad w9 w10"], ranks=[0, 1, 2])])
    longest = int(batch["attention_mask"].sum(1).max())
    assert 8 < longest < 64
    assert sharing.attends_per_group(model.model, batch["input_ids"].device, longest) == (layout == "groups")
    assert_shared_equals_separate(model, batch, tokenizer.pad_token_id)


@pytest.mark.parametrize("kind", ["qwen2-mixed", "qwen2-window-unused", "gemma2"])
def test_layers_of_sliding_window_and_full_attention_each_get_their_mask(tiny_llama, kind):
    # Sequences longer than the window: a single mask would be wrong for one kind of layer.
    _, tokenizer = models.load_reward_model(tiny_llama)
    model = tiny_decoder(tokenizer, kind)
    assert sharing.layer_kinds(model.config) == (
        {"full_attention"} if kind == "qwen2-window-unused" else {"full_attention", "sliding_attention"})
    batch = batch_of(tokenizer, [Pair(prompt="the a of to and in is", chosen="good it was", rejected="bad"),
                                 Ranking(prompt="w5 w6", replies=["good w7", "w8", "bad bad w9 w10"], ranks=[0, 1, 2])])
    longest = int(batch["attention_mask"].sum(1).max())
    assert longest > 8
    # A window no layer uses keeps single rows; the mixes need rows with a mask per kind of layer.
    assert sharing.attends_per_group(model.model, batch["input_ids"].device, longest) == (
        kind == "qwen2-window-unused")
    assert_shared_equals_separate(model, batch, tokenizer.pad_token_id)


def test_models_with_recurrent_layers_are_not_shared(tiny_llama):
    # Jamba's Mamba layers ignore the attention mask: one reply would carry into the next.
    from chatrlhf.recipes.reward import forward_rewards

    _, tokenizer = models.load_reward_model(tiny_llama)
    model = tiny_decoder(tokenizer, "jamba")
    assert sharing.layer_kinds(model.config) == {"linear_attention", "full_attention"}
    assert is_decoder(model) and not sharing.can_share(model)
    batch = batch_of(tokenizer, [Pair(prompt="the a of to and in is", chosen="good it was", rejected="bad")])
    with pytest.raises(ValueError, match="layers all attend through a mask"):
        shared_prompt_rewards(model, batch["input_ids"], batch["attention_mask"], batch["group_sizes"])
    separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(forward_rewards(model, batch, share_prompt=True), separate)


def test_group_attention_runs_in_shared_forwards_only(tiny_llama):
    model, tokenizer = models.load_reward_model(tiny_llama)
    model.config._attn_implementation = sharing.GROUP_ATTENTION
    batch = batch_of(tokenizer, [Pair(prompt="hi", chosen="good", rejected="bad")])
    with pytest.raises(RuntimeError, match="shared_prompt_rewards only"):
        model(input_ids=batch["input_ids"])


def test_encoders_are_not_shared(tiny_bert):
    model, _ = models.load_reward_model(tiny_bert)
    assert not is_decoder(model)


def test_training_with_and_without_sharing_gives_the_same_run(tmp_path, tiny_llama):
    from test_reward_recipe import assert_same_run

    from conftest import separable_pairs

    assert_same_run(tmp_path, tiny_llama, separable_pairs(24, seed=7, chat=True), "train.share_prompt=false")


def test_prompts_cut_to_fit_stay_shared(tiny_llama):
    model, tokenizer = models.load_reward_model(tiny_llama)
    long_prompt = " ".join(f"w{i % 40}" for i in range(80))
    records = [Pair(prompt=long_prompt, chosen="good", rejected="bad w1 w2 w3 w4 w5 w6")]
    batch = batch_of(tokenizer, records, max_length=32)
    assert batch["attention_mask"].sum(1).tolist() == [26, 32]  # both cut, the prompt alike
    prefixes, _ = split_groups(batch["input_ids"], batch["attention_mask"], batch["group_sizes"])
    assert len(prefixes[0]) == 25
    assert_shared_equals_separate(model, batch, tokenizer.pad_token_id)


def test_scoring_shares_prompts_and_gives_the_separate_rewards(tiny_llama, monkeypatch):
    from chatrlhf import sharing
    from chatrlhf.recipes.reward import score_groups

    model, tokenizer = models.load_reward_model(tiny_llama)
    records = [Pair(prompt="the a of to and in is", chosen="good it was", rejected="bad"),
               Ranking(prompt="w5 w6", replies=["good w7", "w8", "bad bad w9 w10"], ranks=[0, 1, 2]),
               Pair(prompt=[{"role": "user", "content": "hi"}], chosen="good", rejected="bad w1 w2 w3 w4")]
    groups = to_groups(records)
    tokenize_groups(groups, tokenizer, 64, same_prompt=True)
    shared_calls, original = [], sharing.shared_prompt_rewards
    monkeypatch.setattr(sharing, "shared_prompt_rewards",
                        lambda *a, **k: shared_calls.append(1) or original(*a, **k))
    # 18, 13 and 12 tokens: a budget of 30 makes a batch of the two shortest groups, then one
    # of the longest; the rewards come back in the groups' order.
    assert [g.num_tokens for g in groups] == [18, 13, 12]
    shared = score_groups(model, groups, tokenizer.pad_token_id, batch_tokens=30)
    assert len(shared_calls) == 2  # both batches went through the shared-prompt forward
    with torch.inference_mode():
        for group, rewards in zip(groups, shared):
            batch = collate([group], tokenizer.pad_token_id)
            separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            torch.testing.assert_close(torch.tensor(rewards), separate, atol=1e-5, rtol=1e-4)
    assert len(shared_calls) == 2

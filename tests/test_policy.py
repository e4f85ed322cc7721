"""The causal-LM pieces shared by SFT, DPO and PPO: prompts, masks, log-probabilities."""

from __future__ import annotations

import torch

from chatrlhf import policy


def test_hh_dialogue_becomes_chat_turns():
    prompt = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: good or bad\n\nAssistant:"
    assert policy.chat_messages(prompt) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "good or bad"}]
    assert policy.chat_messages("plain question") == [{"role": "user", "content": "plain question"}]


def test_reply_tokens_alone_carry_the_loss_and_long_prompts_are_cut_from_the_left(tiny_llama):
    model, tokenizer = policy.load_policy(tiny_llama)
    encoded = policy.encode_prompt_response(tokenizer, "hi good bad", "good", max_length=64)
    assert tokenizer.decode(encoded.input_ids[:encoded.prompt_tokens]) == "<|user|> hi good bad <|assistant|>"
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_tokens:]) == "good"
    long_prompt = " ".join(["hi"] * 50) + " bad"
    cut = policy.encode_prompt_response(tokenizer, long_prompt, "good", max_length=10)
    assert cut.cut and len(cut.input_ids) == 10
    assert tokenizer.decode(cut.input_ids[:cut.prompt_tokens]).endswith("bad <|assistant|>")

    batch = policy.collate_lm([encoded, cut], tokenizer.pad_token_id)
    assert batch["loss_mask"].sum(-1).tolist() == [1, 1]
    # Summed log-probabilities equal a hand-written gather over the reply token.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    position = encoded.prompt_tokens
    expected = logits[0, position - 1].log_softmax(-1)[encoded.input_ids[position]]
    torch.testing.assert_close(policy.sequence_logps(model, batch)[0], expected)

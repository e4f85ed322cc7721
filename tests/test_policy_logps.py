"""The shared-prompt policy forward (sharing.policy_logps) gives the log-probabilities, entropies
and gradients of separate plain forwards, on every layout it chooses."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from chatrlhf import policy, sharing
from conftest import WORDS, tiny_decoder


def separate(model, sequences, starts, temperature=1.0):
    """Per sequence: log p of its loss tokens and the entropies, from one plain forward each."""
    values, entropies = [], []
    for s, b in zip(sequences, starts):
        logits = model(input_ids=torch.tensor([s])).logits[0, b - 1:-1].float() / temperature
        lse = logits.logsumexp(-1)
        values.append(logits.gather(-1, torch.tensor(s[b:])[:, None])[:, 0] - lse)
        entropies.append(lse - (logits.softmax(-1) * logits).sum(-1))
    return torch.cat(values), torch.cat(entropies)


def groups_of(tokenizer, sizes, seed=0):
    """Chat prompts of different lengths with K replies each (K from ``sizes``), encoded as SFT,
    DPO and GRPO encode them: (sequences, loss starts)."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))  # noqa: E731
    sequences, starts = [], []
    for k in sizes:
        prompt = [{"role": "user", "content": words(int(torch.randint(2, 12, (1,), generator=g)))}]
        for _ in range(k):
            e = policy.encode_prompt_response(tokenizer, prompt, words(int(torch.randint(1, 9, (1,), generator=g))), 64)
            sequences.append(e.input_ids)
            starts.append(e.prompt_tokens)
    return sequences, starts


def perturbed(model):
    torch.manual_seed(3)
    with torch.no_grad():  # a non-zero adapter, so LoRA's gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("lora,layout", [(None, "groups"), ({"r": 4}, "groups"), (None, "rows"),
                                         ({"r": 4}, "rows"), (None, "eager-rows")])
def test_equals_separate_forwards(tiny_llama, lora, layout, monkeypatch):
    model, tokenizer = policy.load_policy(tiny_llama, lora=lora)
    model = perturbed(model)
    if layout != "groups":  # padded rows with a mask, as on GPUs
        monkeypatch.setattr(sharing, "PER_GROUP_DEVICES", ())
    if layout == "eager-rows":
        model.set_attn_implementation("eager")
    sizes = [1, 2, 4, 3]
    sequences, starts = groups_of(tokenizer, sizes)
    for temperature in (1.0, 0.7):
        expected, expected_entropy = separate(model, sequences, starts, temperature)
        # Small forwards too: groups split over several forwards, chunks of the output layer.
        for tokens_per_forward in (2048, 40):
            monkeypatch.setattr(sharing._LossTokenLogps, "CHUNK", 7)
            got = sharing.policy_logps(model, sequences, starts, sizes, temperature=temperature, entropy=True,
                                       tokens_per_forward=tokens_per_forward)
            assert got.lengths == [len(s) - b for s, b in zip(sequences, starts)]
            assert_close(got.values, expected, atol=1e-5, rtol=1e-4)
            assert_close(got.entropy, expected_entropy, atol=1e-5, rtol=1e-4)
    sums = torch.stack([v.sum() for v in expected.split(got.lengths)])
    assert_close(got.sums(), sums, atol=1e-5, rtol=1e-4)
    assert_close(got.means(), sums / torch.tensor(got.lengths), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [5, 1024], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": "all-linear"}])
def test_gradients_equal_separate_forwards(tiny_llama, lora, chunk, monkeypatch):
    """Weighted per token as GRPO weighs them, so every token's gradient path counts. In one
    chunk with the output layer trained, the backward reads the forward's softmax; a second
    backward of the same graph computes it again."""
    model, tokenizer = policy.load_policy(tiny_llama, lora=lora)
    model = perturbed(model)
    monkeypatch.setattr(sharing._LossTokenLogps, "CHUNK", chunk)
    sizes = [2, 4, 1]
    sequences, starts = groups_of(tokenizer, sizes, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(values, retain=False):
        weights = torch.linspace(-1, 2, len(values))
        return torch.autograd.grad((values * weights).sum(), params, retain_graph=retain)

    expected = grads(separate(model, sequences, starts, 0.9)[0])
    values = sharing.policy_logps(model, sequences, starts, sizes, temperature=0.9).values
    for got in (grads(values, retain=True), grads(values)):
        for a, b in zip(got, expected):
            assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_prompt_is_computed_once(tiny_llama, monkeypatch):
    model, tokenizer = policy.load_policy(tiny_llama)
    sequences, starts = groups_of(tokenizer, [4, 4])
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    sharing.policy_logps(model, sequences, starts, [4, 4])
    hook.remove()
    prompt = [sharing.common_prefix(sequences[:4]), sharing.common_prefix(sequences[4:])]
    assert seen == [sum(map(len, sequences)) - 3 * sum(prompt)]


@pytest.mark.parametrize("kind", ["jamba", "gemma2"])
def test_models_that_cannot_share_rows_fall_back(tiny_llama, kind):
    """Jamba's Mamba layer ignores masks (each sequence its own padded row); Gemma 2 soft-caps
    its logits (the whole model's forward)."""
    _, tokenizer = policy.load_policy(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_decoder(tokenizer, kind, head="ForCausalLM", window=64)
    sequences, starts = groups_of(tokenizer, [3, 1])
    expected, _ = separate(model, sequences, starts)
    assert_close(sharing.policy_logps(model, sequences, starts, [3, 1]).values, expected, atol=1e-5, rtol=1e-4)


def test_mismatched_lengths_are_refused(tiny_llama):
    model, _ = policy.load_policy(tiny_llama)
    with pytest.raises(ValueError, match="must agree"):
        sharing.policy_logps(model, [[1, 2, 3]], [1, 1], [1])

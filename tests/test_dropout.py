"""The CPU dropout: PyTorch's distribution and scaling, repeatable from PyTorch's seed, the same
masks when gradient checkpointing recomputes, and in every dropout layer of a loaded model."""

from __future__ import annotations

import pytest
import torch

from chatrlhf import models
from chatrlhf.data.batching import Group, collate, tokenize_groups
from chatrlhf.dropout import Dropout, dropout, keep_mask
from chatrlhf.encoders import packed
from conftest import separable_pairs


# 0.05 and 0.1: byte coins and a sparse set; 0.5: byte coins alone (256 p is whole); 0.001: the
# sparse set alone (256 p < 1); 0.999: nearly every byte coin drops
@pytest.mark.parametrize("p", [0.001, 0.05, 0.1, 0.5, 0.999])
def test_drops_a_share_p_and_scales_the_rest(p):
    x = torch.ones(1_000_000, requires_grad=True)
    y = dropout(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale


@pytest.mark.parametrize("p", [0.001, 0.05])
def test_dropped_elements_spread_evenly_and_independently(p):
    # Each element is dropped with probability p wherever it lies (no position favoured by the
    # byte coins' packing, 8 a word, or by the sparse set's gaps), independently of its neighbour.
    n, bins = 2_000_000, 16
    dropped = (keep_mask(torch.Size([n]), p, scaled=False) == 0).double()
    per_bin = dropped.view(bins, -1).sum(1)
    expected = n / bins * p
    chi2 = ((per_bin - expected) ** 2 / (expected * (1 - p))).sum().item()
    assert chi2 < 40  # chi-square, 15 degrees of freedom: p < 1e-3
    for residue in range(8):  # the position within a 64-bit word
        rate = dropped[residue::8].mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / (n / 8)) ** 0.5, residue
    both = (dropped[:-1] * dropped[1:]).mean().item()  # neighbours both dropped: p^2
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5


def test_repeatable_from_torch_seed_and_fresh_each_call():
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    first, second = dropout(x, 0.2), dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), first)
    assert not torch.equal(first, second)
    assert (first == 0).any() and (first != 0).any()


def test_edges_as_pytorch():
    x = torch.randn(10, 7)
    assert torch.equal(dropout(x, 0.3, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x.bfloat16(), 0.3).dtype == torch.bfloat16
    y = x.clone()
    out = dropout(y, 0.3, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal((out == 0), (y == 0))
    assert dropout(torch.ones(0, 4), 0.5).shape == (0, 4)


def test_every_dropout_layer_of_a_loaded_model_is_replaced(tiny_bert):
    model, _ = models.load_reward_model(tiny_bert, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1})
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    lora = [m for name, m in model.named_modules() if "lora_dropout." in name]
    assert lora and all(m.p == 0.1 for m in lora)
    assert layers and all(type(m) is Dropout for m in layers)


@pytest.mark.parametrize("padding_free", [False, True], ids=["plain", "padding-free"])
def test_checkpointing_recomputes_the_same_masks(tiny_bert, padding_free):
    # With dropout on, gradients match only if the recomputed forward drops what the first did.
    model, tokenizer = models.load_reward_model(tiny_bert, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    groups = [Group(row["prompt"], [row["chosen"], row["rejected"] + " no" * i], [0, 1])
              for i, row in enumerate(separable_pairs(4, seed=1))]
    tokenize_groups(groups, tokenizer, max_length=64)
    batch = collate(groups, tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def grads(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        with packed(model, batch["attention_mask"] if padding_free else None):
            model(**inputs).logits.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads(0)
    models.enable_checkpointing(model)
    model.train()
    recomputed = grads(0)
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)
    other_seed = grads(1)
    assert any(not torch.allclose(other_seed[n], g) for n, g in plain.items())

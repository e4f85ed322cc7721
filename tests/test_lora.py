"""The fused LoRA layer (chatrlhf.lora) against peft's own forward: values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from chatrlhf import lora
from chatrlhf.policy import load_policy


def loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)  # the dropout coins
    loss = model(input_ids=ids).logits.float().log_softmax(-1)[..., 5].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_lora_gives_peft_values_and_gradients(tiny_llama, dropout, bf16):
    fused, _ = load_policy(tiny_llama, lora={"r": 4, "lora_alpha": 8, "lora_dropout": dropout,
                                             "target_modules": "all-linear"})
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    plain = copy.deepcopy(fused)
    for module in plain.modules():  # back to peft's forward
        module.__dict__.pop("forward", None)
    assert lora.use_fused_lora(copy.deepcopy(plain)) == 14  # 2 layers x 7 linear maps
    fused.train(), plain.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want, want_grads = loss_and_grads(plain, ids, 0)
        got, got_grads = loss_and_grads(fused, ids, 0)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, want, **tolerance)
    assert set(got_grads) == set(want_grads) and len(want_grads) == 28
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tolerance, msg=name)
    if dropout:  # another seed drops other inputs
        assert not torch.allclose(loss_and_grads(fused, ids, 1)[0], got)


def test_disabled_adapter_and_eval_take_peft_path(tiny_llama):
    policy, _ = load_policy(tiny_llama, lora={"r": 4, "lora_dropout": 0.5})
    base, _ = load_policy(tiny_llama)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        with policy.disable_adapter():
            torch.testing.assert_close(policy(input_ids=ids).logits, base(input_ids=ids).logits)
        policy.eval()  # no dropout: two calls agree
        torch.testing.assert_close(policy(input_ids=ids).logits, policy(input_ids=ids).logits)

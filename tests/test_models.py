"""Loading reward models: dropout off for training, LoRA's own dropout kept."""

from __future__ import annotations

import torch

from chatrlhf import models


def test_dropout_off_gives_one_reward_per_text_in_train_mode(tiny_bert):
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    noisy, _ = models.load_reward_model(tiny_bert)
    quiet, _ = models.load_reward_model(tiny_bert, dropout=False)
    noisy.train(), quiet.train()
    torch.manual_seed(0)
    assert not torch.equal(noisy(input_ids=ids).logits, noisy(input_ids=ids).logits)
    torch.testing.assert_close(quiet(input_ids=ids).logits, quiet(input_ids=ids).logits, atol=0, rtol=0)
    quiet.eval()
    torch.testing.assert_close(quiet(input_ids=ids).logits, noisy.eval()(input_ids=ids).logits)


def test_lora_dropout_is_kept(tiny_llama):
    model, _ = models.load_reward_model(tiny_llama, {"r": 4, "lora_dropout": 0.3}, dropout=False)
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert rates and all(p == (0.3 if "lora_dropout" in n else 0.0) for n, p in rates.items())
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())

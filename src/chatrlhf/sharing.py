"""Shared-prompt forward for decoder reward models: each group's prompt is computed once.

The K replies of a group share their prompt, and in a causal decoder the prompt's hidden states
do not depend on what follows. So the common prefix of a group's K sequences is run once (one row
per group), its key/value cache is repeated for the group's K replies, and only the replies run on
top of it. Gradients flow back through the cache into the prompt's computation, so loss and
gradients equal K separate forwards up to floating-point rounding (tests/test_sharing.py).

The shared part is the longest common token prefix of the group's sequences, not the prompt as
rendered: it equals the prompt whenever the template tokenises the prompt the same way whatever
follows, and it stays exact when it does not. Each reply keeps at least its last token.

Encoders (BERT-like) attend in both directions, so their prompt states depend on the reply; they
are scored with ordinary batched forwards.
"""

from __future__ import annotations

import torch


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def split_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 group_sizes: list[int]) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Per group its shared prefix, and per reply its own suffix (token id lists)."""
    sequences = [ids[:int(n)].tolist() for ids, n in zip(input_ids, attention_mask.sum(1))]
    prefixes, suffixes, start = [], [], 0
    for size in group_sizes:
        group = sequences[start:start + size]
        length = common_prefix(group) if size > 1 else 0
        prefixes.append(group[0][:length])
        suffixes += [s[length:] for s in group]
        start += size
    return prefixes, suffixes, group_sizes


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def is_decoder(model) -> bool:
    """A causal decoder reward model: transformers names the head of decoder classifiers
    (Llama, Qwen, Mistral, GPT-2, ...) ``score``, of encoder classifiers ``classifier``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "score") and hasattr(base, base.base_model_prefix)


def shared_prompt_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          group_sizes: list[int], pad_id: int = 0) -> torch.Tensor:
    """(sum K,) rewards of a right-padded batch of groups, each group's prompt run once.

    input_ids, attention_mask: (sum K, T) as collated for training. The result equals
    ``model(input_ids, attention_mask).logits[:, 0]`` up to rounding.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix)
    prefixes, suffixes, sizes = split_groups(input_ids, attention_mask, group_sizes)
    device = input_ids.device
    prefix_ids, prefix_mask = _pad(prefixes, pad_id)
    prefix_len = prefix_mask.sum(1)
    cache = body(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                 use_cache=True).past_key_values
    # One cache row per reply: the group's prefix repeated K times (differentiable index_select).
    rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    cache.reorder_cache(rows.to(device))
    suffix_ids, suffix_mask = _pad(suffixes, pad_id)
    # The prefix's right padding sits between prefix and suffix: masked out, and positions count
    # only real prefix tokens, so each reply sees exactly what it sees in a separate forward.
    mask = torch.cat([prefix_mask[rows], suffix_mask], dim=1)
    positions = prefix_len[rows, None] + torch.arange(suffix_ids.shape[1])[None, :]
    hidden = body(input_ids=suffix_ids.to(device), attention_mask=mask.to(device),
                  position_ids=positions.to(device), past_key_values=cache,
                  use_cache=True).last_hidden_state
    last = hidden[torch.arange(len(suffixes), device=device), suffix_mask.sum(1).to(device) - 1]
    return base.score(last)[:, 0].float()

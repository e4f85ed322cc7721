"""Sampling K replies to each prompt from a causal LM: the prompt's KV cache computed once, every
reply drawn with its own seeded generator, and a LoRA policy sampled from a merged copy.

    copy = MergedCopy(policy)                  # LoRA: a plain model with the adapter merged in
    replies, ended = sample(copy.refresh(), prompt_ids, 4, seeds, pad, stop_ids, max_new_tokens=64)

``sample`` is a plain decoding loop over the model's forward and a ``DynamicCache``: the P prompts
run once (left-padded), their cache and last logits are repeated K times, and each step draws one
token for every row by inverse CDF with that row's generator (``draw``). On CPU, generate()'s
per-step machinery (logits processors, stopping criteria, ``torch.multinomial``'s exponential
draws over the whole vocabulary) costs more than the model's own decoding step at this size.
Models whose forward does not return a ``DynamicCache`` (hybrids with their own cache kinds) go
through generate() with the same draws, each prompt repeated K times.

``MergedCopy`` holds the policy's weights with W + (alpha / r) B A merged per layer, refreshed from
the adapter before each rollout: one matrix a layer instead of three and peft's wrapper, for the
memory of one more copy of the backbone. Without LoRA the policy itself is sampled.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from chatrlhf import decoding

# The forward's keyword (and output field) for the KV cache: `cache` from transformers 5.2,
# `past_key_values` before.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def draw(logits: torch.Tensor, generators: list[torch.Generator] | None, temperature: float = 1.0,
         top_p: float = 1.0) -> torch.Tensor:
    """(B,) one token per row of (B, V) ``logits``: row b from softmax(logits / temperature),
    truncated to its top-p nucleus (the most likely tokens up to mass top_p, the one crossing it
    included), by inverse CDF with one uniform from ``generators[b]``; None: greedy (argmax)."""
    if generators is None:
        return logits.argmax(-1)
    device, logits = logits.device, logits.float().cpu()  # the CPU's draws on any device
    scaled = logits - logits.max(-1, keepdim=True).values
    weights = (scaled if temperature == 1 else scaled.div_(temperature)).exp_()  # unnormalised
    order = None
    if top_p < 1:
        probs, order = (weights / weights.sum(-1, keepdim=True)).sort(-1, descending=True)
        weights = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = weights.cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators])
    # the first index whose cumulative mass exceeds u * total: never a zero-probability token
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        tokens = order.gather(-1, tokens)
    return tokens[:, 0].to(device)


class SeededDraw(LogitsProcessor):
    """``draw`` inside generate(), which then decodes greedily: each row's token from its own
    generator, so a prompt's reply depends on its seed, not on its batch."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = draw(scores, self.generators, self.temperature, self.top_p)
        return torch.full_like(scores, -math.inf).scatter(-1, tokens[:, None], 0.0)


def left_pad(prompt_ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) prompt ids padded on the left, so that every reply starts at column ``width``,
    and their (B, width) attention mask (1 on prompt tokens)."""
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompt_ids])).long()
    return ids, mask


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], group_size: int, seeds: list[int] | None, pad: int,
           stop_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           share_cache: bool = True, fast: bool = True) -> tuple[list[list[int]], torch.Tensor]:
    """``group_size`` replies to each prompt, row p * K + k drawn with ``seeds[p * K + k]`` (None:
    greedy). Returns (reply token lists up to and including the first stop token, (S,) whether
    each reply stopped by itself: False where it was cut at ``max_new_tokens``).

    With ``share_cache`` the prompts run once and their cache is repeated K times; without, each
    prompt is repeated K times first: the same replies (tests/test_grpo.py checks it). With
    ``fast`` a Llama-family model decodes with ``decoding.Decoder``'s step (its tied decoder where
    ``MergedCopy`` made one), else with its own forward; the prompts always run through it."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad)
    width = ids.shape[1]
    if not share_cache:
        ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds] if seeds is not None else None
    stops = torch.tensor(stop_ids, device=device)
    model.eval()
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    cache = getattr(out, CACHE_KEY)
    if not isinstance(cache, DynamicCache):
        return _generate(model, ids, mask, group_size if share_cache else 1, seeds, pad, stop_ids,
                         max_new_tokens, temperature, top_p)
    logits, last = out.logits[:, -1], positions[:, -1]
    if share_cache and group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits, mask, last = (t.repeat_interleave(group_size, 0) for t in (logits, mask, last))
    rows = logits.shape[0]
    decoder = decoding.Decoder.of(model) if fast else None
    if decoder is not None:
        state = decoder.start(cache, mask, max_new_tokens)
        del cache
    else:
        _reserve(cache, max_new_tokens)
        mask = torch.cat([mask, mask.new_ones(rows, max_new_tokens)], 1)
    tokens, ended = [], torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        token = draw(logits, generators, temperature, top_p).masked_fill(ended, pad)
        tokens.append(token)
        ended |= torch.isin(token, stops)
        if bool(ended.all()) or t + 1 == max_new_tokens:
            break
        last = last + 1
        if decoder is not None:
            logits = decoder.step(state, token, last)
            continue
        out = model(input_ids=token[:, None], attention_mask=mask[:, :width + t + 1], position_ids=last[:, None],
                    use_cache=True, **{CACHE_KEY: cache})
        logits = out.logits[:, -1]
    return _replies(torch.stack(tokens, 1), stop_ids)


class _ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with room for more tokens:
    an update writes the new tokens in place instead of concatenating (a copy of the whole
    layer's cache at every decoding step)."""

    def reserve(self, extra: int) -> None:
        size = self.keys.shape[-2]
        self.key_room = self.keys.new_empty(*self.keys.shape[:-2], size + extra, self.keys.shape[-1])
        self.value_room = self.values.new_empty(*self.values.shape[:-2], size + extra, self.values.shape[-1])
        self.key_room[..., :size, :], self.value_room[..., :size, :] = self.keys, self.values
        self.keys, self.values = self.key_room[..., :size, :], self.value_room[..., :size, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self.key_room[..., start:end, :], self.value_room[..., start:end, :] = key_states, value_states
        self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
        return self.keys, self.values


def _reserve(cache: DynamicCache, extra: int) -> None:
    """Room for ``extra`` more tokens in each layer of ``cache``, where all are plain DynamicLayers
    (sliding-window and other kinds keep their own update)."""
    if all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        for layer in cache.layers:
            layer.__class__ = _ReservedLayer
            layer.reserve(extra)


def _generate(model, ids, mask, repeat, seeds, pad, stop_ids, max_new_tokens, temperature, top_p):
    """``sample`` through generate(), each prompt repeated ``repeat`` times."""
    ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    processors = [SeededDraw(seeds, temperature, top_p)] if seeds is not None else []
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=stop_ids, logits_processor=LogitsProcessorList(processors))
    return _replies(out[:, ids.shape[1]:], stop_ids)


def reply_mask(reply_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) True up to and including each reply's first stop token (what is written after it is
    padding), and (B,) whether the reply has one (False: cut at max_new_tokens)."""
    is_stop = torch.isin(reply_ids, torch.tensor(stop_ids, device=reply_ids.device))
    return (is_stop.long().cumsum(-1) - is_stop.long()) == 0, is_stop.any(-1)


def _replies(reply_ids: torch.Tensor, stop_ids: list[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Each row up to and including its first stop token, and whether it has one."""
    keep, ended = reply_mask(reply_ids, stop_ids)
    return [row[k].tolist() for row, k in zip(reply_ids.cpu(), keep.cpu())], ended.cpu()


class MergedCopy:
    """A LoRA policy's weights merged into a plain copy of its backbone, to sample from.

    ``refresh()`` writes W + delta (peft's ``get_delta_weight``: alpha / r * B A) of every adapted
    layer into the copy and returns it; call it after each update. A policy without an adapter is
    returned as it is."""

    def __init__(self, policy):
        self.policy = policy
        self.model = copy.deepcopy(policy).merge_and_unload().eval() if hasattr(policy, "peft_config") else None
        if self.model is not None:
            self.model.requires_grad_(False)
            decoding.Decoder.tie(self.model)  # the fast decoding step reads the copy's own weights

    @torch.no_grad()
    def refresh(self):
        if self.model is None:
            return self.policy
        from peft.tuners.lora import LoraLayer

        for name, layer in self.policy.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                adapter = layer.active_adapters[0]
                target = self.model.get_submodule(name)
                target.weight.copy_(layer.get_base_layer().weight + layer.get_delta_weight(adapter))
        return self.model

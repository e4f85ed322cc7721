"""Shared-prompt forward for decoder reward models: each group's prompt is computed once.

The K replies of a group share their prompt, and in a causal decoder the prompt's hidden states
do not depend on what follows. So a group is packed into one sequence, its prompt followed by its
K replies, and an attention mask lets each reply see the prompt and itself only; each reply's
positions continue from the end of the prompt, as in a separate forward. Several groups share a
row when they fit (each sees only itself), so there is almost no padding either. Gradients flow
into the prompt's computation from all K replies, so loss and gradients equal K separate forwards
up to floating-point rounding (tests/test_sharing.py).

The shared part is the longest common token prefix of the group's sequences, not the prompt as
rendered: it equals the prompt whenever the template tokenises the prompt the same way whatever
follows, and it stays exact when it does not. Each reply keeps at least its last token. (Long
prompts are cut the same way for a group's replies, ``tokenize_groups(same_prompt=True)``, so
they stay shared.)

On CPU, for models that take a custom attention function (transformers' attention interface:
Llama, Qwen, Mistral, ...), the groups go one after another into a single row, no padding, and
each group attends on its own: its prompt and first reply as one causal sequence, each further
reply over the prompt and itself (``_group_attention``); the last layer's feed-forward block
runs at the reward tokens only. Against rows padded for one attention kernel with a dense mask,
that drops the padding (7% of the tokens on the benchmark's HH batches) and the scores of every
masked pair of tokens (62% of them): smollm2's forward and backward take 14% less time (README,
Speed). Elsewhere (GPUs, other models, or gradient checkpointing, whose backward recomputes the
layers after this forward has put the model's attention back) the groups are padded into rows
with a mask, as described above; a model whose layers mix sliding-window and full attention
(Gemma 2 and 3, Qwen2 with ``max_window_layers``) gets a mask for each kind of layer.

Encoders (BERT-like) attend in both directions, so their prompt states depend on the reply; they
are scored with ordinary batched forwards, as are decoders with recurrent or linear-attention
layers (Jamba, Qwen3-Next), which ignore the mask and would carry one reply into the next.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

# Devices where each group attends on its own (``_group_attention``); elsewhere one kernel on
# rows padded with a mask.
PER_GROUP_DEVICES = ("cpu",)
GROUP_ATTENTION = "chatrlhf_groups"  # the attention implementation's name while a forward runs
# Kinds of layer (transformers' ``layer_types``) that attend through a mask, as prompt sharing needs.
ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def split_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 group_sizes: list[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per group its shared prefix and its replies' own suffixes (token id lists)."""
    sequences = [ids[:int(n)].tolist() for ids, n in zip(input_ids, attention_mask.sum(1))]
    prefixes, suffixes, start = [], [], 0
    for size in group_sizes:
        group = sequences[start:start + size]
        length = common_prefix(group) if size > 1 else 0
        prefixes.append(group[0][:length])
        suffixes.append([s[length:] for s in group])
        start += size
    return prefixes, suffixes


@dataclass
class Packed:
    """Groups packed into rows: what the model reads, and where each reward is read off."""

    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width)
    attention_mask: torch.Tensor  # (rows, 1, width, width) bool, True = may attend
    reward_at: list[tuple[int, int]] = field(default_factory=list)  # (row, column) per reply


def pack(prefixes: list[list[int]], suffixes: list[list[list[int]]], pad_id: int) -> Packed:
    """Pack each group as prefix + its suffixes, groups placed first-fit (longest first) into
    rows as wide as the longest group."""
    lengths = [len(p) + sum(map(len, s)) for p, s in zip(prefixes, suffixes)]
    width = max(lengths)
    rows: list[list[int]] = []  # group indices per row
    room: list[int] = []
    for g in sorted(range(len(lengths)), key=lambda g: -lengths[g]):
        row = next((r for r, left in enumerate(room) if left >= lengths[g]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(g)
        room[row] -= lengths[g]
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    # A token sees an earlier token of its own group that is in the prefix or in its own reply.
    group_of = torch.full(shape, -1, dtype=torch.long)
    reply_of = torch.full(shape, -1, dtype=torch.long)  # -1 prefix, else the reply's number
    reward_at: dict[int, list[tuple[int, int]]] = {}
    for r, members in enumerate(rows):
        at = 0
        for g in members:
            prefix = prefixes[g]
            ids[r, at:at + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            positions[r, at:at + len(prefix)] = torch.arange(len(prefix))
            group_of[r, at:at + len(prefix)] = g
            at += len(prefix)
            reward_at[g] = []
            for k, suffix in enumerate(suffixes[g]):
                n = len(suffix)
                ids[r, at:at + n] = torch.tensor(suffix, dtype=torch.long)
                positions[r, at:at + n] = torch.arange(len(prefix), len(prefix) + n)
                group_of[r, at:at + n] = g
                reply_of[r, at:at + n] = k
                at += n
                reward_at[g].append((r, at - 1))
    index = torch.arange(width)
    causal = index[:, None] >= index[None, :]
    same_group = (group_of[:, :, None] == group_of[:, None, :]) & (group_of[:, None, :] >= 0)
    visible = (reply_of[:, None, :] == -1) | (reply_of[:, :, None] == reply_of[:, None, :])
    allowed = causal & same_group & visible
    # Padding sees itself only: a query that may attend to nothing would give NaN, and NaN
    # times a zero gradient is still NaN in the weights' gradients.
    allowed |= torch.eye(width, dtype=torch.bool)
    return Packed(ids, positions, allowed[:, None], [at for g in range(len(lengths)) for at in reward_at[g]])


def layer_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor, additive: torch.dtype | None = None):
    """The 4D attention mask to give ``config``'s decoder for rows of packed sequences (shared
    prompts here, SFT's packed examples); ``allowed`` (rows, 1, T, T) is True where a token may
    attend. A given 4D mask is used as it is (the model adds no sliding window to it), so for
    sliding-window layers the window is applied here, to the tokens' positions, as the model
    applies it to a separate sequence; a model whose layers mix sliding-window and full attention
    (Gemma 2 and 3, Qwen2 with ``max_window_layers``) gets a dict of one mask per kind of layer, as
    transformers' models take them. ``additive``: the masks as 0 / the dtype's minimum, added to
    the scores (eager attention), else bool."""
    window = getattr(config, "sliding_window", None)
    masks = {}
    for kind in layer_kinds(config):
        mask = allowed
        if kind == "sliding_attention" and window is not None:
            mask = mask & (position_ids[:, :, None] - position_ids[:, None, :] < window)[:, None]
        if additive is not None:
            mask = torch.zeros(mask.shape, dtype=additive, device=mask.device).masked_fill(
                ~mask, torch.finfo(additive).min)
        masks[kind] = mask
    return masks if len(masks) > 1 else masks.popitem()[1]


def layer_kinds(config) -> set[str]:
    """The kinds of layer of ``config``'s model, named as in transformers' ``layer_types``
    (``full_attention``, ``sliding_attention``, ``linear_attention``, ...); a config without
    ``layer_types`` has one kind: sliding-window attention where it names a window (Mistral),
    else full attention."""
    types = getattr(config, "layer_types", None)
    if types:
        return set(types)
    return {"sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"}


def unmasked_layers(config) -> list[str]:
    """The kinds of layer of ``config``'s model that ignore an attention mask (recurrent or
    linear-attention layers: Jamba, Qwen3-Next), which would carry one packed sequence into the
    next; empty where every layer attends through the mask, with or without a sliding window."""
    return sorted(layer_kinds(config) - ATTENTION_LAYERS)


def can_share(model) -> bool:
    """Whether the shared-prompt forward gives ``model``'s rewards: a decoder (``is_decoder``)
    whose layers all attend through a mask (``unmasked_layers``)."""
    return is_decoder(model) and not unmasked_layers(model.config)


def is_decoder(model) -> bool:
    """A causal decoder reward model: transformers names the head of decoder classifiers
    (Llama, Qwen, Mistral, GPT-2, ...) ``score``, of encoder classifiers ``classifier``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "score") and hasattr(base, base.base_model_prefix)


def shared_prompt_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          group_sizes: list[int], pad_id: int = 0, rows_per_forward: int = 0) -> torch.Tensor:
    """(sum K,) rewards of a right-padded batch of groups, each group's prompt run once.

    input_ids, attention_mask: (sum K, T) as collated for training. The result equals
    ``model(input_ids, attention_mask).logits[:, 0]`` up to rounding. ``rows_per_forward`` > 0
    sorts the groups by packed length and runs them in chunks of about that many of the
    batch's sequences (8: four pairs). Where the groups attend on their own (``attends_per_group``)
    a chunk is one row of its groups, one after another; elsewhere its groups are padded into
    rows only as wide as its own longest group: attention over padded rows costs the square of a
    row's width, so rows of similar groups cost less than wide rows shared by several short
    groups (smollm2 on HH: 15.6 s a step of 16 pairs, against 17.7-19.8 s with all groups in one
    forward). Single rows are chunked too: a whole batch in one row ran no faster, its
    activations (7400 tokens x 1536 for smollm2's feed-forward blocks) too large for the caches.
    """
    if not can_share(model):
        raise ValueError(f"prompt sharing needs a decoder whose layers all attend through a mask; "
                         f"{type(model).__name__} has {unmasked_layers(model.config)} layers, or is no decoder")
    from chatrlhf import training

    training.took("prompt sharing")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix)
    prefixes, suffixes = split_groups(input_ids, attention_mask, group_sizes)
    per_group = attends_per_group(body, input_ids.device, int(attention_mask.sum(1).max()))
    lengths = [len(p) + sum(map(len, s)) for p, s in zip(prefixes, suffixes)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    starts = list(accumulate(group_sizes, initial=0))
    chunks, current, replies = [], [], 0
    for g in order:
        current.append(g)
        replies += group_sizes[g]
        if rows_per_forward and replies >= rows_per_forward:
            chunks.append(current)
            current, replies = [], 0
    chunks += [current] if current else []
    pieces, positions = [], []
    for chunk in chunks:
        chunk_prefixes, chunk_suffixes = [prefixes[g] for g in chunk], [suffixes[g] for g in chunk]
        if per_group:
            pieces.append(_grouped_rewards(base, body, chunk_prefixes, chunk_suffixes, input_ids.device))
        else:
            pieces.append(_packed_rewards(base, body, pack(chunk_prefixes, chunk_suffixes, pad_id), input_ids.device))
        positions += [starts[g] + k for g in chunk for k in range(group_sizes[g])]
    return torch.cat(pieces)[torch.tensor(positions).argsort().to(input_ids.device)]


def _packed_rewards(base, body, packed: Packed, device) -> torch.Tensor:
    """Rewards of groups packed into rows, masked as ``layer_masks`` says."""
    eager = body.config._attn_implementation == "eager"  # eager attention adds its mask to the scores
    mask = layer_masks(body.config, packed.attention_mask.to(device), packed.position_ids.to(device),
                       body.dtype if eager else None)
    hidden = body(input_ids=packed.input_ids.to(device), attention_mask=mask,
                  position_ids=packed.position_ids.to(device), use_cache=False).last_hidden_state
    rows, columns = zip(*packed.reward_at)
    last = hidden[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
    return base.score(last)[:, 0].float()


def attends_per_group(body, device, longest: int = 0) -> bool:
    """Whether ``body`` (the model without its head) runs its groups in single rows on ``device``:
    its attention modules call transformers' attention interface, nothing but the causal mask
    limits what a token sees (no sliding window shorter than the ``longest`` sequence, no
    soft-capping), and no gradient checkpointing will recompute its layers after the forward."""
    config = body.config
    window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_kinds(config) else None
    return (device.type in PER_GROUP_DEVICES and getattr(body, "_supports_attention_backend", False)
            and (window is None or longest < window) and getattr(config, "attn_logit_softcapping", None) is None
            and not (getattr(body, "gradient_checkpointing", False) and body.training))


def _grouped_rewards(base, body, prefixes: list[list[int]], suffixes: list[list[list[int]]], device) -> torch.Tensor:
    """Rewards of the groups packed one after another into one row, each attending on its own."""
    ids, positions, reward_at = [], [], []
    for prefix, replies in zip(prefixes, suffixes):
        ids += prefix
        positions += range(len(prefix))
        for reply in replies:
            ids += reply
            positions += range(len(prefix), len(prefix) + len(reply))
            reward_at.append(len(ids) - 1)
    layout = [(len(prefix), [len(r) for r in replies]) for prefix, replies in zip(prefixes, suffixes)]
    reward_at = torch.tensor(reward_at, device=device)
    with _attention(body.config, GROUP_ATTENTION), _last_feed_forward_at(body, reward_at):
        hidden = body(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                      use_cache=False, chatrlhf_groups=layout).last_hidden_state
    return base.score(hidden[0, reward_at])[:, 0].float()


@contextmanager
def _last_feed_forward_at(body, tokens: torch.Tensor):
    """Within the block, the last layer's feed-forward block runs at ``tokens`` of the row only
    (the other tokens' outputs are the residual alone): rewards are read at those tokens, and no
    later layer reads the others. The feed-forward block is three quarters of a Llama layer:
    about 2.5% of smollm2's 30 layers. Plain MLPs only (a mixture of experts also routes)."""
    layers = getattr(body, "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if layers else None
    if mlp is None or not type(mlp).__name__.endswith("MLP"):
        yield
        return

    def forward(hidden, *args, **kwargs):  # hidden (1, T, H)
        return torch.zeros_like(hidden).index_copy(1, tokens, type(mlp).forward(mlp, hidden[:, tokens], *args, **kwargs))

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward  # back to the class's forward


@contextmanager
def _attention(config, name: str):
    """The model of ``config`` runs attention implementation ``name`` within the block."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _group_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, chatrlhf_groups=None,
                     **kwargs):
    """transformers' attention interface, for groups packed one after another in one row.

    query (1, heads, T, d), key and value (1, kv_heads, T, d); ``chatrlhf_groups`` lists each
    group's (prefix length, [reply lengths]) in the row's order. A group's prefix and first reply
    attend as one causal sequence; each further reply attends to the prefix and causally to
    itself. Returns ((1, T, heads, d), None) as the interface expects."""
    if chatrlhf_groups is None or query.shape[0] != 1:
        raise RuntimeError(f"the {GROUP_ATTENTION} attention runs within sharing.shared_prompt_rewards only")
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"the {GROUP_ATTENTION} attention does not support {', '.join(unsupported)}")
    window = kwargs.get("sliding_window")  # (Mistral passes its window) harmless when no sequence reaches it
    if window is not None and max(prefix + max(replies) for prefix, replies in chatrlhf_groups) >= window:
        raise ValueError(f"the {GROUP_ATTENTION} attention does not support a sliding window ({window} tokens) "
                         f"shorter than a sequence; attends_per_group chooses padded rows for those")
    options = {"dropout_p": dropout, "scale": scaling, "enable_gqa": query.shape[1] != key.shape[1]}
    out, start = [], 0
    for prefix, replies in chatrlhf_groups:
        end = start + prefix + replies[0]
        out.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                                  is_causal=True, **options))
        shared = slice(start, start + prefix)
        for length in replies[1:]:
            own = slice(end, end + length)
            # (length, prefix + length): all of the prefix, then causal within the reply.
            mask = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device).tril(prefix)
            out.append(F.scaled_dot_product_attention(
                query[:, :, own], torch.cat([key[:, :, shared], key[:, :, own]], 2),
                torch.cat([value[:, :, shared], value[:, :, own]], 2), attn_mask=mask, **options))
            end += length
        start = end
    return torch.cat(out, 2).transpose(1, 2), None


AttentionInterface.register(GROUP_ATTENTION, _group_attention)
# The layout is the mask: the model builds none.
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUP_ATTENTION, lambda *args, **kwargs: None)

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

from chatrlhf import models

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
    layout: list | None = None  # one row of groups: (prefix length, [reply lengths]) per group


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
    packed = _grouped_layout(prefixes, suffixes)
    reward_at = torch.tensor([column for _, column in packed.reward_at], device=device)
    with _attention(body.config, GROUP_ATTENTION), _last_feed_forward_at(body, reward_at):
        hidden = body(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                      use_cache=False, chatrlhf_groups=packed.layout).last_hidden_state
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


# ---- the policy's log-probabilities ---------------------------------------------------------

@dataclass
class TokenLogps:
    """Log-probabilities of the loss tokens of several sequences, one sequence after another."""

    values: torch.Tensor  # (N,) log p of each loss token, with the graph when the model has one
    lengths: list[int]  # loss tokens per sequence
    entropy: torch.Tensor | None = None  # (N,) entropy of each predicting distribution, no graph

    def split(self) -> list[torch.Tensor]:
        return list(self.values.split(self.lengths))

    def sums(self) -> torch.Tensor:
        """(S,) the log-probability of each sequence's loss tokens."""
        owner = torch.repeat_interleave(torch.arange(len(self.lengths), device=self.values.device),
                                        torch.tensor(self.lengths, device=self.values.device))
        return self.values.new_zeros(len(self.lengths)).index_add(0, owner, self.values)

    def means(self) -> torch.Tensor:
        """(S,) the mean log-probability per loss token of each sequence."""
        return self.sums() / torch.tensor(self.lengths, device=self.values.device).clamp(min=1)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, longest) values right-padded with 0, and the (S, longest) bool mask of real tokens."""
        values = torch.nn.utils.rnn.pad_sequence(self.split(), batch_first=True)
        mask = torch.arange(values.shape[1], device=values.device) < torch.tensor(
            self.lengths, device=values.device)[:, None]
        return values, mask


def policy_logps(model, sequences: list[list[int]], loss_starts: list[int], group_sizes: list[int] | None = None,
                 *, temperature: float = 1.0, entropy: bool = False, tokens_per_forward: int = 2048) -> TokenLogps:
    """log p of the tokens ``sequences[i][loss_starts[i]:]`` under a causal LM, each group's prompt
    computed once: the one forward of SFT, DPO (its policy and reference passes) and GRPO.

    ``group_sizes`` lists how many consecutive sequences share a prompt (the K replies of a group;
    None: none shared). A group's shared part is the common token prefix of its sequences, never
    reaching into a loss token; its replies attend to it as in ``shared_prompt_rewards`` (on CPU
    one row per forward without padding, elsewhere rows packed with a mask), groups sorted by
    length into forwards of about ``tokens_per_forward`` tokens. The output layer runs only where
    a loss token is predicted, in chunks (``_LossTokenLogps``): the (tokens x vocabulary) logits
    are never held whole, in the forward or the backward. ``temperature`` divides the logits, as
    sampling did (RL). Through the model's wrapper (DDP, FSDP), as an ordinary forward. Equal to
    separate forwards up to rounding (tests/test_policy_logps.py)."""
    group_sizes = group_sizes or [1] * len(sequences)
    if sum(group_sizes) != len(sequences) or len(loss_starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences, {len(loss_starts)} loss starts and groups of "
                         f"{sum(group_sizes)} sequences in all: they must agree")
    starts = [max(1, s) for s in loss_starts]  # a sequence's first token has no prediction
    from chatrlhf import training

    return training.call_through(model, lambda inner: _policy_logps(
        inner, sequences, starts, group_sizes, temperature, entropy, tokens_per_forward))


def _policy_logps(model, sequences, starts, group_sizes, temperature, entropy, tokens_per_forward) -> TokenLogps:
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    body, head = getattr(base, base.base_model_prefix), base.get_output_embeddings()
    device = head.weight.device
    if getattr(base.config, "final_logit_softcapping", None) or head.bias is not None:
        return _plain_logps(model, sequences, starts, temperature, entropy, device)
    share = not unmasked_layers(base.config)  # else each sequence in its own padded row
    per_group = share and attends_per_group(body, device, max(map(len, sequences)))
    # Per group: the shared prefix (none reaching a loss token) and each sequence's own part.
    groups, first = [], 0
    for size in group_sizes:
        members = list(range(first, first + size))
        length = min([common_prefix([sequences[i] for i in members])] + [starts[i] for i in members]) \
            if size > 1 and share else 0
        groups.append((members, length))
        first += size
    # Forwards of about tokens_per_forward tokens, groups of similar length together.
    cost = [length + sum(len(sequences[i]) - length for i in members) for members, length in groups]
    chunks, current, tokens = [], [], 0
    for g in sorted(range(len(groups)), key=cost.__getitem__):
        if current and tokens + cost[g] > tokens_per_forward:
            chunks.append(current)
            current, tokens = [], 0
        current.append(g)
        tokens += cost[g]
    chunks.append(current)
    from chatrlhf import training

    if any(length for _, length in groups):
        training.took("prompt sharing")
    training.took("reply-only output layer")
    hidden_pieces, owners = [], []  # hidden states predicting loss tokens, and their sequences
    for chunk in chunks:
        members = [i for g in chunk for i in groups[g][0]]
        prefixes = [sequences[groups[g][0][0]][:groups[g][1]] for g in chunk]
        suffixes = [[sequences[i][groups[g][1]:] for i in groups[g][0]] for g in chunk]
        if not share:
            layout = _padded_layout([sequences[i] for i in members])
        elif per_group:
            layout = _grouped_layout(prefixes, suffixes)
        else:
            layout = pack(prefixes, suffixes, base.config.pad_token_id or 0)
        # Flat indices (into the forward's rows x width hidden states) of the states that predict
        # each member's loss tokens: token t is predicted at t - 1, which for the first token of
        # a member's own part is the prefix's last token, just before the group's first reply.
        width, ends = layout.input_ids.shape[1], iter(layout.reward_at)
        index = []
        for g in chunk:
            members_g, length = groups[g]
            prefix_last = None
            for i in members_g:
                row, last = next(ends)
                own = row * width + last - (len(sequences[i]) - length) + 1
                prefix_last = own - 1 if prefix_last is None else prefix_last
                index += [prefix_last if t == length else own + t - 1 - length for t in range(starts[i], len(sequences[i]))]
        index = torch.tensor(index, dtype=torch.long, device=device)
        hidden_pieces.append(_hidden(body, layout, device, index, per_group))
        owners += members
    lengths = [len(s) - b for s, b in zip(sequences, starts)]
    by_owner = dict(zip(owners, torch.cat(hidden_pieces).split([lengths[i] for i in owners])))
    hidden = torch.cat([by_owner[i] for i in range(len(sequences))])
    targets = torch.tensor([t for s, b in zip(sequences, starts) for t in s[b:]], dtype=torch.long, device=device)
    if models.is_sharded(base):  # weights gathered for the forward only (ZeRO-3, FSDP 2), gone by the
        # backward: the output layer through autograd, unchunked
        logits = head(hidden).float() / temperature
        lse = logits.logsumexp(-1)
        values = logits.gather(-1, targets[:, None])[:, 0] - lse
        entropies = (lse - (logits.softmax(-1) * logits).sum(-1)).detach()
    else:
        values, entropies = _LossTokenLogps.apply(hidden, head.weight, targets, temperature, entropy)
    return TokenLogps(values, lengths, entropies if entropy else None)



def _grouped_layout(prefixes: list[list[int]], suffixes: list[list[list[int]]]) -> Packed:
    """Groups one after another in one row, as ``_group_attention`` reads them (no mask: the
    layout, in ``Packed.layout``, is the mask)."""
    ids, positions, ends = [], [], []
    for prefix, replies in zip(prefixes, suffixes):
        ids += prefix
        positions += range(len(prefix))
        for reply in replies:
            ids += reply
            positions += range(len(prefix), len(prefix) + len(reply))
            ends.append((0, len(ids) - 1))
    return Packed(torch.tensor([ids]), torch.tensor([positions]), None, ends,
                  [(len(prefix), [len(r) for r in replies]) for prefix, replies in zip(prefixes, suffixes)])


def _padded_layout(sequences: list[list[int]]) -> Packed:
    """Each sequence in its own right-padded row, the ordinary causal mask (for models whose
    layers ignore a mask: nothing can share a row)."""
    width = max(map(len, sequences))
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return Packed(ids, None, mask, [(row, len(s) - 1) for row, s in enumerate(sequences)])


def _hidden(body, layout: Packed, device, index: torch.Tensor, per_group: bool) -> torch.Tensor:
    """(len(index), hidden) the body's last hidden states at the flat ``index`` of its output."""
    ids = layout.input_ids.to(device)
    if layout.position_ids is None:  # padded rows
        hidden = body(input_ids=ids, attention_mask=layout.attention_mask.to(device), use_cache=False).last_hidden_state
    elif per_group:
        # unique: a prefix's last token predicts each of its replies' first tokens
        with _attention(body.config, GROUP_ATTENTION), _last_feed_forward_at(body, index.unique()):
            hidden = body(input_ids=ids, position_ids=layout.position_ids.to(device), use_cache=False,
                          chatrlhf_groups=layout.layout).last_hidden_state
    else:
        eager = body.config._attn_implementation == "eager"
        mask = layer_masks(body.config, layout.attention_mask.to(device), layout.position_ids.to(device),
                           body.dtype if eager else None)
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=layout.position_ids.to(device),
                      use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[index]


def _plain_logps(model, sequences, starts, temperature, entropy, device) -> TokenLogps:
    """Separate padded forwards through the whole model, for models whose logits are more than
    the output layer of the last hidden state (a logit soft-cap, a bias)."""
    layout = _padded_layout(sequences)
    # The class's forward: within call_through the instance's forward is this function's caller.
    logits = type(model).forward(model, input_ids=layout.input_ids.to(device),
                                 attention_mask=layout.attention_mask.to(device)).logits
    values, entropies = [], []
    for row, (s, b) in enumerate(zip(sequences, starts)):
        scaled = logits[row, b - 1:len(s) - 1].float() / temperature
        lse = scaled.logsumexp(-1)
        values.append(scaled.gather(-1, torch.tensor(s[b:], device=device)[:, None])[:, 0] - lse)
        if entropy:
            entropies.append((lse - (scaled.softmax(-1) * scaled).sum(-1)).detach())
    return TokenLogps(torch.cat(values), [len(s) - b for s, b in zip(sequences, starts)],
                      torch.cat(entropies) if entropy else None)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in place, no pass at all at temperature 1."""
    return logits if temperature == 1 else logits.div_(temperature)


class _LossTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[target] per token, the logits computed
    ``CHUNK`` tokens at a time and never kept whole: the forward keeps each token's logsumexp,
    the backward computes each chunk's logits again. With the output layer frozen (LoRA) the forward
    also computes d log p / d hidden (tokens x hidden, small) and the backward only scales it,
    so the output layer's matmuls are as many as autograd's on the whole logits. With the output
    layer trained (full fine-tuning) and the tokens within one chunk, the forward's softmax is
    kept for the first backward instead of computing the logits again."""

    CHUNK = 1024

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, entropy: bool):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        w = weight.to(dtype)
        store_grad = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        keep_probs = ctx.needs_input_grad[1] and 0 < len(targets) <= _LossTokenLogps.CHUNK
        logps = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        entropies = torch.empty_like(logps) if entropy else logps.new_empty(0)
        unit = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if store_grad else None
        for s in range(0, len(targets), _LossTokenLogps.CHUNK):
            part = slice(s, s + _LossTokenLogps.CHUNK)
            logits = _scaled((hidden[part].to(dtype) @ w.T).float(), temperature)
            logp = torch.log_softmax(logits, -1)  # one kernel; the whole-vocabulary passes are the cost here
            logps[part] = logp.gather(-1, targets[part, None])[:, 0]
            lse[part] = logits.gather(-1, targets[part, None])[:, 0] - logps[part]
            del logits
            if entropy:
                probs = logp.exp()
                entropies[part] = -(probs * logp).sum(-1)
            elif store_grad or keep_probs:
                probs = logp.exp_()
            if store_grad:  # d log p / d hidden = (weight[target] - probs @ weight) / temperature
                unit[part] = _scaled(w[targets[part]].float() - probs @ w.float(), temperature).to(dtype)
        ctx.temperature, ctx.dtype, ctx.store_grad = temperature, dtype, store_grad
        ctx.probs = probs if keep_probs else None
        ctx.save_for_backward(hidden, weight, targets, lse, unit if store_grad else lse.new_empty(0))
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad, _):
        hidden, weight, targets, lse, unit = ctx.saved_tensors
        if ctx.store_grad:
            return (grad[:, None] * unit.float()).to(hidden.dtype), None, None, None, None
        w = weight.to(ctx.dtype)
        kept, ctx.probs = ctx.probs, None  # the forward's softmax, for the first backward only
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for s in range(0, len(targets), _LossTokenLogps.CHUNK):
            part = slice(s, s + _LossTokenLogps.CHUNK)
            h = hidden[part].to(ctx.dtype)
            probs = kept if kept is not None else \
                _scaled((h @ w.T).float(), ctx.temperature).sub_(lse[part, None]).exp_()
            kept = None
            # d log p[target] / d logits = onehot(target) - softmax, times the incoming gradient
            d = probs.mul_(-grad[part, None])
            d[torch.arange(len(d), device=d.device), targets[part]] += grad[part]
            d = _scaled(d, ctx.temperature).to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = (d @ w).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                chunk_grad = (d.T @ h).float()
                grad_weight = chunk_grad if grad_weight is None else grad_weight.add_(chunk_grad)
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None, None

"""BERT-like reward models: the last layer computed for the first token only.

A BERT-like sequence classifier reads its score off the first token ([CLS]) of the last layer.
Every other token's last-layer output is computed and thrown away: its query, attention output
projection and feed-forward block. ``first_token_only(model)`` makes the last layer compute the
first token's output alone, with keys and values from all tokens as before, so the rewards and
gradients are those of the full forward up to rounding (tests/test_first_token.py). On MiniLM
(6 layers) that removes about a seventh of the compute.

It applies to encoders with the BERT layer layout whose classification head reads the first
token only (BERT, RoBERTa, XLM-R, ELECTRA); other models run unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Sequence classifiers whose head reads the first token of the last layer only.
FIRST_TOKEN_HEADS = ("bert", "roberta", "xlm-roberta", "electra")


def last_layer(model):
    """The last encoder layer when ``model`` qualifies (see the module docstring), else None."""
    model = getattr(model, "module", model)  # under DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in FIRST_TOKEN_HEADS:
        return None
    body = getattr(base, base.base_model_prefix, None)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    parts = [getattr(attention, name, None) for name in ("query", "key", "value")]
    if None in parts or not all(hasattr(layer, name) for name in ("intermediate", "output")):
        return None
    if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
        return None
    return layer


def _first_token_forward(layer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         *args, **kwargs) -> torch.Tensor:
    """The layer's output at position 0 only, shape (B, 1, H): queries from the first token,
    keys and values from every token, as the full layer computes them."""
    attention = layer.attention.self
    batch, _, _ = hidden_states.shape
    heads = (batch, -1, attention.num_attention_heads, attention.attention_head_size)
    first = hidden_states[:, :1]
    query = attention.query(first).view(heads).transpose(1, 2)
    key = attention.key(hidden_states).view(heads).transpose(1, 2)
    value = attention.value(hidden_states).view(heads).transpose(1, 2)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :1]  # the first query's row: (B, 1, 1, T)
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)  # an additive mask (eager attention), in autocast's dtype
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attention.scaling)
    context = context.transpose(1, 2).reshape(batch, 1, -1)
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)


@contextmanager
def first_token_only(model):
    """Within the block, a qualifying model's last layer computes the first token only (its
    last hidden state then has length 1); other models are left as they are."""
    layer = last_layer(model)
    if layer is None:
        yield
        return
    layer.forward = lambda *args, **kwargs: _first_token_forward(layer, *args, **kwargs)
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward

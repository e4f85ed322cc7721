"""One decoding step of a Llama-family model written for a few rows on the CPU, where sampling K
replies to a handful of prompts spends its time.

    decoder = Decoder.of(model)                 # None: not a supported model, use its own forward
    state = decoder.start(cache, mask, room=64)  # the prompts' DynamicCache and (B, T) mask
    logits = decoder.step(state, tokens, positions)   # (B,) tokens in, (B, V) next-token logits out

Decoding multiplies every weight matrix by a (hidden x B) block of B = P x K rows, 16 in the GRPO
preset: memory-bound work where the layout of the product decides the speed. Three things make
generation 1.6x faster than with the model's own forward on a 2-core AVX2 CPU (docs/benchmarks.md):

- The products run as W @ h with the hidden states kept as columns (hidden, B), not as
  ``F.linear``'s h @ W^T: the BLAS reads W in its stored order, 1.4-2.7x faster at 16 rows.
- The query, key and value maps are one product over their stacked weights, and so are the MLP's
  gate and up maps: 4 products a layer instead of 7, larger ones that stream better.
- Attention over the cache groups the query heads of each key head (no ``repeat_kv`` copies), and
  the mask, rotary tables and cache writes are plain tensor ops, without the per-step mask and
  cache machinery of the model's forward.

It computes what the model's forward computes (tests/test_decoding.py compares the logits step by
step, Llama with and without LoRA merged in, and Qwen2's biased projections); models it does not
cover (sliding-window or other kinds of layer, other activations, peft wrappers) keep their own
forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chatrlhf.sharing import layer_kinds

# the model types whose decoder layers are LlamaDecoderLayer's computation; others keep their forward
SUPPORTED = {"llama", "mistral", "qwen2"}
HEAD_SLICE = 2048  # rows of the output layer per product


@dataclass
class Layer:
    norm_in: torch.Tensor  # (D,)
    qkv: torch.Tensor  # ((H + 2 KV) hd, D): the query, key and value maps stacked
    qkv_bias: torch.Tensor | None  # ((H + 2 KV) hd, 1)
    out: torch.Tensor  # (D, H hd)
    norm_post: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 F, D): the gate and up maps stacked
    down: torch.Tensor  # (D, F)


@dataclass
class State:
    keys: list[torch.Tensor]  # per layer (B, KV, T + room, hd), written up to ``length``
    values: list[torch.Tensor]
    bias: torch.Tensor  # (B, 1, 1, T + room) 0 where a row attends, -inf on its left padding
    length: int  # columns of the cache written so far


class Decoder:
    """A Llama-family causal LM's weights stacked for ``step``. Build it after each update of the
    model (the stacking copies the q/k/v and gate/up weights: about 70 % of the backbone)."""

    def __init__(self, model):
        config = model.config
        self.model = model
        backbone = model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.act = backbone.layers[0].mlp.act_fn
        self.scaling = backbone.layers[0].self_attn.scaling
        self.rotary = backbone.rotary_emb
        self.layers = [self._layer(layer) for layer in backbone.layers]
        self.norm = backbone.norm.weight
        self.head = model.lm_head.weight

    @staticmethod
    def of(model) -> Decoder | None:
        """The decoder tied to ``model`` (``tie``) if it has one, else a new one; None where this
        step does not reproduce the model's forward."""
        tied = getattr(model, "chatrlhf_decoder", None)
        if tied is not None:
            return tied
        return Decoder(model) if supports(model) else None

    @staticmethod
    def tie(model) -> Decoder | None:
        """A decoder whose stacked weights become the model's own: its q/k/v and gate/up weights
        are made views of them, so writing into the model's weights in place (``MergedCopy``'s
        refresh) updates both, with no second copy. For a frozen model only (the optimizer of a
        trained one would hold the replaced parameters)."""
        if not supports(model):
            return None
        decoder = Decoder(model)
        for layer, stacked in zip(model.model.layers, decoder.layers):
            attention, mlp = layer.self_attn, layer.mlp
            for maps, weight in (((attention.q_proj, attention.k_proj, attention.v_proj), stacked.qkv),
                                 ((mlp.gate_proj, mlp.up_proj), stacked.gate_up)):
                for linear, part in zip(maps, weight.split([m.out_features for m in maps])):
                    linear.weight = torch.nn.Parameter(part, requires_grad=False)
        model.chatrlhf_decoder = decoder
        return decoder

    @torch.no_grad()
    def _layer(self, layer) -> Layer:
        attention, mlp = layer.self_attn, layer.mlp
        maps = (attention.q_proj, attention.k_proj, attention.v_proj)
        biases = [m.bias for m in maps]
        return Layer(layer.input_layernorm.weight, torch.cat([m.weight for m in maps]),
                     torch.cat(biases)[:, None] if all(b is not None for b in biases) else None,
                     attention.o_proj.weight, layer.post_attention_layernorm.weight,
                     torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight)

    @torch.no_grad()
    def start(self, cache, mask: torch.Tensor, room: int) -> State:
        """The decoding state after the prompts: ``cache`` (a DynamicCache of B rows, its keys
        already rotated) copied into buffers with ``room`` more columns; ``mask`` (B, T) 1 on the
        prompt tokens."""
        keys, values = [], []
        for layer in cache.layers:
            b, kv, t, hd = layer.keys.shape
            for source, into in ((layer.keys, keys), (layer.values, values)):
                buffer = source.new_empty(b, kv, t + room, hd)
                buffer[:, :, :t] = source
                into.append(buffer)
        attend = torch.cat([mask.bool(), mask.new_ones(mask.shape[0], room, dtype=torch.bool)], 1)
        bias = torch.zeros(attend.shape, dtype=keys[0].dtype, device=mask.device).masked_fill_(~attend, -math.inf)
        return State(keys, values, bias[:, None, None, :], mask.shape[1])

    @torch.no_grad()
    def step(self, state: State, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, V) logits after one more token per row: ``tokens`` (B,) at ``positions`` (B,)."""
        rows, hd = tokens.shape[0], self.head_dim
        hidden = self.model.model.embed_tokens(tokens).t()  # (D, B): columns, so W @ hidden
        cos, sin = self.rotary(hidden, positions[:, None])  # (B, 1, hd)
        # Llama's rotate_half(x) * sin as roll(x) * sin with the sign of its first half flipped
        sin = torch.cat([-sin[..., :self.head_dim // 2], sin[..., self.head_dim // 2:]], -1)
        at, state.length, bias = state.length, state.length + 1, state.bias
        for layer, keys, values in zip(self.layers, state.keys, state.values):
            qkv = torch.mm(layer.qkv, _rms_norm(hidden, layer.norm_in, self.eps))
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            qkv = qkv.t().view(rows, self.heads + 2 * self.kv_heads, hd)
            rotated = torch.addcmul(qkv[:, :self.heads + self.kv_heads] * cos,
                                    qkv[:, :self.heads + self.kv_heads].roll(hd // 2, -1), sin)  # queries, keys
            query = rotated[:, :self.heads]  # (B, H, hd)
            keys[:, :, at] = rotated[:, self.heads:]
            values[:, :, at] = qkv[:, self.heads + self.kv_heads:]
            # the query heads of a key head as one (H / KV, hd) block against its keys, read in
            # place from the cache buffers (B KV, columns, hd): no copy of the cache per step
            columns = keys.shape[2]
            scores = torch.bmm(query.reshape(rows * self.kv_heads, -1, hd),
                               keys.view(-1, columns, hd)[:, :at + 1].transpose(1, 2))
            weights = scores.view(rows, self.kv_heads, -1, at + 1).mul_(self.scaling).add_(bias[..., :at + 1])
            attended = torch.bmm(weights.softmax(-1).view(rows * self.kv_heads, -1, at + 1),
                                 values.view(-1, columns, hd)[:, :at + 1])
            hidden = torch.addmm(hidden, layer.out, attended.view(rows, -1).t())
            gate, up = torch.mm(layer.gate_up, _rms_norm(hidden, layer.norm_post, self.eps)).chunk(2)
            hidden = torch.addmm(hidden, layer.down, self.act(gate).mul_(up))
        # The output layer in slices of the vocabulary (10 % faster than one product of 49,152
        # rows), into a (V, B) buffer returned as its (B, V) view: ``sampling.draw`` reads the view
        # as fast as a contiguous tensor, and transposing it would cost a third of the product.
        normed, vocabulary = _rms_norm(hidden, self.norm, self.eps), self.head.shape[0]
        logits = hidden.new_empty(vocabulary, rows)
        for start in range(0, vocabulary, HEAD_SLICE):
            torch.mm(self.head[start:start + HEAD_SLICE], normed, out=logits[start:start + HEAD_SLICE])
        return logits.t()


def supports(model) -> bool:
    """Whether ``Decoder.step`` computes what ``model``'s forward computes: a Llama-like causal LM
    (SiLU MLP without biases, full attention in every layer, one output layer without bias), not
    wrapped by peft (whose adapters this step would skip: ``MergedCopy`` merges them first)."""
    config = getattr(model, "config", None)
    return (config is not None and not hasattr(model, "peft_config") and config.model_type in SUPPORTED
            and type(model).__name__.endswith("ForCausalLM") and layer_kinds(config) == {"full_attention"}
            and getattr(config, "hidden_act", None) == "silu" and not getattr(config, "mlp_bias", False)
            and getattr(config, "pretraining_tp", 1) == 1 and hasattr(model, "model")
            and getattr(model, "lm_head", None) is not None and model.lm_head.bias is None)


def _rms_norm(columns: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of each of the (D, B) columns over its D features, as (D, B) columns."""
    scale = columns.float().pow(2).mean(0, keepdim=True).add_(eps).rsqrt_()
    return weight[:, None] * (columns.float() * scale).to(columns.dtype)


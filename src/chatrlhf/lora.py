"""peft's LoRA linear layer with its forward and backward written as one autograd function, for CPU.

peft computes ``base(x) + B(A(dropout(x))) * scaling`` as five autograd nodes: besides the three
matrix products, the scaling multiplies and the sum adds a whole (tokens x out) tensor in the
forward, the backward multiplies the gradient by the scaling again and adds the two input
gradients. On a CPU those passes over memory cost a large share of a step next to the small
matrix products of a 135M model. Here the low-rank product is accumulated into the base output
in place (``addmm_`` with alpha = scaling), and the backward folds the scaling into the
(tokens x r) gradient and accumulates the input gradient in place: the same values (to float
rounding), fewer passes. Dropout draws the same coins as ``chatrlhf.dropout``.

    use_fused_lora(model)      # every peft lora.Linear of model; policy.load_policy and models.load call it

Only plain LoRA on CPU takes this path: DoRA and other variants, several active adapters,
``adapter_names`` batches, merged or disabled adapters, and other devices (where the passes are
cheap) run peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from chatrlhf.dropout import keep_mask


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * (x * keep / (1 - p)) A^T B^T, keep the 0/1 dropout mask (None: no
    dropout); 1 / (1 - p) scales the (tokens x r) product, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, keep, p: float):
        dropped = x * keep if keep is not None else x
        low = F.linear(dropped, lora_a)  # (..., r)
        if keep is not None:
            low.mul_(1 / (1 - p))
        out = F.linear(x, weight, bias)
        out.view(-1, out.shape[-1]).addmm_(low.view(-1, low.shape[-1]), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, low, keep, weight, lora_a, lora_b)
        ctx.scaling, ctx.p = scaling, p
        return out

    @staticmethod
    def backward(ctx, grad):
        dropped, low, keep, weight, lora_a, lora_b = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_low = (grad2 @ lora_b).mul_(ctx.scaling)  # (tokens, r)
        grad_mid = grad_low.mul(1 / (1 - ctx.p)) if keep is not None else grad_low  # d loss / d (dropped A^T)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2 @ weight
            if keep is None:
                grad_x.addmm_(grad_mid, lora_a)
            else:
                grad_x.addcmul_(grad_mid @ lora_a, keep.reshape(grad_x.shape))
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        grad_a = grad_mid.t() @ dropped.reshape(-1, dropped.shape[-1]) if ctx.needs_input_grad[3] else None
        grad_b = (grad2.t() @ low.reshape(-1, low.shape[-1])).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None, None, None  # W and b are frozen (else peft's path)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A lora.Linear's forward: ``_LoraLinear`` where it applies, else peft's own."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (x.device.type != "cpu" or args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {})
            or any(p.requires_grad for p in self.base_layer.parameters())):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base = self.base_layer
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    dropout = self.lora_dropout[name]
    p = getattr(dropout, "p", 0.0)
    keep = keep_mask(x.shape, p, dtype, scaled=False) if p and dropout.training else None
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(cast(x), cast(base.weight), cast(base.bias), cast(self.lora_A[name].weight),
                                 cast(self.lora_B[name].weight), self.scaling[name], keep, p)


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft ``lora.Linear`` of ``model`` the fused forward above; returns how many."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return 0
    layers = [m for m in model.modules() if type(m) is Linear and not getattr(m, "fan_in_fan_out", False)]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)

"""Faster stand-ins for what the CPU profile of a QLoRA step found slow; the same maths.

Profiled with `torch.profiler` on SmolLM2-135M (4-bit NF4 base, bf16, LoRA rank 8 on all seven
projections, dropout 0.1, micro-batch 8 x 256 packed, 2 CPU cores), PEFT's LoRA branch cost more
than the frozen 4-bit matmuls it rides on: per projection it clones the base output, casts the
input to fp32, draws a dropout mask with torch's CPU generator (`bernoulli_`, 15% of the step on
its own: one Mersenne-Twister number at a time, about 5 ms per 2048 x 576 input, more than the
layer's bf16 matmul), multiplies, scales and casts the output back, each a pass over the whole
activation, and keeps an fp32 mask and an fp32 copy of the input per projection for the backward.

`use_fused_lora` replaces that branch with one autograd function per projection: the mask drawn
by NumPy's PCG64 (3x faster) and kept as bools, the input kept once in its own dtype (the seven
projections of a layer share two inputs), the fp32 LoRA maths unchanged, the sum added into the
base output in place. Imported by the trainer only (needs torch at import time).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch


class LoraDropout(torch.nn.Module):
    """`nn.Dropout(p)` for a LoRA input, whose CPU masks come from NumPy's PCG64.

    Each element is zeroed with probability p and the others scaled by 1/(1-p), as
    `nn.Dropout` does. The generator is seeded from torch's, so torch's RNG state (which
    checkpoints save, and activation checkpointing restores for its recomputation) still fixes
    every mask. On CUDA, masks come from torch (its Philox generator is fast).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Bools shaped like `x`, True where an element is kept; None when nothing is dropped."""
        if not self.training or self.p == 0.0:
            return None
        if x.device.type != "cpu":
            return torch.rand(x.shape, device=x.device) >= self.p
        seed = int(torch.randint(2**63 - 1, (), dtype=torch.int64))
        uniform = np.random.Generator(np.random.PCG64(seed)).random(tuple(x.shape), dtype=np.float32)
        return torch.from_numpy(uniform >= np.float32(self.p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep_mask(x)
        return x if keep is None else x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraAdd(torch.autograd.Function):
    """`result += scaling * dropout(x) @ A^T @ B^T`, the LoRA maths in A's dtype (fp32), in place."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
        x_lora = _dropped(x, weight_a.dtype, keep, keep_scale)
        hidden = (x_lora @ weight_a.t()).mul_(scaling)  # rank-wide: scaling here costs nothing
        result.add_(hidden @ weight_b.t())
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, keep, hidden, weight_a, weight_b)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, hidden, weight_a, weight_b = ctx.saved_tensors
        grad_lora = grad.to(weight_b.dtype)
        grad_hidden = (grad_lora @ weight_b).mul_(ctx.scaling)
        grad_b = grad_lora.flatten(0, -2).t() @ hidden.flatten(0, -2)
        x_lora = _dropped(x, weight_a.dtype, keep, ctx.keep_scale)
        grad_a = grad_hidden.flatten(0, -2).t() @ x_lora.flatten(0, -2)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_hidden @ weight_a
            if keep is not None:
                grad_x = grad_x.mul_(keep).mul_(ctx.keep_scale)
            grad_x = grad_x.to(x.dtype)
        return grad, grad_x, grad_a, grad_b, None, None, None


def _dropped(x: torch.Tensor, dtype: torch.dtype, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    if keep is None:
        return x.to(dtype)
    return x.to(dtype, copy=True).mul_(keep).mul_(keep_scale)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT LoRA layer's forward through `_LoraAdd`; PEFT's own for anything but one plain adapter on CPU."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or x.device.type != "cpu"
            or name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or not isinstance(self.lora_dropout[name], LoraDropout | torch.nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if result._base is not None or result.is_leaf:
        # Some bitsandbytes CPU paths return a view; adding in place needs a tensor of its own.
        result = result.clone()
    dropout = self.lora_dropout[name]
    keep = dropout.keep_mask(x) if isinstance(dropout, LoraDropout) else None
    keep_scale = 1.0 / (1.0 - dropout.p) if keep is not None else 1.0
    return _LoraAdd.apply(result, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], keep,
                          keep_scale)


def use_fused_lora(peft_model: Any) -> int:
    """Route every LoRA projection of `peft_model` through `_LoraAdd`. Returns how many were routed.

    Only LoRA layers over a plain or a 4-bit linear layer (8-bit ones keep PEFT's forward); the
    adapter's parameters and its saved form are PEFT's, untouched. Deleting a layer's `forward`
    attribute gives it back PEFT's.
    """
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.layer import Linear

    # PEFT defines its 4-bit LoRA layer only where bitsandbytes has 4-bit support.
    layers = tuple(cls for cls in (Linear, getattr(lora_bnb, "Linear4bit", None)) if cls is not None)
    routed = 0
    for module in peft_model.modules():
        if not isinstance(module, layers):
            continue
        for name, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout):
                module.lora_dropout[name] = LoraDropout(dropout.p)
        module.forward = types.MethodType(_fused_forward, module)
        routed += 1
    return routed

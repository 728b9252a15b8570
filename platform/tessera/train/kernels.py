"""Faster stand-ins for what the CPU profile of a QLoRA step found slow.

Profiled with `torch.profiler` on SmolLM2-135M (4-bit NF4 base, bf16, LoRA rank 8 on all seven
projections, dropout 0.1, packed micro-batches, 2 CPU cores), PEFT's LoRA branch cost more than
the frozen 4-bit matmuls it rides on. Per projection it clones the base output, casts the input
to fp32, draws a dropout mask with torch's CPU generator (`bernoulli_`: 15% of the step on its
own, one Mersenne-Twister number at a time, about 5 ms per 2048 x 576 input, more than the
layer's bf16 matmul), runs the rank-8 matmuls in fp32 (several times slower than bf16 on this
CPU), scales and casts the output back, each a pass over the whole activation, and keeps an
fp32 mask and an fp32 copy of its input for the backward.

`use_fused_lora` replaces that branch with one autograd function per projection: the mask drawn
by NumPy's PCG64 (3x faster), the matmuls in the base's compute dtype (bf16, with fp32 weights
and optimizer, as autocast does), the scales on the rank-wide activation, the sum added into the
base output in place, and for the backward only the input in its own dtype (the projections
reading one input share it) and a 0/1 mask. Imported by the trainer only (needs torch).
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
    every mask. On CUDA it is `F.dropout` (torch's Philox generator is fast there).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def keep_mask(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """1 where an element of `x` (on CPU) is kept, 0 where dropped, in `dtype`; None when nothing is dropped.

        In the dtype it multiplies (0 and 1 are exact in any) because torch's CPU kernels on bool tensors
        (multiply by, convert from) are several times slower than a same-dtype multiply.
        """
        if not self.training or self.p == 0.0:
            return None
        seed = int(torch.randint(2**63 - 1, (), dtype=torch.int64))
        uniform = np.random.Generator(np.random.PCG64(seed)).random(tuple(x.shape), dtype=np.float32)
        return torch.from_numpy((uniform >= np.float32(self.p)).astype(np.float32)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        keep = self.keep_mask(x, x.dtype)
        return x if keep is None else x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraAdd(torch.autograd.Function):
    """`result += scaling * (x * keep / (1-p)) @ A^T @ B^T`, in place, in the base's compute dtype.

    The matmuls take the LoRA weights cast to the dtype of `result` (bf16 on a bf16 base, as
    autocast would: the weights and the optimizer stay fp32, the weight gradients come back in
    fp32). Both scales go onto the rank-wide hidden activation, in fp32. Keeps `x` (shared by the
    projections that read the same input), the mask and the hidden activation for the backward.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scale: float, keep: torch.Tensor | None) -> torch.Tensor:
        dtype = result.dtype
        x_lora = x.to(dtype) if keep is None else x.to(dtype) * keep
        hidden = (x_lora @ weight_a.to(dtype).t()).float().mul_(scale).to(dtype)
        result.add_(hidden @ weight_b.to(dtype).t())
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, keep, hidden, weight_a, weight_b)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, hidden, weight_a, weight_b = ctx.saved_tensors
        dtype = hidden.dtype
        grad = grad.to(dtype)
        grad_hidden = (grad @ weight_b.to(dtype)).float().mul_(ctx.scale).to(dtype)
        grad_b = grad.flatten(0, -2).t() @ hidden.flatten(0, -2)
        x_lora = x.to(dtype) if keep is None else x.to(dtype) * keep
        grad_a = grad_hidden.flatten(0, -2).t() @ x_lora.flatten(0, -2)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_hidden @ weight_a.to(dtype)
            if keep is not None:
                grad_x = grad_x.mul_(keep)
            grad_x = grad_x.to(x.dtype)
        return grad, grad_x, grad_a.to(weight_a.dtype), grad_b.to(weight_b.dtype), None, None


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
    scale = self.scaling[name]
    keep = None
    if isinstance(dropout, LoraDropout):
        keep = dropout.keep_mask(x, result.dtype)
        if keep is not None:
            scale /= 1.0 - dropout.p
    return _LoraAdd.apply(result, x, self.lora_A[name].weight, self.lora_B[name].weight, scale, keep)


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

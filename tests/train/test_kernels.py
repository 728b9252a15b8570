"""The trainer's fused LoRA branch and fast dropout compute what PEFT's LoRA layers compute.

On the real 4-bit NF4 tiny model (bitsandbytes' CPU backend) and on plain tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tessera.train.kernels import LoraDropout, _LoraAdd

from .test_modeling import TARGETS, batch, qlora_job


def loss_and_gradients(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch(), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_fused_lora_layers_give_peft_s_loss_and_gradients(tiny_model_dir: Path) -> None:
    """In fp32 compute, so that the two agree to the bit (in bf16 PEFT rounds the LoRA output
    to bf16 before adding it, the fused branch rounds the sum once: they differ by rounding)."""
    from tessera.train.modeling import attach_lora, load_base_model

    job = qlora_job(tiny_model_dir, target_modules=TARGETS)
    torch.manual_seed(0)
    model = attach_lora(load_base_model(tiny_model_dir, job, "float32"), job)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    routed = [m for m in model.modules() if "forward" in vars(m)]
    assert len(routed) == len(TARGETS) * model.get_base_model().config.num_hidden_layers
    fused_loss, fused = loss_and_gradients(model)
    for module in routed:
        del module.forward  # PEFT's own forward again
    peft_loss, peft = loss_and_gradients(model)
    torch.testing.assert_close(fused_loss, peft_loss)
    assert fused.keys() == peft.keys() and len(fused) == 2 * len(routed)
    for name, gradient in peft.items():
        torch.testing.assert_close(fused[name], gradient, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_branch_with_dropout_has_the_gradients_of_its_plain_autograd_form(dtype: torch.dtype) -> None:
    """To fp32 rounding in fp32; to bf16 rounding (a few parts in a thousand of the largest value) in bf16."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 24, generator=generator).to(dtype).requires_grad_()
    a = torch.randn(4, 24, generator=generator).requires_grad_()
    b = torch.randn(32, 4, generator=generator).requires_grad_()
    base = torch.randn(2, 16, 32, generator=generator).to(dtype).requires_grad_()
    keep = (torch.rand(2, 16, 24, generator=generator) >= 0.25).to(dtype)
    upstream = torch.randn(2, 16, 32, generator=generator).to(dtype)

    def run(fused: bool) -> list[torch.Tensor]:
        for tensor in (x, a, b, base):
            tensor.grad = None
        result = base * 1  # a fresh output, as a base layer's
        if fused:
            out = _LoraAdd.apply(result, x, a, b, 0.5 / 0.75, keep)
        else:  # in fp32, as PEFT computes it
            out = result + (((x.float() * keep / 0.75) @ a.t() @ b.t()) * 0.5).to(dtype)
        out.backward(upstream)
        return [out.detach(), x.grad, a.grad, b.grad, base.grad]

    for fused, plain in zip(run(True), run(False), strict=True):
        assert fused.dtype == plain.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(fused, plain)
        else:
            assert (fused.float() - plain.float()).abs().max() <= 1e-2 * plain.float().abs().max()


def test_lora_dropout_drops_p_of_the_elements_and_scales_the_rest() -> None:
    dropout = LoraDropout(0.1)
    x = torch.ones(512, 512)
    torch.manual_seed(3)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    torch.manual_seed(3)
    assert torch.equal(dropout(x), y)  # torch's RNG state fixes the mask: resumes draw the same
    assert not torch.equal(dropout(x), y)
    dropout.eval()
    assert dropout(x) is x

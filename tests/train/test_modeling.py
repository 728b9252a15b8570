"""The QLoRA model on CPU: the AVX512-BF16 repacking trap, and the answer-only loss.

bitsandbytes' CPU backend stands in for its CUDA kernels here (no GPU); the 4-bit NF4 weights and
LoRA layers are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tessera.api import FineTuneJob

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_job(model_dir: Path, **lora: Any) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "modeling"},
        "spec": {
            "baseModel": {"uri": str(model_dir), "quantization": {"bits": 4}, "computeDtype": "bfloat16"},
            "dataset": {"uri": "unused.csv", "task": "sentiment"},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, **lora},
            "training": {"gradientCheckpointing": False},
        },
    })


def qlora_model(model_dir: Path, job: FineTuneJob, guard: bool = True) -> Any:
    from tessera.train.modeling import attach_lora, load_base_model

    model = load_base_model(model_dir, job, "bfloat16")
    if not guard:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = attach_lora(model, job)
    # Non-zero B, so that every LoRA weight gets a gradient that depends on the base weights.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(10, 2000, (2, 48), generator=generator)
    labels = input_ids.clone()
    labels[:, :40] = -100
    return {"input_ids": input_ids, "labels": labels}


def lora_gradients(model: Any) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch(), use_cache=False).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def evaluation_pass(model: Any) -> None:
    """What evaluation and generation do between training steps: a forward without gradients."""
    model.eval()
    with torch.inference_mode():
        model.generate(input_ids=batch()["input_ids"][:, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_gradients_after_an_evaluation_pass_equal_those_before(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    job = qlora_job(tiny_model_dir, target_modules=TARGETS)
    model = qlora_model(tiny_model_dir, job)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not any(m.support_avx512bf16_for_cpu for m in quantized)
    before = lora_gradients(model)
    assert len(before) == 2 * len(TARGETS) * model.get_base_model().config.num_hidden_layers
    evaluation_pass(model)
    after = lora_gradients(model)
    for name, gradient in before.items():
        torch.testing.assert_close(after[name], gradient, rtol=0, atol=0, msg=name)


def test_without_the_guard_this_cpu_would_train_on_wrong_gradients(tiny_model_dir: Path) -> None:
    """The trap is real where the test runs: otherwise the test above would prove nothing here."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    job = qlora_job(tiny_model_dir, target_modules=TARGETS)
    model = qlora_model(tiny_model_dir, job, guard=False)
    before = lora_gradients(model)
    evaluation_pass(model)
    after = lora_gradients(model)
    assert max((after[n] - g).abs().max().item() for n, g in before.items()) > 1e-3


@pytest.mark.parametrize("packed", [False, True])
def test_answer_only_loss_equals_the_models_own(tiny_model_dir: Path, packed: bool) -> None:
    from tessera.train.engine import AnswerLoss

    job = qlora_job(tiny_model_dir)
    model = qlora_model(tiny_model_dir, job)
    inputs = batch()
    if packed:
        # Two sequences per row, positions restarting: the block-diagonal mask of packing.
        inputs["position_ids"] = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)
    else:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][1, :5] = 0
    loss_module = AnswerLoss(model)
    assert loss_module.selective
    expected = model(**inputs, use_cache=False).loss
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    actual = loss_module(**inputs)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, gradient, msg=name)

"""Loading the frozen base (bitsandbytes 4-bit / 8-bit, or plain) and attaching the LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.api import FineTuneJob
from tessera.errors import TesseraError
from tessera.model.load import BaseModelError, fetch_model, load_causal_lm, quantization_config, supports_bf16
from tessera.train.distributed import DistEnv
from tessera.train.plan import Hardware

if TYPE_CHECKING:
    import torch


def detect_hardware(env: DistEnv) -> Hardware:
    """The device this process trains on (CUDA device `LOCAL_RANK`, else the CPU) and whether it has bf16."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return Hardware("cuda", supports_bf16("cuda"), env.world_size)
    return Hardware("cpu", supports_bf16("cpu"), env.world_size)


def device_for(hardware: Hardware) -> torch.device:
    """The torch device `detect_hardware` chose (the current CUDA device, or the CPU)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if hardware.device_type == "cuda" else torch.device("cpu")


def fetch_base_model(job: FineTuneJob, *, download: bool = True) -> Path:
    """The job's base model as a local directory, through the machine's model cache (see `fetch_model`)."""
    base = job.spec.base_model
    try:
        return fetch_model(base.uri, name=base.name, download=download)
    except BaseModelError as error:
        raise TesseraError(f"spec.baseModel.uri: {error}") from None


def disable_cpu_weight_repacking(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPUs with AVX512-BF16. Returns layers fixed.

    On such CPUs `Linear4bit.forward` converts its weight in place to a CPU-friendly layout the
    first time it runs without gradients (an evaluation pass, `generate`). The backward kernel
    does not know that layout, so every backward after it silently computes wrong gradients and
    training goes on, diverging. Keeping the original layout costs a little inference speed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    fixed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            fixed += 1
    return fixed


def load_base_model(
    model_dir: str | Path, job: FineTuneJob, precision: str, device: str | torch.device = "cpu"
) -> Any:
    """The base causal LM with SDPA attention, quantized as the spec says, on `device`."""
    quantization = job.spec.base_model.quantization
    config = quantization_config(quantization.bits, precision, quant_type=quantization.quant_type,
                                 double_quant=quantization.double_quant)
    model = load_causal_lm(model_dir, dtype=precision, quantization=config, device=device)
    disable_cpu_weight_repacking(model)
    model.config.use_cache = False
    return model


def _needs_fp32_upcast(model: Any) -> bool:
    """Whether the unquantized weights (norms, embeddings) must go to fp32 for QLoRA: in fp16 only.

    PEFT's `prepare_model_for_kbit_training` upcasts them to fp32 because fp16 overflows in
    norms. bf16 has fp32's range, so a bf16 base keeps them in bf16: otherwise the whole
    residual stream, attention and MLP run in fp32 around the 4-bit matmuls (each casting its
    input to bf16 and back), the CPU profile's largest cost after the matmuls, and twice the
    activation memory. DeepSpeed's bf16 mode casts them to bf16 on GPUs anyway.
    """
    import torch

    return getattr(model, "dtype", None) == torch.float16


def attach_lora(model: Any, job: FineTuneJob, *, gradient_checkpointing: bool | None = None) -> Any:
    """Wrap `model` in a trainable PEFT LoRA adapter (QLoRA when the base is quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = job.spec.lora
    checkpointing = job.spec.training.gradient_checkpointing
    if gradient_checkpointing is not None:
        checkpointing = gradient_checkpointing
    checkpointing_kwargs = {"use_reentrant": False}
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized and _needs_fp32_upcast(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    else:
        for parameter in model.parameters():
            parameter.requires_grad = False
        if checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        # PEFT names the modules it could not find; say which field to fix.
        from tessera.errors import InvalidSpecError

        raise InvalidSpecError([f"spec.lora.targetModules: {error}"]) from None
    from tessera.train.kernels import use_fused_lora

    use_fused_lora(peft_model)
    return peft_model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

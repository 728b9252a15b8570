"""Loading the frozen base (bitsandbytes 4-bit / 8-bit, or plain) and attaching the LoRA adapter."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.api import FineTuneJob
from tessera.errors import ObjectNotFoundError, TesseraError
from tessera.model import model_cache_dir
from tessera.model.gguf import as_hf_directory
from tessera.train.distributed import DistEnv
from tessera.train.plan import Hardware

if TYPE_CHECKING:
    import torch

def detect_hardware(env: DistEnv) -> Hardware:
    """The device this process trains on (CUDA device `LOCAL_RANK`, else the CPU) and whether it has bf16."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return Hardware("cuda", torch.cuda.is_bf16_supported(), env.world_size)
    # bitsandbytes asks the CPU itself; without bitsandbytes, torch's own capability check.
    try:
        from bitsandbytes.functional import has_avx512bf16

        bf16 = bool(has_avx512bf16())
    except ImportError:
        bf16 = "AVX512" in torch.backends.cpu.get_cpu_capability()
    return Hardware("cpu", bf16, env.world_size)


def device_for(hardware: Hardware) -> torch.device:
    """The torch device `detect_hardware` chose (the current CUDA device, or the CPU)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if hardware.device_type == "cuda" else torch.device("cpu")


def fetch_base_model(job: FineTuneJob, *, download: bool = True) -> Path:
    """The base model as a local directory: a local path in place, a store URI through a cache.

    The cache is keyed by URI and filled atomically (a staging directory renamed into place), so
    the steps of one run, and the ranks of one machine, download a base model once; with
    `download=False` a rank only waits for the one that downloads (it must exist by then).
    """
    from tessera.store import open_store

    uri = job.spec.base_model.uri
    store, key = open_store(uri)
    local = store.local_path(key)
    if local is None:
        local = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if download and not local.exists():  # renamed into place whole, so present means complete
            local.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=local.parent))
            try:
                store.get_dir(key, staging)
                os.replace(staging, local)
            except ObjectNotFoundError:
                raise TesseraError(f"spec.baseModel.uri: {uri} does not exist") from None
            except OSError:
                if not local.exists():  # not another process winning the race
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    if not local.exists():
        raise TesseraError(f"spec.baseModel.uri: {uri} does not exist")
    local = as_hf_directory(local, model_cache_dir() / "converted", name=job.spec.base_model.name)
    if not (local / "config.json").is_file():
        raise TesseraError(f"spec.baseModel.uri: {uri} is not a Hugging Face model directory (no config.json)")
    return local


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16` (the spec's dtype names are torch's)."""
    import torch

    return getattr(torch, name)


def quantization_config(job: FineTuneJob, precision: str) -> Any:
    """The `BitsAndBytesConfig` the spec asks for, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    quantization = job.spec.base_model.quantization
    if quantization.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(precision),
        )
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


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
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(job, precision)
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch_dtype(precision)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if quantization is None:
        model.to(device)
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

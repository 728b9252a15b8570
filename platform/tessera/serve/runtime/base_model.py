"""Loading the one shared base model: from a store URI or a directory, quantized where it pays."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tessera.errors import TesseraError

log = logging.getLogger(__name__)

Quantization = Literal["auto", "4bit", "8bit", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


class BaseModelError(TesseraError):
    """The base model cannot be loaded as asked."""


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    name: str | None  # the name adapters are checked against (e.g. tessera/tiny-llama)
    directory: Path
    device: Any
    dtype: Any
    quantization: str | None
    eos_token_ids: set[int]
    max_model_len: int


def choose_precision(cuda: bool, quantization: Quantization, dtype: DType, bf16_supported: bool) -> tuple[str, str]:
    """(quantization, compute dtype) for the hardware: 4-bit NF4 and bf16 on a GPU, fp32 on a CPU.

    bitsandbytes' CPU kernels work but are slower than fp32 matmuls on a small model, so a CPU
    only quantizes when asked to.
    """
    chosen_quantization = quantization if quantization != "auto" else ("4bit" if cuda else "none")
    if dtype != "auto":
        return chosen_quantization, dtype
    if cuda:
        return chosen_quantization, "bfloat16" if bf16_supported else "float16"
    return chosen_quantization, "float32"


def cpu_threads(requested: int | None) -> int:
    """Intra-op threads for CPU inference: all cores but one unless told otherwise.

    The spare core runs the event loop, tokenization and JSON. Measured on 2 cores: with both
    cores given to torch, every OpenMP barrier stalls whenever another process runs, and a
    batch-1 step went from ~1 ms to ~40 ms.
    """
    if requested:
        return requested
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available - 1)


def load_base(
    uri: str,
    *,
    cache_dir: Path,
    quantization: Quantization = "auto",
    dtype: DType = "auto",
    max_model_len: int | None = None,
    threads: int | None = None,
) -> LoadedBase:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tessera.model import base_model_name
    from tessera.model.gguf import as_hf_directory
    from tessera.store import fetch
    from tessera.store.progress import TqdmProgress

    with TqdmProgress("fetch base model") as progress:
        directory = fetch(uri, cache_dir / "base-model", progress=progress)
    directory = as_hf_directory(Path(directory), cache_dir / "converted")
    if not (directory / "config.json").is_file():
        raise BaseModelError(f"{uri} is not a Hugging Face model directory (no config.json)")
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    chosen_quantization, dtype_name = choose_precision(cuda, quantization, dtype, bf16)
    torch_dtype = getattr(torch, dtype_name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if chosen_quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    elif chosen_quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        kwargs["device_map"] = {"": 0}
    else:
        torch.set_num_threads(cpu_threads(threads))
    log.info("loading base model %s (%s, %s) on %s", uri, chosen_quantization, dtype_name, device)
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        name=base_model_name(directory),
        directory=directory,
        device=device,
        dtype=torch_dtype,
        quantization=None if chosen_quantization == "none" else chosen_quantization,
        eos_token_ids=eos_ids,
        max_model_len=min(context, max_model_len) if max_model_len else context,
    )

"""Loading the one shared base model: from a store URI or a directory, quantized where it pays."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tessera.model.load import (
    available_cores,
    fetch_model,
    load_causal_lm,
    quantization_config,
    supports_bf16,
    torch_dtype,
)

log = logging.getLogger(__name__)

Quantization = Literal["auto", "4bit", "8bit", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


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
    only quantizes when asked to. Serving's own rule, not training's (`tessera.train.plan`): a
    FineTuneJob's spec fixes its quantization, and its engine decides the dtype.
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
    batch-1 step went from ~1 ms to ~40 ms. (Training splits all cores among its ranks instead.)
    """
    return requested or max(1, available_cores() - 1)


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
    from transformers import AutoTokenizer

    from tessera.model import base_model_name
    from tessera.store.progress import TqdmProgress

    with TqdmProgress("fetch base model") as progress:
        directory = fetch_model(uri, cache_dir=cache_dir, progress=progress)
    cuda = torch.cuda.is_available()
    chosen_quantization, dtype_name = choose_precision(cuda, quantization, dtype, cuda and supports_bf16("cuda"))
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(cpu_threads(threads))
    log.info("loading base model %s (%s, %s) on %s", uri, chosen_quantization, dtype_name, device)
    bits = {"4bit": 4, "8bit": 8}.get(chosen_quantization)
    model = load_causal_lm(directory, dtype=dtype_name, quantization=quantization_config(bits, dtype_name),
                           device=device)
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
        dtype=torch_dtype(dtype_name),
        quantization=None if chosen_quantization == "none" else chosen_quantization,
        eos_token_ids=eos_ids,
        max_model_len=min(context, max_model_len) if max_model_len else context,
    )

"""Loading a base model, shared by training and serving: fetch, dtype, bitsandbytes config, cores, bf16, load.

The policies stay with their callers because they differ on purpose: training derives its
precision from the spec and the engine (`tessera.train.plan.compute_precision`: DeepSpeed wants
bf16/fp16 on a GPU, a CPU trains 4-bit in fp32 or bf16) and splits the cores among its ranks;
the server picks 4-bit NF4 + bf16 on a GPU and fp32 on a CPU unless asked
(`tessera.serve.runtime.base_model.choose_precision`) and keeps one core for its event loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.errors import ObjectNotFoundError, TesseraError
from tessera.model import model_cache_dir
from tessera.model.gguf import as_hf_directory

if TYPE_CHECKING:
    import torch

    from tessera.store import Progress


class BaseModelError(TesseraError):
    """The base model cannot be fetched or is not a model."""


def fetch_model(
    uri: str,
    *,
    name: str | None = None,
    cache_dir: Path | None = None,
    download: bool = True,
    progress: Progress | None = None,
) -> Path:
    """The base model as a local Hugging Face directory: a local path in place, a store URI through a cache.

    The cache (`cache_dir`, else `model_cache_dir()`) is keyed by URI and filled atomically (a
    staging directory renamed into place), so the steps of one run, and the ranks of one machine,
    download a base model once; with `download=False` a caller only waits for the one that
    downloads (it must exist by then). A GGUF file, or a directory holding one, is converted once
    into the cache's `converted/` (named `name`).
    """
    from tessera.store import open_store
    from tessera.store.uri import parse_uri

    location = parse_uri(uri)
    store, key = open_store(location)
    local = store.local_path(key)
    cache = cache_dir or model_cache_dir()
    if local is None:
        local = cache / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if download and not local.exists():  # renamed into place whole, so present means complete
            local.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=local.parent))
            try:
                if store.stat(key) is not None:  # one object: a GGUF file
                    store.get_file(key, staging / key.rsplit("/", 1)[-1], progress=progress)
                else:
                    store.get_dir(key, staging, progress=progress)
                os.replace(staging, local)
            except ObjectNotFoundError:
                raise BaseModelError(f"{uri} does not exist") from None
            except OSError:
                if not local.exists():  # not another process winning the race
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    elif local.exists():
        location.resolved()  # refuses /proc, /sys and /dev, also behind a symlink
    if not local.exists():
        raise BaseModelError(f"{uri} does not exist")
    local = as_hf_directory(local, cache / "converted", name=name)
    if not (local / "config.json").is_file():
        raise BaseModelError(f"{uri} is not a Hugging Face model directory (no config.json)")
    return local


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16` (the spec's and the server's dtype names are torch's)."""
    import torch

    return getattr(torch, name)


def quantization_config(
    bits: int | None, compute_dtype: str, *, quant_type: str = "nf4", double_quant: bool = True
) -> Any:
    """The `BitsAndBytesConfig` for 4-bit (QLoRA's NF4 with double quantization by default) or 8-bit
    weights computing in `compute_dtype`, or None for an unquantized base."""
    if bits not in (4, 8):
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def supports_bf16(device_type: str) -> bool:
    """Whether the device computes in bf16: CUDA asks the GPU; a CPU needs AVX512-BF16."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    # bitsandbytes asks the CPU itself; without bitsandbytes, torch's own capability check.
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except ImportError:
        return "AVX512" in torch.backends.cpu.get_cpu_capability()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_causal_lm(directory: str | Path, *, dtype: str, quantization: Any, device: str | torch.device) -> Any:
    """The causal LM in `directory` with SDPA attention in `dtype` on `device`, quantized by the
    `BitsAndBytesConfig` `quantization` (bitsandbytes places quantized weights itself: a device map)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch_dtype(dtype)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if quantization is None:
        model.to(device)
    return model

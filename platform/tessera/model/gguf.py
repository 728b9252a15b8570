"""Importing a llama.cpp GGUF file as a Hugging Face model directory.

Institutions often hold their base models as GGUF files (llama.cpp, Ollama, LM Studio). Training
and the server need a Hugging Face directory (config, safetensors, tokenizer with its chat
template), so a GGUF file is converted once: transformers reads it and dequantizes every tensor
into the compute dtype, and the result is saved as a plain checkpoint with a `tessera.json` naming
the upstream model (adapters trained on it carry that name). A directory that holds a GGUF file and
no `config.json` (a FineTuneJob's `baseModel.format: gguf`) is converted into the caller's cache,
keyed by the file's path, size and modification time, so every step and every server converts it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import TesseraError
from tessera.model.tiny import IDENTITY_FILE

log = logging.getLogger(__name__)

# The architectures transformers maps from GGUF onto a causal LM Tessera trains and serves (LLaMA
# layout: q/k/v/o and gate/up/down projections, which the LoRA defaults target).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class ModelImportError(TesseraError):
    """A GGUF file cannot become a Hugging Face model directory."""


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    upstream_name: str | None
    tensor_types: frozenset[str]


def inspect_gguf(path: Path) -> GgufInfo:
    """The file's architecture, a best-guess upstream name, and its tensor types, from the header only."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith("general.")}
        tensor_types = frozenset(tensor.tensor_type.name for tensor in reader.tensors)
    except (ValueError, KeyError, IndexError, OSError) as error:
        # gguf's messages describe the layout it expected (magic, sizes, shapes), never file content.
        if "magic" in str(error).lower():
            raise ModelImportError(f"{path.name} is not a GGUF file (no GGUF magic number at its start)") from None
        raise ModelImportError(f"{path.name} is truncated or corrupt: {str(error)[:160]}") from None
    architecture = str(fields.get("general.architecture", ""))
    organization, basename, size = (fields.get(f"general.{k}") for k in ("organization", "basename", "size_label"))
    upstream = f"{organization}/{basename}-{size}" if organization and basename and size else None
    return GgufInfo(architecture=architecture, upstream_name=upstream, tensor_types=tensor_types)


def import_gguf(source: Path, directory: Path, *, name: str | None = None, dtype: str = "bfloat16") -> Path:
    """Convert `source` (a .gguf file) into a Hugging Face directory at `directory`, atomically.

    Kept as is when `directory` already holds a complete import (its `tessera.json` is written last).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = Path(source)
    directory = Path(directory)
    if (directory / IDENTITY_FILE).is_file() and (directory / "config.json").is_file():
        return directory
    if not source.is_file():
        raise ModelImportError(f"{source} does not exist or is not a file")
    info = inspect_gguf(source)
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"{source.name}: architecture '{info.architecture}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        log.info("importing %s (%s) into %s", source.name, info.architecture, directory)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=getattr(torch, dtype),
                quantization_config=GgufConfig(gguf_file=source.name, dequantize=True),
            )
        except (ValueError, NotImplementedError, KeyError, RuntimeError, OSError) as error:
            kinds = ", ".join(sorted(info.tensor_types))
            raise ModelImportError(
                f"{source.name}: transformers cannot convert it (tensor types {kinds}): {str(error)[:200]}"
            ) from None
        # The GGUF marker makes save_pretrained refuse: the weights are dense now, the marker is stale.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = name or info.upstream_name or ""
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        identity = {"name": name or info.upstream_name, "source": source.name, "format": "gguf"}
        (staging / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        # mkdtemp and the safetensors writer make private files; a model is read by non-root pods.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process (a rank of the same job) finished the same import first.
            if not (directory / IDENTITY_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def gguf_file_in(directory: Path) -> Path | None:
    """The one GGUF file a model directory holds, when it has no Hugging Face config of its own."""
    if directory.is_file() and directory.suffix == ".gguf":
        return directory
    if not directory.is_dir() or (directory / "config.json").is_file():
        return None
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise ModelImportError(f"{directory} holds {len(files)} GGUF files; keep one per model directory")
    return files[0] if files else None


def as_hf_directory(path: Path, cache: Path, *, name: str | None = None) -> Path:
    """`path` itself when it is a Hugging Face directory, else its GGUF file converted once into `cache`."""
    gguf = gguf_file_in(Path(path))
    if gguf is None:
        return Path(path)
    stat = gguf.stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return import_gguf(gguf, cache / f"{gguf.stem}-{key}", name=name)

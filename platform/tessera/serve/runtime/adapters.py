"""LoRA adapters on Tessera's server: whether they fit the served base, and their weights.

The adapter format (config, tensor names, the checks every runtime shares, the read → check path)
is `tessera.adapter_format`; what is here needs the served model: its layer shapes and dtype, the
server's rank limit, and the weights scaled as the server computes with them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.adapter_format import (
    ADAPTER_NAME,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterFiles,
    AdapterFormatError,
    LoraTensors,
    ModelCard,
    Problem,
    as_model_card,
    declared_base_name,
    embedding_copy_module,
    parse_lora_key,
    pattern_value,
    read_checked_adapter,
    shared_problems,
    some,
)
from tessera.serve.errors import ServeError

__all__ = ["ADAPTER_NAME", "AdapterConfig", "AdapterError", "PreparedAdapter", "ServedBase", "adapter_refusals",
           "compatibility_problems", "prepare_adapter"]
WHERE = "this server"


class AdapterError(ServeError):
    """An adapter was refused: the boundary's error, about the request's `lora_path`."""

    def __init__(self, message: str, *, code: str, status: int | None = None) -> None:
        super().__init__(message, status=status, code=code, param="lora_path")


@contextlib.contextmanager
def adapter_refusals() -> Iterator[None]:
    """The adapter format's refusals as the server's error, with the same code and status."""
    try:
        yield
    except AdapterFormatError as error:
        raise AdapterError(error.message, code=error.code, status=error.status) from None


@dataclass(frozen=True)
class ServedBase:
    """What an adapter must match: the served base model's identity and its LoRA-able layers."""

    name: str | None
    architecture: str | None
    vocab_size: int
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    embedding_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (vocab, hidden)
    dtype: Any = None  # the served weights' torch dtype: scaled adapters must stay finite in it

    @classmethod
    def of(cls, model: Any, name: str | None) -> ServedBase:
        linear, embedding = {}, {}
        for module_name, module in model.named_modules():
            if not module_name:
                continue
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                linear[module_name] = (module.in_features, module.out_features)
            elif hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
                embedding[module_name] = (module.num_embeddings, module.embedding_dim)
        architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        return cls(name=name, architecture=architectures[0], vocab_size=model.config.vocab_size,
                   linear_shapes=linear, embedding_shapes=embedding, dtype=dtype)

    @property
    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Every layer a LoRA may target -> (A's input width, B's output width)."""
        return {**self.linear_shapes, **self.embedding_shapes}


def compatibility_problems(
    config: AdapterConfig,
    card: ModelCard | dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    base: ServedBase,
    max_rank: int,
) -> list[Problem]:
    """Every reason the adapter cannot serve on `base`, as (code, message); empty when it fits.

    A pure function of the adapter's metadata and tensor shapes, so the whole rule set is tested
    without a model. Shapes are the strongest check: an adapter trained on another base model
    has other module names or other dimensions, whatever its config claims.
    """
    card = as_model_card(card)
    problems = shared_problems(config, card, where=WHERE, served_base=base.name)
    if config.fan_in_fan_out:
        problems.append(("adapter_incompatible", "fan_in_fan_out adapters target Conv1D (GPT-2) layers, not LLaMA"))
    if card.architecture and base.architecture and card.architecture != base.architecture:
        problems.append(("base_model_mismatch",
                         f"adapter was trained for a {card.architecture}, {WHERE} serves a {base.architecture}"))
    if card.vocab_size and card.vocab_size != base.vocab_size:
        problems.append(("vocab_mismatch",
                         f"adapter was trained with vocabulary size {card.vocab_size}, the base has {base.vocab_size}"))

    targets = config.target_modules
    if isinstance(targets, list):
        layers = base.lora_shapes
        suffixes = {name.rsplit(".", 1)[-1] for name in layers}
        missing = sorted(t for t in targets if t not in suffixes and t not in layers)
        if missing:
            problems.append(("target_modules_missing", f"target modules not in the base model: {', '.join(missing)}"))

    tensors = LoraTensors.of(tensor_shapes)
    for key, shape in tensors.others.items():
        if is_embedding_copy(key, shape, base):
            continue
        if ("embed" in key or "lm_head" in key) and len(shape) == 2 and base.vocab_size not in shape:
            problems.append(("vocab_mismatch", f"tensor {key} has shape {list(shape)}: built for another vocabulary "
                                               f"(base has {base.vocab_size})"))
            continue
        problems.append(("adapter_unsupported", f"tensor {key} is not a LoRA A/B matrix (modules_to_save, trained "
                                                "biases and trainable tokens are not supported)"))
    if not tensors.pairs:
        problems.append(("adapter_corrupt", f"{WEIGHTS_FILE} holds no LoRA weights"))

    unpaired, absent, mismatched, ranks = [], [], [], []
    for module, pair in sorted(tensors.pairs.items()):
        # A linear LoRA needs a linear base layer, an embedding LoRA an embedding: same (in, out) check.
        layers = base.embedding_shapes if module in tensors.embedding_modules else base.linear_shapes
        if set(pair) != {"A", "B"} or len(pair["A"]) != 2 or len(pair["B"]) != 2 or pair["A"][0] != pair["B"][1]:
            unpaired.append(module)
        elif module not in layers:
            absent.append(module)
        elif (pair["A"][1], pair["B"][0]) != layers[module]:
            mismatched.append(f"{module} maps {pair['A'][1]}->{pair['B'][0]} but the base layer is "
                              f"{layers[module][0]}->{layers[module][1]}")
        else:
            ranks.append(pair["A"][0])
    if unpaired:
        problems.append(("adapter_corrupt", f"LoRA A/B matrices missing or not pairing up: {some(unpaired)}"))
    if absent:
        problems.append(("target_modules_missing", f"layers not in the base model: {some(absent)}"))
    if mismatched:
        problems.append(("base_model_mismatch", f"trained on another base model: {some(mismatched)}"))
    if ranks and max(ranks) > max_rank:
        problems.append((
            "rank_too_high", f"adapter rank {max(ranks)} exceeds the server's maximum {max_rank} (--max-lora-rank)"
        ))
    return problems


def is_embedding_copy(key: str, shape: tuple[int, ...], base: ServedBase) -> bool:
    """Whether `key` is the base embedding table peft saves beside an embedding LoRA.

    The table was frozen in training, so it is the served base's own: the server skips it."""
    module = embedding_copy_module(key)
    return module is not None and base.embedding_shapes.get(module) == tuple(shape)


def lora_scaling(config: AdapterConfig, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), honouring alpha_pattern
    (keys matched as module names: `tessera.adapter_format.pattern_value`)."""
    alpha = pattern_value(config.alpha_pattern, module)
    alpha = config.lora_alpha if alpha is None else alpha
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def scaled_pair(config: AdapterConfig, module: str, a: Any, b: Any, dtype: Any) -> tuple[Any, Any]:
    """A and B × scaling as the server computes with them, refused unless every value is finite *after*
    scaling and in the serving dtype: lora_alpha = 1e308 passes a check of the raw weights, not this one."""
    import torch

    scale = lora_scaling(config, module, a.shape[0])
    a, b = a.float(), b.float() * scale
    if not (math.isfinite(scale) and torch.isfinite(a.to(dtype)).all() and torch.isfinite(b.to(dtype)).all()):
        raise AdapterError(
            f"{module}: weights scaled by lora_alpha/r ({scale:g}) contain NaN or overflow "
            f"{str(dtype).removeprefix('torch.')}",
            code="adapter_corrupt",
        )
    return a, b


@dataclass
class PreparedAdapter:
    """An adapter read, checked and ready to install."""

    name: str
    source: str
    sha256: str
    rank: int
    task: str | None
    base_model: str | None
    weights: Any  # tessera.serve.runtime.lora.AdapterWeights


def build_weights(files: AdapterFiles, base: ServedBase) -> Any:
    """The checked adapter's LoRA matrices, scaled, as the engine installs them (vLLM's `from_lora_tensors`)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from tessera.serve.runtime.lora import AdapterWeights

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(files.weights), framework="pt") as handle:
            # Only the LoRA matrices: a frozen embedding copy can be a gigabyte and is never used.
            for key in files.shapes:
                if parsed := parse_lora_key(key):
                    pairs.setdefault(parsed[0], {})[parsed[1]] = handle.get_tensor(key)
    except SafetensorError as error:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {error}", code="adapter_corrupt") from None
    dtype = base.dtype or torch.float32
    modules = {module: scaled_pair(files.config, module, pair["A"], pair["B"], dtype) for module, pair in pairs.items()}
    return AdapterWeights(modules=modules, rank=max(a.shape[0] for a, _ in modules.values()))


def prepare_adapter(
    name: str,
    source: str,
    directory: Path,
    base: ServedBase,
    *,
    max_rank: int,
    expected_sha256: str | None,
    task: str | None = None,
) -> PreparedAdapter:
    """Read, check and build an adapter directory; the returned weights fit `base` (else `AdapterError`)."""
    with adapter_refusals():
        files = read_checked_adapter(
            directory, lambda f: compatibility_problems(f.config, f.card, f.shapes, base, max_rank),
            expected_sha256=expected_sha256)
    weights = build_weights(files, base)
    return PreparedAdapter(name=name, source=source, sha256=files.sha256, rank=weights.rank,
                           task=task or files.card.task, base_model=declared_base_name(files.config, files.card),
                           weights=weights)

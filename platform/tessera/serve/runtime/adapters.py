"""LoRA adapters: where they may come from, whether they fit the base, and their weights.

An adapter directory is standard PEFT (`adapter_config.json`, `adapter_model.safetensors`, and
Tessera's optional `model-card.json`). Everything is checked before any weight touches the model,
and every refusal says why, with a stable `code` the operator can act on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera.api.adapter_dir import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE, ModelCard
from tessera.errors import StoreError
from tessera.serve.errors import ServeError
from tessera.store.uri import Location, parse_uri

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?$")
# peft saves the frozen base table of a LoRA-wrapped embedding beside its LoRA (save_embedding_layers="auto").
_EMBEDDING_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")


class AdapterError(ServeError):
    """An adapter was refused: the boundary's error, about the request's `lora_path`."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message, status=status, code=code, param="lora_path")


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


class AdapterConfig(BaseModel):
    """The parts of PEFT's `adapter_config.json` the server relies on (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    alpha_pattern: dict[str, float] = Field(default_factory=dict)


def check_allowed(path: str, allowed_prefixes: list[str]) -> Location:
    """Where `path` really is, refused (403) when outside every allowed prefix (no prefixes: anywhere).

    Path and prefixes are parsed by `tessera.store.uri` (percent-decoded once, `..` and `.` gone,
    symlinks followed), and the caller reads the `Location` returned, never `path` again: what was
    checked is what is read. A refusal is decided before anything is opened, so it says nothing
    about whether a path outside exists.
    """
    try:
        location = parse_uri(path).resolved()
    except StoreError as error:
        raise AdapterError(f"invalid lora_path: {error}", code="invalid_path") from None
    if not allowed_prefixes or any(location.within(parse_uri(prefix).resolved()) for prefix in allowed_prefixes):
        return location
    raise AdapterError(
        f"lora_path {path!r} is outside the allowed prefixes ({', '.join(allowed_prefixes)})",
        code="path_not_allowed",
        status=403,
    )


def adapter_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a regular file inside the directory, None when absent.

    A link that leads outside the adapter directory is refused: it would make the server read
    (and an error quote) a file the caller was never allowed to name.
    """
    path = directory / name
    if not path.exists() and not path.is_symlink():
        return None
    real = Path(os.path.realpath(path))
    if Path(os.path.realpath(directory)) not in real.parents or not real.is_file():
        raise AdapterError(f"{name} is not a regular file inside the adapter directory", code="adapter_corrupt")
    return real


def read_adapter_files(directory: Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """The adapter's config and model card, refusing a directory that is not a PEFT adapter.

    Errors say which file and which field is wrong, never what the file holds.
    """
    config_path = adapter_file(directory, CONFIG_FILE)
    if config_path is None:
        raise AdapterError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory", code="adapter_corrupt")
    if adapter_file(directory, WEIGHTS_FILE) is None:
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}", code="adapter_corrupt")
    try:
        raw = json.loads(config_path.read_bytes())
    except ValueError as error:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({_json_problem(error)})",
                           code="adapter_corrupt") from None
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as error:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}"
                           for e in error.errors(include_url=False, include_input=False, include_context=False))
        raise AdapterError(f"{CONFIG_FILE} is not a valid PEFT LoRA config: {fields}", code="adapter_corrupt") from None
    card: dict[str, Any] = {}
    card_path = adapter_file(directory, MODEL_CARD_FILE)
    if card_path is not None:
        try:
            document = json.loads(card_path.read_bytes())
        except ValueError as error:
            raise AdapterError(f"{MODEL_CARD_FILE} is not valid JSON ({_json_problem(error)})",
                               code="adapter_corrupt") from None
        try:
            ModelCard.read(document)
        except ValueError as error:
            raise AdapterError(str(error), code="adapter_corrupt") from None
        card = document
    return config, card


def _json_problem(error: ValueError) -> str:
    """Where a JSON document broke, never the text around it."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    return "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else type(error).__name__


def weights_sha256(directory: Path) -> str:
    """The adapter's digest: sha256 of `adapter_model.safetensors` (what Adapter.spec.sha256 holds)."""
    digest = hashlib.sha256()
    with (directory / WEIGHTS_FILE).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~", "file://", "s3://")) or os.path.isabs(name) or os.path.exists(name)


def _model_card(card: ModelCard | dict[str, Any]) -> ModelCard:
    return card if isinstance(card, ModelCard) else ModelCard.read(card)


def declared_base_name(config: AdapterConfig, card: ModelCard | dict[str, Any]) -> str | None:
    """The base model the adapter says it was trained on: the model card first, then PEFT's config."""
    return _model_card(card).base_model_name or config.base_model_name_or_path


def compatibility_problems(
    config: AdapterConfig,
    card: ModelCard | dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    base: ServedBase,
    max_rank: int,
) -> list[tuple[str, str]]:
    """Every reason the adapter cannot serve on `base`, as (code, message); empty when it fits.

    A pure function of the adapter's metadata and tensor shapes, so the whole rule set is tested
    without a model. Shapes are the strongest check: an adapter trained on another base model
    has other module names or other dimensions, whatever its config claims.
    """
    card = _model_card(card)
    problems: list[tuple[str, str]] = []
    if config.peft_type.upper() != "LORA":
        problems.append(("adapter_unsupported", f"peft_type {config.peft_type} is not LORA"))
    if config.use_dora:
        problems.append(("adapter_unsupported", "DoRA adapters are not supported by this server"))
    if config.fan_in_fan_out:
        problems.append(("adapter_incompatible", "fan_in_fan_out adapters target Conv1D (GPT-2) layers, not LLaMA"))
    if config.bias != "none":
        problems.append(("adapter_unsupported", f"bias={config.bias!r}: adapters that train biases are not supported"))
    if config.lora_bias:
        problems.append(("adapter_unsupported", "lora_bias=true: adapters that train biases are not supported"))
    if config.modules_to_save:
        problems.append((
            "adapter_unsupported",
            f"modules_to_save={config.modules_to_save}: adapters that replace whole layers are not supported",
        ))

    declared = declared_base_name(config, card)
    if declared and base.name and not _looks_like_path(declared) and declared != base.name:
        problems.append((
            "base_model_mismatch",
            f"adapter was trained for base model {declared!r}, this server serves {base.name!r}",
        ))
    card_architecture = card.architecture
    if card_architecture and base.architecture and card_architecture != base.architecture:
        problems.append((
            "base_model_mismatch",
            f"adapter was trained for a {card_architecture}, this server serves a {base.architecture}",
        ))
    card_vocab = card.vocab_size
    if card_vocab and card_vocab != base.vocab_size:
        problems.append((
            "vocab_mismatch", f"adapter was trained with vocabulary size {card_vocab}, the base has {base.vocab_size}"
        ))

    targets = config.target_modules
    if isinstance(targets, list):
        layers = base.lora_shapes
        suffixes = {name.rsplit(".", 1)[-1] for name in layers}
        missing = sorted(t for t in targets if t not in suffixes and t not in layers)
        if missing:
            problems.append(("target_modules_missing", f"target modules not in the base model: {', '.join(missing)}"))

    lora: dict[str, dict[str, tuple[int, ...]]] = {}
    embedding_modules: set[str] = set()
    for key, shape in tensor_shapes.items():
        parsed = parse_lora_key(key)
        if parsed:
            module, which, is_embedding = parsed
            lora.setdefault(module, {})[which] = shape
            if is_embedding:
                embedding_modules.add(module)
            continue
        if is_embedding_copy(key, shape, base):
            continue
        if "embed" in key or "lm_head" in key:
            if len(shape) == 2 and base.vocab_size not in shape:
                problems.append((
                    "vocab_mismatch",
                    f"tensor {key} has shape {list(shape)}: built for another vocabulary (base has {base.vocab_size})",
                ))
                continue
        problems.append((
            "adapter_unsupported",
            f"tensor {key} is not a LoRA A/B matrix (modules_to_save, trained biases and trainable tokens "
            "are not supported)",
        ))
    if not lora:
        problems.append(("adapter_corrupt", f"{WEIGHTS_FILE} holds no LoRA weights"))

    unpaired, absent, mismatched, ranks = [], [], [], []
    for module, pair in sorted(lora.items()):
        # A linear LoRA needs a linear base layer, an embedding LoRA an embedding: same (in, out) check.
        layers = base.embedding_shapes if module in embedding_modules else base.linear_shapes
        if set(pair) != {"A", "B"} or len(pair["A"]) != 2 or len(pair["B"]) != 2 or pair["A"][0] != pair["B"][1]:
            unpaired.append(module)
        elif module not in layers:
            absent.append(module)
        elif (pair["A"][1], pair["B"][0]) != layers[module]:
            mismatched.append(f"{module} maps {pair['A'][1]}->{pair['B'][0]} but the base layer is "
                              f"{layers[module][0]}->{layers[module][1]}")
        else:
            ranks.append(pair["A"][0])
    # One message per kind of fault, naming the first layer and counting the rest.
    if unpaired:
        problems.append(("adapter_corrupt", f"LoRA A/B matrices missing or not pairing up: {_some(unpaired)}"))
    if absent:
        problems.append(("target_modules_missing", f"layers not in the base model: {_some(absent)}"))
    if mismatched:
        problems.append(("base_model_mismatch", f"trained on another base model: {_some(mismatched)}"))
    if ranks and max(ranks) > max_rank:
        problems.append((
            "rank_too_high", f"adapter rank {max(ranks)} exceeds the server's maximum {max_rank} (--max-lora-rank)"
        ))
    return problems


def parse_lora_key(key: str) -> tuple[str, str, bool] | None:
    """(module path, "A" or "B", whether it is an embedding LoRA) of a PEFT LoRA tensor name, else None."""
    for pattern, is_embedding in ((_LORA_KEY, False), (_LORA_EMBEDDING_KEY, True)):
        match = pattern.match(key)
        if match:
            return match["module"], match["which"], is_embedding
    return None


def is_embedding_copy(key: str, shape: tuple[int, ...], base: ServedBase) -> bool:
    """Whether `key` is the base embedding table peft saves beside an embedding LoRA.

    The table was frozen in training, so it is the served base's own: the server skips it."""
    match = _EMBEDDING_COPY_KEY.match(key)
    return bool(match) and base.embedding_shapes.get(match["module"]) == tuple(shape)


def _some(items: list[str]) -> str:
    return items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")


def lora_scaling(config: AdapterConfig, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), honouring alpha_pattern."""
    alpha = config.lora_alpha
    for pattern, value in config.alpha_pattern.items():
        try:
            matched = re.match(rf"(.*\.)?(?:{pattern})$", module)
        except re.error as error:
            raise AdapterError(f"alpha_pattern key {pattern!r} is not a regular expression ({error.msg})",
                               code="adapter_corrupt") from None
        if matched:
            alpha = value
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
    """Read and check an adapter directory; the returned weights fit `base` (else `AdapterError`)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from tessera.serve.runtime.lora import AdapterWeights

    config, card = read_adapter_files(directory)
    digest = weights_sha256(directory)
    if expected_sha256 and expected_sha256.lower() != digest:
        raise AdapterError(
            f"sha256 mismatch: {WEIGHTS_FILE} has {digest}, the caller expected {expected_sha256}",
            code="sha256_mismatch",
        )
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
            problems = compatibility_problems(config, card, shapes, base, max_rank)
            if problems:
                raise AdapterError("; ".join(message for _, message in problems), code=problems[0][0])
            # Only the LoRA matrices: a frozen embedding copy can be a gigabyte and is never used.
            tensors = {key: handle.get_tensor(key) for key in shapes if parse_lora_key(key)}
    except SafetensorError as error:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {error}", code="adapter_corrupt") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, which, _ = parse_lora_key(key)
        pairs.setdefault(module, {})[which] = tensor
    dtype = base.dtype or torch.float32
    modules = {module: scaled_pair(config, module, pair["A"], pair["B"], dtype) for module, pair in pairs.items()}
    rank = max(a.shape[0] for a, _ in modules.values())
    return PreparedAdapter(
        name=name,
        source=source,
        sha256=digest,
        rank=rank,
        task=task or _model_card(card).task,
        base_model=declared_base_name(config, card),
        weights=AdapterWeights(modules=modules, rank=rank),
    )

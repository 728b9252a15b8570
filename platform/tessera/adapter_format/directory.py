"""Reading an adapter directory: where it may come from, its files, and the one read → check path.

`read_checked_adapter` is the first half of vLLM's `LoRAModel.from_local_checkpoint`: the config
(its `PEFTHelper.from_local_dir`), the tensor names and shapes from the safetensors header (read
without loading a weight), the digest, then the checks; the runtime builds its weights from what
it returns (the second half, `from_lora_tensors`). Errors name the file and the field, never what
the file holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tessera.adapter_format.peft import AdapterConfig, Problem
from tessera.api.adapter_dir import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE, ModelCard
from tessera.api.records import field_problems
from tessera.errors import AdapterFormatError, ObjectNotFoundError, StoreError, StoreUnavailableError
from tessera.store.uri import Location, parse_uri

_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not an adapter's


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
        raise AdapterFormatError(f"invalid lora_path: {error}", code="invalid_path") from None
    if not allowed_prefixes or any(location.within(parse_uri(prefix).resolved()) for prefix in allowed_prefixes):
        return location
    raise AdapterFormatError(f"lora_path {path!r} is outside the allowed prefixes ({', '.join(allowed_prefixes)})",
                             code="path_not_allowed")


@contextlib.contextmanager
def store_refusals(source: str) -> Iterator[None]:
    """The store's failures while an adapter is fetched, one code each wherever it is fetched: gone
    (404), not answering (503, worth a retry), answering with an error (502)."""
    try:
        yield
    except ObjectNotFoundError:
        raise AdapterFormatError(f"lora_path {source!r} does not exist", code="adapter_not_found") from None
    except StoreUnavailableError as error:
        raise AdapterFormatError(f"the store did not answer: {error}", code="store_unavailable") from None
    except StoreError as error:
        raise AdapterFormatError(f"cannot read lora_path {source!r}: {error}", code="store_error") from None


def adapter_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a regular file inside the directory, None when absent.

    A link that leads outside the adapter directory is refused: it would make the runtime read
    (and an error quote) a file the caller was never allowed to name.
    """
    path = directory / name
    if not path.exists() and not path.is_symlink():
        return None
    real = Path(os.path.realpath(path))
    if Path(os.path.realpath(directory)) not in real.parents or not real.is_file():
        raise AdapterFormatError(f"{name} is not a regular file inside the adapter directory", code="adapter_corrupt")
    return real


def _json_problem(error: ValueError) -> str:
    """Where a JSON document broke, never the text around it."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    return "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else type(error).__name__


def _read_json(path: Path, name: str) -> object:
    try:
        return json.loads(path.read_bytes())
    except ValueError as error:
        raise AdapterFormatError(f"{name} is not valid JSON ({_json_problem(error)})", code="adapter_corrupt") from None


def read_config(path: Path) -> AdapterConfig:
    try:
        return AdapterConfig.model_validate(_read_json(path, CONFIG_FILE))
    except ValidationError as error:
        raise AdapterFormatError(f"{CONFIG_FILE} is not a valid PEFT LoRA config: {field_problems(error)}",
                                 code="adapter_corrupt") from None


def read_card(path: Path | None) -> ModelCard:
    """The model card, or an empty one when the adapter has none (one trained elsewhere)."""
    if path is None:
        return ModelCard()
    try:
        return ModelCard.read(_read_json(path, MODEL_CARD_FILE))
    except ValueError as error:
        raise AdapterFormatError(str(error), code="adapter_corrupt") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > _HEADER_LIMIT:
                raise ValueError("header too large")
            header = json.loads(stream.read(length))
        return {name: tuple(int(n) for n in meta["shape"]) for name, meta in header.items() if name != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file ({type(error).__name__})",
                                 code="adapter_corrupt") from None


def weights_sha256(directory: Path) -> str:
    """The adapter's digest: sha256 of `adapter_model.safetensors` (what Adapter.spec.sha256 holds)."""
    digest = hashlib.sha256()
    with (directory / WEIGHTS_FILE).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory read: its config, model card, tensor shapes and weights digest."""

    directory: Path
    config: AdapterConfig
    card: ModelCard
    shapes: dict[str, tuple[int, ...]]
    sha256: str

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS_FILE


def read_adapter(directory: Path, *, expected_sha256: str | None = None) -> AdapterFiles:
    """The adapter's files, refusing a directory that is not a PEFT adapter or not the version expected."""
    config_path = adapter_file(directory, CONFIG_FILE)
    if config_path is None:
        raise AdapterFormatError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory",
                                 code="adapter_corrupt")
    weights = adapter_file(directory, WEIGHTS_FILE)
    if weights is None:
        raise AdapterFormatError(f"{directory} has no {WEIGHTS_FILE}", code="adapter_corrupt")
    config = read_config(config_path)
    card = read_card(adapter_file(directory, MODEL_CARD_FILE))
    digest = weights_sha256(directory)
    if expected_sha256 and expected_sha256.lower() != digest:
        raise AdapterFormatError(f"sha256 mismatch: {WEIGHTS_FILE} has {digest}, the caller expected "
                                 f"{expected_sha256.lower()}: refusing a corrupt or substituted adapter",
                                 code="sha256_mismatch")
    return AdapterFiles(directory, config, card, safetensors_shapes(weights), digest)


def read_checked_adapter(directory: Path, problems: Callable[[AdapterFiles], list[Problem]], *,
                         expected_sha256: str | None = None) -> AdapterFiles:
    """Read, then check with the runtime's `problems` (which start with `shared_problems`); every
    problem found is in the one error, whose code is the first one's."""
    files = read_adapter(directory, expected_sha256=expected_sha256)
    found = problems(files)
    if found:
        raise AdapterFormatError("; ".join(message for _, message in found), code=found[0][0])
    return files

"""PEFT's LoRA format as every runtime reads it: the config, the tensor names, and the rules that hold
whatever runtime serves the adapter. Pure functions of parsed data (no torch, no files).

Each runtime's own check (`tessera.serve.runtime.adapters.compatibility_problems`, the agent's
`servability_problems`) starts with `shared_problems` and adds what only it knows (the served base's
layer shapes, the runtime's rank limit and target modules).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tessera.api.adapter_dir import WEIGHTS_FILE, ModelCard
from tessera.errors import AdapterFormatError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?$")
# peft saves the frozen base table of a LoRA-wrapped embedding beside its LoRA (save_embedding_layers="auto").
_EMBEDDING_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
# A pattern key is a module name or a dotted suffix of one, `^` anchoring it at the model's root. The
# segments exclude the dot that separates them, so this match is linear in the key's length.
_PATTERN_KEY = re.compile(r"\^?[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_PATTERN_KEY_LENGTH = 256

Problem = tuple[str, str]  # (code, message)
_T = TypeVar("_T")


class AdapterConfig(BaseModel):
    """The parts of PEFT's `adapter_config.json` a runtime relies on (other keys are ignored)."""

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
    rank_pattern: dict[str, int] = Field(default_factory=dict)


def as_model_card(card: ModelCard | dict[str, Any]) -> ModelCard:
    return card if isinstance(card, ModelCard) else ModelCard.read(card)


def looks_like_path(name: str) -> bool:
    """Whether a declared base model is a training-time path rather than a model's name: such a name
    says nothing about the model, so it is never compared. Decided by its spelling alone, never by
    what exists on this machine, so every runtime decides alike."""
    return name.startswith(("/", ".", "~", "file://", "s3://")) or os.path.isabs(name)


def declared_base_name(config: AdapterConfig, card: ModelCard | dict[str, Any]) -> str | None:
    """The base model the adapter says it was trained on: the model card first, then PEFT's config."""
    return as_model_card(card).base_model_name or config.base_model_name_or_path


def pattern_value(patterns: dict[str, _T], module: str) -> _T | None:
    """PEFT's `get_pattern_key` with keys read as module names: the first key equal to `module` or to a
    dotted suffix of it (`^key`: equal to the whole path). A string comparison, never a regex."""
    for key, value in patterns.items():
        if key.startswith("^"):
            if module == key[1:]:
                return value
        elif module == key or module.endswith("." + key):
            return value
    return None


def pattern_key_problems(config: AdapterConfig, where: str) -> list[Problem]:
    """alpha_pattern and rank_pattern keys that are not module names. PEFT reads them as regular
    expressions; run as such, an adapter's key could hold a loader for good (nested quantifiers)."""
    bad = [(name, key) for name, patterns in (("alpha_pattern", config.alpha_pattern),
                                              ("rank_pattern", config.rank_pattern))
           for key in patterns
           if len(key) > MAX_PATTERN_KEY_LENGTH or not _PATTERN_KEY.fullmatch(key)]
    if not bad:
        return []
    name, key = bad[0]
    shown = key if len(key) <= 64 else key[:61] + "..."
    return [("adapter_unsupported",
             f"{name} key {shown!r}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
             + f" is not a module name: {where} matches pattern keys as module names or dotted suffixes "
             "(e.g. 'q_proj', 'layers.0.self_attn.q_proj', '^model.layers.0.mlp.down_proj'), not as regular "
             "expressions")]


def parse_lora_key(key: str) -> tuple[str, str, bool] | None:
    """(module path, "A" or "B", whether it is an embedding LoRA) of a PEFT LoRA tensor name, else None."""
    for pattern, is_embedding in ((_LORA_KEY, False), (_LORA_EMBEDDING_KEY, True)):
        match = pattern.match(key)
        if match:
            return match["module"], match["which"], is_embedding
    return None


def embedding_copy_module(key: str) -> str | None:
    """The module whose frozen base table `key` is (peft saves it beside an embedding LoRA), else None."""
    match = _EMBEDDING_COPY_KEY.match(key)
    return match["module"] if match else None


@dataclass
class LoraTensors:
    """An adapter's tensor names sorted out: module -> {"A": shape, "B": shape}, and the rest."""

    pairs: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    embedding_modules: set[str] = field(default_factory=set)
    others: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> LoraTensors:
        tensors = cls()
        for key, shape in shapes.items():
            parsed = parse_lora_key(key)
            if parsed is None:
                tensors.others[key] = shape
                continue
            module, which, is_embedding = parsed
            tensors.pairs.setdefault(module, {})[which] = shape
            if is_embedding:
                tensors.embedding_modules.add(module)
        return tensors


def adapter_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    """The adapter's rank: the largest first dimension of its A matrices."""
    ranks = [shape[0] for key, shape in shapes.items()
             if (parsed := parse_lora_key(key)) and parsed[1] == "A" and shape]
    if not ranks:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA A/B weights", code="adapter_corrupt")
    return max(ranks)


def some(items: list[str]) -> str:
    """The first item, counting the rest: one message per kind of fault."""
    return items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")


def shared_problems(config: AdapterConfig, card: ModelCard | dict[str, Any], *, where: str,
                    served_base: str | None) -> list[Problem]:
    """What no runtime serves (vLLM's `PEFTHelper.validate_legal` and Tessera's server agree): non-LoRA
    types, DoRA, whole replaced layers, trained biases, regex pattern keys, another named base model."""
    problems: list[Problem] = []
    if config.peft_type.upper() != "LORA":
        problems.append(("adapter_unsupported", f"peft_type {config.peft_type}: {where} serves LoRA adapters only"))
    if config.use_dora:
        problems.append(("adapter_unsupported", f"use_dora=true: {where} does not serve DoRA adapters"))
    if config.modules_to_save:
        problems.append(("adapter_unsupported",
                         f"modules_to_save={config.modules_to_save}: {where} does not serve adapters that replace "
                         "whole layers (train them as LoRA target_modules instead)"))
    if config.bias != "none" or config.lora_bias:
        problems.append(("adapter_unsupported", f"bias={config.bias!r}, lora_bias={config.lora_bias}: {where} does "
                                                "not serve adapters with trained biases"))
    problems += pattern_key_problems(config, where)
    declared = declared_base_name(config, card)
    if declared and served_base and not looks_like_path(declared) and declared != served_base:
        problems.append(("base_model_mismatch",
                         f"adapter was trained for base model {declared!r}, {where} serves {served_base!r}"))
    return problems

"""What a serving runtime can serve, and what its adapter API's answers mean: pure functions.

The adapter checks run before the runtime sees the adapter, on its PEFT config and on the tensor
names and shapes in the safetensors header (read without loading a weight), so a refusal names the
field at fault and the runtime instead of surfacing as vLLM's 500. vLLM's rules (its `lora/`
package): LoRA only (no DoRA), no `modules_to_save`, no trained biases, rank at most
`--max-lora-rank`, A/B matrices only (embedding and lm_head included, never whole tables).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tessera.api.finetunejob import FineTuneJobSpec
from tessera.serve.runtime.adapters import AdapterConfig, declared_base_name, parse_lora_key

RuntimeKind = Literal["vllm", "tessera"]
# vLLM accepts only these values of --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# LoRA-able modules of the LLaMA family, as both runtimes name them in PEFT configs.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "embed_tokens", "lm_head")
_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not an adapter's


class AgentError(Exception):
    """A load or unload the agent refused or could not complete: one HTTP status, one stable code."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True)
class RuntimeProfile:
    """What the runtime next to the agent can serve (the chart passes the runtime's own flags)."""

    kind: RuntimeKind
    max_lora_rank: int
    base_model: str | None = None
    target_modules: frozenset[str] = frozenset(LLAMA_TARGET_MODULES)

    @property
    def label(self) -> str:
        return f"the {self.kind} runtime"


def job_problems(spec: FineTuneJobSpec, runtime: RuntimeProfile) -> list[str]:
    """Why the adapter a FineTuneJob would train could not be served by `runtime`, as `field: rule`
    lines (the API's own form), so the job is refused before it trains rather than after."""
    problems = []
    if spec.lora.rank > runtime.max_lora_rank:
        problems.append(f"spec.lora.rank: {spec.lora.rank} is above {runtime.max_lora_rank}, the highest LoRA rank "
                        f"{runtime.label} serves (the chart's serving.maxLoraRank)")
    unknown = [m for m in spec.lora.target_modules if m.rsplit(".", 1)[-1] not in runtime.target_modules]
    if unknown:
        problems.append(f"spec.lora.targetModules: {unknown} are not modules {runtime.label} applies LoRA to "
                        f"({', '.join(sorted(runtime.target_modules))}; the chart's serving.targetModules)")
    return problems


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > _HEADER_LIMIT:
                raise ValueError("header too large")
            header = json.loads(stream.read(length))
        return {name: tuple(int(n) for n in meta["shape"]) for name, meta in header.items() if name != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError) as error:
        raise AgentError(f"{path.name} is not a readable safetensors file ({type(error).__name__})",
                         code="adapter_corrupt") from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~", "file://", "s3://"))


def adapter_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    """The adapter's rank: the largest first dimension of its A matrices."""
    ranks = [shape[0] for key, shape in shapes.items()
             if (parsed := parse_lora_key(key)) and parsed[1] == "A" and shape]
    if not ranks:
        raise AgentError("adapter_model.safetensors holds no LoRA A/B weights", code="adapter_corrupt")
    return max(ranks)


def servability_problems(config: AdapterConfig, card: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                         runtime: RuntimeProfile) -> list[tuple[str, str]]:
    """Every reason `runtime` could not serve the adapter, as (code, message); empty when it can."""
    where = runtime.label
    problems: list[tuple[str, str]] = []
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
    # From the tensors, not the config: a regex target_modules says nothing until it has matched.
    modules = {parsed[0].rsplit(".", 1)[-1] for key in shapes if (parsed := parse_lora_key(key))}
    unknown = sorted(modules - runtime.target_modules)
    if unknown:
        problems.append(("target_modules_unsupported",
                         f"target_modules {unknown}: {where} applies LoRA only to "
                         f"{', '.join(sorted(runtime.target_modules))}"))
    declared = declared_base_name(config, card)
    if declared and runtime.base_model and not _looks_like_path(declared) and declared != runtime.base_model:
        problems.append(("base_model_mismatch",
                         f"adapter was trained for base model {declared!r}, {where} serves {runtime.base_model!r}"))
    extra = sorted(key for key in shapes if parse_lora_key(key) is None)
    if extra:
        problems.append(("adapter_unsupported",
                         f"tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + f" is not a LoRA A/B matrix: {where} loads LoRA A/B weights only"))
    try:
        rank = adapter_rank(shapes)
    except AgentError as error:
        problems.append((error.code, error.message))
    else:
        if rank > runtime.max_lora_rank:
            problems.append(("rank_too_high",
                             f"adapter rank {rank} exceeds the maximum {runtime.max_lora_rank} of {where} "
                             "(--max-lora-rank)"))
    return problems


# --- the runtime's answers -------------------------------------------------------------------

RuntimeOutcome = Literal["loaded", "unloaded", "already_loaded", "not_found", "rank_too_high", "refused", "failed"]


@dataclass(frozen=True)
class RuntimeAnswer:
    outcome: RuntimeOutcome
    message: str


def answer_text(body: str) -> str:
    """The human part of an answer: vLLM's success is plain text, its errors JSON, in the current
    (`{"error": {"message"}}`) or the older (`{"message"}`) shape; Tessera's server answers JSON."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else data.get("message")
        if isinstance(message, str):
            return message[:500]
    return body.strip()[:500]


def classify_load(status: int, body: str) -> RuntimeAnswer:
    """One outcome for each answer vLLM documents for POST /v1/load_lora_adapter.

    200 (plain text "Success: LoRA adapter 'x' added successfully.") → loaded; 400 "has already
    been loaded" → already_loaded; 404 (no adapter at lora_path) → not_found; a rank above
    --max-lora-rank → rank_too_high (vLLM answers it with 500); other 4xx → refused; 5xx → failed.
    """
    message = answer_text(body)
    if 200 <= status < 300:
        return RuntimeAnswer("loaded", message)
    lowered = message.lower()
    if status == 400 and "already" in lowered and "loaded" in lowered:
        return RuntimeAnswer("already_loaded", message)
    if "rank" in lowered and ("max_lora_rank" in lowered or "max-lora-rank" in lowered or "greater" in lowered
                              or "exceeds" in lowered):
        return RuntimeAnswer("rank_too_high", message)
    if status == 404:
        return RuntimeAnswer("not_found", message)
    return RuntimeAnswer("refused" if status < 500 else "failed", message)


def classify_unload(status: int, body: str) -> RuntimeAnswer:
    """200 → unloaded; 404 (vLLM: "cannot be found", Tessera: "does not exist") → not_found."""
    message = answer_text(body)
    if 200 <= status < 300:
        return RuntimeAnswer("unloaded", message)
    if status == 404:
        return RuntimeAnswer("not_found", message)
    return RuntimeAnswer("refused" if status < 500 else "failed", message)

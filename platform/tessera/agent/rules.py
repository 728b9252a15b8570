"""What the runtime beside the agent can serve, and what its adapter API's answers mean: pure functions.

The adapter checks run before the runtime sees the adapter, on its PEFT config and on the tensor
names and shapes in the safetensors header (`tessera.adapter_format` reads them without loading a
weight, and holds the checks every runtime shares), so a refusal names the field at fault and the
runtime instead of surfacing as vLLM's 500. vLLM's own rules (its `lora/` package) on top: rank at
most `--max-lora-rank`, LoRA only on its target modules, A/B matrices only (embedding and lm_head
included, never whole tables).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tessera.adapter_format import (
    AdapterConfig,
    AdapterFormatError,
    ModelCard,
    Problem,
    adapter_rank,
    parse_lora_key,
    shared_problems,
    some,
)
from tessera.adapter_format.runtime import RuntimeProfile
from tessera.errors import CodedError


class AgentError(CodedError):
    """A load or unload the agent refused or could not complete: one stable code, its HTTP status."""

    @classmethod
    def of(cls, error: AdapterFormatError) -> AgentError:
        return cls(error.message, code=error.code, status=error.status)


def servability_problems(config: AdapterConfig, card: ModelCard | dict[str, Any], shapes: dict[str, tuple[int, ...]],
                         runtime: RuntimeProfile) -> list[Problem]:
    """Every reason `runtime` could not serve the adapter, as (code, message); empty when it can."""
    where = runtime.label
    problems = shared_problems(config, card, where=where, served_base=runtime.base_model)
    # From the tensors, not the config: a regex target_modules says nothing until it has matched.
    modules = {parsed[0].rsplit(".", 1)[-1] for key in shapes if (parsed := parse_lora_key(key))}
    unknown = sorted(modules - runtime.target_modules)
    if unknown:
        problems.append(("target_modules_unsupported",
                         f"target_modules {unknown}: {where} applies LoRA only to "
                         f"{', '.join(sorted(runtime.target_modules))}"))
    extra = sorted(key for key in shapes if parse_lora_key(key) is None)
    if extra:
        problems.append(("adapter_unsupported",
                         f"tensor {some(extra)} is not a LoRA A/B matrix: {where} loads LoRA A/B weights only"))
    try:
        rank = adapter_rank(shapes)
    except AdapterFormatError as error:
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

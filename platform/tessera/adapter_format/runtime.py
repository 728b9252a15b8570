"""What a serving runtime can serve: its profile (the chart passes the runtime's own flags), and the
FineTuneJob rule it implies, shared by the adapter agent (which checks adapters against it) and the
operator (which refuses a job whose adapter could not be served)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tessera.api.finetunejob import FineTuneJobSpec

RuntimeKind = Literal["vllm", "tessera"]
# LoRA-able modules of the LLaMA family, as both runtimes name them in PEFT configs.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "embed_tokens", "lm_head")


@dataclass(frozen=True)
class RuntimeProfile:
    """What the runtime can serve: its kind, `--max-lora-rank`, base model and LoRA target modules."""

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

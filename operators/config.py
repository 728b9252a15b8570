"""The operator's settings: what the Helm chart sets in its Deployment's environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tessera.adapter_format.runtime import LLAMA_TARGET_MODULES, RuntimeKind, RuntimeProfile
from tessera.api.finetunejob import Launcher
from tessera_pipelines.interface import (
    DEFAULT_GPU_RESOURCE,
    DEFAULT_IMAGE,
    DEFAULT_STORE_SECRET,
    SERVICE_ACCOUNT,
    TEMPLATE_NAME,
)

_ENV = {
    "workflow_template": "TESSERA_WORKFLOW_TEMPLATE",
    "workflow_service_account": "TESSERA_WORKFLOW_SERVICE_ACCOUNT",
    "trainer_image": "TESSERA_TRAINER_IMAGE",
    "serving_runtime": "TESSERA_SERVING_RUNTIME",
    "gpu_resource": "TESSERA_GPU_RESOURCE",
    "launcher": "TESSERA_LAUNCHER",
    "other_launchers": "TESSERA_OTHER_LAUNCHERS",
    "store_uri": "TESSERA_STORE_URI",
    "store_secret": "TESSERA_STORE_SECRET",
    "poll_seconds": "TESSERA_POLL_SECONDS",
    "replica_port": "TESSERA_REPLICA_PORT",
    "serving_runtime_kind": "TESSERA_SERVING_RUNTIME_KIND",
    "max_lora_rank": "TESSERA_MAX_LORA_RANK",
    "target_modules": "TESSERA_TARGET_MODULES",
}
_JSON_FIELDS = {"target_modules"}


class OperatorConfig(BaseModel):
    """Installation-wide choices; a FineTuneJob's own spec always wins over them."""

    model_config = ConfigDict(frozen=True)

    workflow_template: str = TEMPLATE_NAME
    workflow_service_account: str = SERVICE_ACCOUNT
    trainer_image: str = DEFAULT_IMAGE
    serving_runtime: str = "tessera"
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    # The kind that runs a job's training pods unless its spec.distribution.launcher says otherwise,
    # and the other kinds a job may pick (the chart grants the workflow RBAC for exactly these).
    launcher: Launcher = "pytorchjob"
    other_launchers: tuple[Launcher, ...] = ()
    # Applied to jobs whose spec names no store: the installation's store and its Secret.
    store_uri: str | None = None
    store_secret: str = DEFAULT_STORE_SECRET
    # How often running jobs and served adapters are looked at.
    poll_seconds: float = Field(10.0, gt=0)
    # Port of the adapter API on a predictor pod when its container declares none.
    replica_port: int = 8080
    # What the serving runtime can serve (the chart's serving.runtime, maxLoraRank, targetModules):
    # FineTuneJobs that would train an adapter it cannot serve are refused, vLLM's InferenceServices
    # get --quantization=bitsandbytes for a 4-bit base.
    serving_runtime_kind: RuntimeKind = "tessera"
    max_lora_rank: int = Field(64, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_TARGET_MODULES), min_length=1)

    def runtime_profile(self) -> RuntimeProfile:
        return RuntimeProfile(self.serving_runtime_kind, self.max_lora_rank, None, frozenset(self.target_modules))

    @field_validator("other_launchers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @property
    def launchers(self) -> tuple[str, ...]:
        """Every kind this installation can run, the default first."""
        return (self.launcher, *[k for k in self.other_launchers if k != self.launcher])

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        values = {field: env[name] for field, name in _ENV.items() if env.get(name)}
        return cls.model_validate({k: json.loads(v) if k in _JSON_FIELDS else v for k, v in values.items()})

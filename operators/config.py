"""The operator's settings: what the Helm chart sets in its Deployment's environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tessera.adapter_format.runtime import LLAMA_TARGET_MODULES, RuntimeKind, RuntimeProfile
from tessera.api.finetunejob import Launcher
from tessera.api.tenancy import DEFAULT_SHARED_PREFIXES, SchedulingAllowlist, TenancyRules
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
    "predictor_service_account": "TESSERA_PREDICTOR_SERVICE_ACCOUNT",
    # Tenancy (the chart's tenancy.* values; docs/install.md, "Multi-tenant").
    "tenancy": "TESSERA_TENANCY",
    "tenancy_roots": "TESSERA_TENANCY_ROOTS",
    "shared_prefixes": "TESSERA_SHARED_PREFIXES",
    "allowed_tolerations": "TESSERA_ALLOWED_TOLERATIONS",
    "allowed_node_selectors": "TESSERA_ALLOWED_NODE_SELECTORS",
    "allowed_priority_classes": "TESSERA_ALLOWED_PRIORITY_CLASSES",
    "max_inference_services": "TESSERA_MAX_INFERENCE_SERVICES",
    "max_namespace_operations": "TESSERA_MAX_NAMESPACE_OPERATIONS",
    "adapter_load_timeout": "TESSERA_ADAPTER_LOAD_TIMEOUT",
    "max_workers": "TESSERA_MAX_WORKERS",
}
_JSON_FIELDS = {"target_modules", "tenancy_roots", "shared_prefixes", "allowed_tolerations",
                "allowed_node_selectors", "allowed_priority_classes"}


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
    # The predictors' ServiceAccount (the chart makes it in every job namespace): the only identity granted
    # TokenReview and SubjectAccessReview, which inference access control needs. None: the namespace's default.
    predictor_service_account: str | None = None

    # A namespace is a tenant: the URIs its objects name lie under its prefixes of these store roots
    # (empty: the store_uri) or the shared read-only prefixes. False only by the admin's explicit choice.
    # (The chart sets both; with neither there is no store to divide, and nothing is enforced.)
    tenancy: bool = True
    tenancy_roots: list[str] = Field(default_factory=list)
    shared_prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_SHARED_PREFIXES))
    # What a FineTuneJob's spec.scheduling may ask for: exactly these tolerations, these values per
    # node label, these priority classes. Empty: none (pods go where the installation puts them).
    allowed_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    allowed_node_selectors: dict[str, list[str]] = Field(default_factory=dict)
    allowed_priority_classes: list[str] = Field(default_factory=list)
    # InferenceServices the operator creates per namespace, and operations (an adapter load, a
    # submission) running at once per namespace: one tenant never holds every worker.
    max_inference_services: int = Field(2, ge=0)
    max_namespace_operations: int = Field(4, ge=1)
    # kopf's worker threads for synchronous handlers, shared by every namespace.
    max_workers: int = Field(16, ge=1)
    # Seconds one adapter API call to a replica may take before the operator retries it later.
    adapter_load_timeout: float = Field(15.0, gt=0)

    def tenancy_rules(self) -> TenancyRules:
        """The tenancy rules; off when the admin turned them off, or when the installation names no store
        (the chart always names one: `tessera render` on a laptop does not)."""
        roots = self.tenancy_roots or ([self.store_uri] if self.store_uri else [])
        return TenancyRules(tuple(roots), tuple(self.shared_prefixes), enforced=self.tenancy and bool(roots))

    def scheduling_allowlist(self) -> SchedulingAllowlist:
        return SchedulingAllowlist(tuple(self.allowed_tolerations),
                                   {key: tuple(values) for key, values in self.allowed_node_selectors.items()},
                                   tuple(self.allowed_priority_classes))

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

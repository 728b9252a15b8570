"""Adapter: a published LoRA adapter and where it is served.

The operator creates one when a FineTuneJob succeeds; a user may apply one by hand for an
adapter trained elsewhere in PEFT format.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tessera.api.base import (
    API_VERSION,
    SHA256_HEX,
    ArtifactUri,
    Condition,
    DnsLabel,
    DnsSubdomain,
    KubeModel,
    KubeResource,
)

AdapterPhase = Literal["Pending", "Loading", "Ready", "Failed"]
ReplicaState = Literal["Pending", "Loading", "Loaded", "Failed", "Unloaded"]


class AdapterBaseModel(KubeModel):
    """The base model the adapter was trained on; the server refuses an adapter for another base."""

    uri: ArtifactUri = Field(description="Store URI of the base model's directory (an s3:// or local artifact).")
    name: str | None = None
    quantization_bits: Literal[4, 8] | None = Field(
        None, description="Bits the base was quantized to in training (the job's quantization.bits); "
        "vLLM serves a 4-bit base with --quantization=bitsandbytes.")


class Lineage(KubeModel):
    job: str | None = Field(None, description="namespace/name of the FineTuneJob that trained it.")
    dataset_uri: str | None = None
    dataset_sha256: str | None = Field(None, pattern=SHA256_HEX)


class AdapterServing(KubeModel):
    inference_service: DnsLabel | None = Field(None, description="Default: tessera-<base model dir name>.")
    create_inference_service: bool = True


class AdapterSpec(KubeModel):
    base_model: AdapterBaseModel
    uri: ArtifactUri = Field(description="Store URI of the PEFT adapter directory.")
    sha256: str | None = Field(
        None, pattern=SHA256_HEX, description="sha256 of adapter_model.safetensors; checked on load."
    )
    rank: int | None = Field(None, ge=1, le=256)
    task: str | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    metrics: dict[str, Any] = Field(default_factory=dict)
    serving: AdapterServing = Field(default_factory=AdapterServing)
    credentials_secret: DnsSubdomain | None = Field(None, description="Secret with the store credentials.")

    @model_validator(mode="after")
    def _s3_needs_a_secret(self) -> AdapterSpec:
        if self.uri.startswith("s3://") and not self.credentials_secret:
            raise ValueError(
                "credentialsSecret: required because spec.uri is an s3:// URI "
                "(name the Secret that holds the store credentials)"
            )
        return self


class ReplicaStatus(KubeModel):
    name: str
    url: str | None = None
    state: ReplicaState = "Pending"
    message: str = ""
    attempts: int = 0


class AdapterStatus(KubeModel):
    phase: AdapterPhase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    replicas: list[ReplicaStatus] = Field(default_factory=list)
    inference_service: str | None = None
    url: str | None = Field(None, description="OpenAI-compatible base URL that serves this adapter.")
    observed_generation: int | None = None
    message: str = ""
    reason: str | None = Field(None, description="Why the operator refused the Adapter (phase Failed), e.g. "
                               "OutsideTenantPrefixes, InferenceServiceQuota.")


class Adapter(KubeResource):
    """A LoRA adapter in the store, hot-loaded into the InferenceService of its base model."""

    api_version: Literal["tessera.dev/v1alpha1"] = API_VERSION
    kind: Literal["Adapter"] = "Adapter"
    spec: AdapterSpec
    status: AdapterStatus | None = None


"""What every Tessera resource shares: camelCase on the wire, snake_case in Python, strict fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tessera.errors import StoreError
from tessera.store.uri import check_uri

# The API group and version of every Tessera resource (CRDs, the operator's watches, child objects' owners).
GROUP = "tessera.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# DNS-1123 label: names that end up in object names, label values and adapter names.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256_HEX = r"^[0-9a-f]{64}$"

DnsLabel = Annotated[str, Field(pattern=DNS1123_LABEL, min_length=1, max_length=63)]
DnsSubdomain = Annotated[str, Field(pattern=DNS1123_SUBDOMAIN, min_length=1, max_length=253)]

# Human wording for the patterns above, used in error messages instead of the raw regex.
PATTERN_WORDS = {
    DNS1123_LABEL: "must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending "
    "with a letter or digit, at most 63 characters)",
    DNS1123_SUBDOMAIN: "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')",
    SHA256_HEX: "must be a sha256 digest (64 lower-case hexadecimal characters)",
}


def _uri_rule(store: bool) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            return check_uri(value, store=store)
        except StoreError as error:
            raise ValueError(str(error)) from None

    return check


# Store URIs, parsed by the one parser (`tessera.store.uri`) at validation, so `s3://b/../../x`,
# credentials in a bucket name or `file:///etc` fail at admission, not at run time.
ArtifactUri = Annotated[str, Field(min_length=1), AfterValidator(_uri_rule(store=False))]
StoreUri = Annotated[str, Field(min_length=1), AfterValidator(_uri_rule(store=True))]


class KubeModel(BaseModel):
    """Base of every spec/status model: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict a Kubernetes client sends, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(BaseModel):
    """The parts of Kubernetes ObjectMeta Tessera reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: DnsLabel
    namespace: DnsLabel = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(KubeModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class NamedResource(KubeModel):
    """A Tessera object: metadata and a spec, written back as kubectl shows it."""

    metadata: ObjectMeta

    def to_manifest(self) -> dict[str, Any]:
        """The object as kubectl shows it (camelCase), without status."""
        wire = self.to_wire()
        return {key: wire[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in wire}


class KubeResource(NamedResource):
    """What FineTuneJob and Adapter share: metadata, a spec naming a base model and its serving."""

    @property
    def inference_service_name(self) -> str:
        """The shared InferenceService of the base model, unless the spec names one."""
        from tessera.api.naming import inference_service_for

        spec = self.spec  # type: ignore[attr-defined]
        return spec.serving.inference_service or inference_service_for(spec.base_model.uri)


"""Inference access settings: one definition for both runtimes.

`tessera serve` fills them from its command line; in vLLM, which constructs a `--middleware` class
with no arguments, they come from the environment the chart sets (`from_environment`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .identity import (
    AllowAll,
    Authenticator,
    Authorizer,
    KeyRing,
    SubjectAccessReviewAuthorizer,
    TokenReviewAuthenticator,
)
from .kube import KubeApi, pod_namespace
from .quota import QuotaLedger, QuotaPolicy

MODES = ("kubernetes", "keys", "none")
log = logging.getLogger("tessera.access")


@dataclass(frozen=True)
class AccessSettings:
    mode: str = "kubernetes"
    api_keys_file: Path | None = None
    quotas_file: Path | None = None
    namespace: str | None = None  # where adapters are authorized; default: this pod's
    audit_include_content: bool = False
    audit_file: Path | None = None
    kube_api_url: str | None = None  # default: in-cluster
    kube_token_file: Path | None = None
    audiences: tuple[str, ...] = ()
    max_body_bytes: int = 16 << 20
    base: str | None = None  # the base model's name, for the audit; default: learnt from the model list

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"auth mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "keys" and self.api_keys_file is None:
            raise ValueError("auth mode keys needs a keys file (--api-keys / TESSERA_API_KEYS)")

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> AccessSettings:
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        return cls(
            mode=env.get("TESSERA_AUTH_MODE", "kubernetes"),
            api_keys_file=path("TESSERA_API_KEYS"),
            quotas_file=path("TESSERA_QUOTAS"),
            namespace=env.get("TESSERA_AUTH_NAMESPACE") or None,
            audit_include_content=env.get("TESSERA_AUDIT_INCLUDE_CONTENT", "").lower() in ("1", "true", "yes"),
            audit_file=path("TESSERA_AUDIT_FILE"),
            kube_api_url=env.get("TESSERA_KUBE_API") or None,
            kube_token_file=path("TESSERA_KUBE_TOKEN_FILE"),
            audiences=tuple(a for a in env.get("TESSERA_TOKEN_AUDIENCES", "").split(",") if a),
            base=env.get("TESSERA_BASE_MODEL") or None,
        )


@dataclass
class AccessPolicy:
    """The settings turned into the parts the middleware calls."""

    settings: AccessSettings
    authenticator: Authenticator
    authorizer: Authorizer
    quotas: QuotaLedger
    namespace: str
    open_access: bool = False
    models: dict[str, str | None] = field(default_factory=dict)  # name -> version, learnt from model lists
    base: str | None = None

    @classmethod
    def build(cls, settings: AccessSettings) -> AccessPolicy:
        namespace = settings.namespace or pod_namespace()
        quotas = QuotaLedger(QuotaPolicy.load(settings.quotas_file) if settings.quotas_file else QuotaPolicy())
        if settings.mode == "none":
            log.warning("auth mode none: every caller may use every model on this server, anonymously; "
                        "choose kubernetes or keys anywhere but a laptop")
            anyone = AllowAll()
            return cls(settings, anyone, anyone, quotas, namespace, open_access=True, base=settings.base)
        if settings.mode == "keys":
            ring = KeyRing.load(settings.api_keys_file)  # type: ignore[arg-type]
            log.info("auth mode keys: %d keys, %d grants", len(ring.keys), len(ring.grants))
            return cls(settings, ring, ring, quotas, namespace, base=settings.base)
        kube = (KubeApi(settings.kube_api_url, settings.kube_token_file) if settings.kube_api_url
                else KubeApi.in_cluster())
        log.info("auth mode kubernetes: TokenReview, SubjectAccessReview use on adapters.tessera.dev in %s",
                 namespace)
        return cls(settings, TokenReviewAuthenticator(kube, list(settings.audiences)),
                   SubjectAccessReviewAuthorizer(kube, namespace), quotas, namespace, base=settings.base)

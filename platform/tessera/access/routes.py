"""Which requests access control looks at, and where each names its model.

Matched on the path with slashes collapsed and a trailing one dropped. The rule is deny by default:
only the probes, the metrics and the adapter API (which the loopback guard keeps to the pod's own
agent) pass without a token; every POST names a model (in the KServe path, else in the JSON body)
that the caller must be allowed to use; the model lists are filtered to what the caller may use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    EXEMPT = "exempt"  # no token needed
    LIST = "list"  # a model list, filtered per caller
    MODEL = "model"  # names one model: authorized, metered, audited
    OTHER = "other"  # anything else: a valid token is enough (vLLM's /openapi.json, /version)


class Protocol(Enum):
    OPENAI = "openai"
    KSERVE = "kserve"


@dataclass(frozen=True)
class Route:
    kind: Kind
    protocol: Protocol
    model: str | None = None  # from the path; None when the body names it
    inference: bool = False  # answers with tokens (metered, prompt hashed)


_EXEMPT = re.compile(
    r"^(|/health|/ping|/metrics|/version|/v2|/v2/health/(live|ready))$"
    r"|/(load|unload)_lora_adapter$|^/v2/repository/models/[^/]+/(load|unload)$")
_LISTS = re.compile(r"^(/openai)?/v1/models$|^/v2/models$|^/v2/repository/index$")
_KSERVE_V1 = re.compile(r"^/v1/models/(?P<model>[^/:]+):(?P<verb>predict|explain)$")
_KSERVE_V2 = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/[^/]+)?"
                        r"(?P<tail>/infer|/generate|/generate_stream|/ready)?$")
_OPENAI_MODEL = re.compile(r"^(/openai)?/v1/models/(?P<model>.+)$")


def normalize(path: str) -> str:
    return re.sub(r"/+", "/", path).rstrip("/")


def classify(method: str, path: str) -> Route:
    path = normalize(path)
    lowered = path.lower()
    if _EXEMPT.search(lowered):
        return Route(Kind.EXEMPT, Protocol.OPENAI)
    if method in ("GET", "POST") and _LISTS.match(lowered):
        return Route(Kind.LIST, Protocol.KSERVE if lowered.startswith("/v2") else Protocol.OPENAI)
    if match := _KSERVE_V1.match(path):
        return Route(Kind.MODEL, Protocol.KSERVE, match["model"], inference=match["verb"] == "predict")
    if match := _KSERVE_V2.match(path):
        return Route(Kind.MODEL, Protocol.KSERVE, match["model"],
                     inference=(match["tail"] or "/ready") not in ("/ready",) and method == "POST")
    if method == "GET" and (match := _OPENAI_MODEL.match(path)):
        # OpenAI's model retrieval, and KServe v1's model readiness on the same path.
        return Route(Kind.MODEL, Protocol.OPENAI, match["model"])
    if method == "POST":
        return Route(Kind.MODEL, Protocol.OPENAI, None, inference=True)
    return Route(Kind.OTHER, Protocol.KSERVE if lowered.startswith("/v2") else Protocol.OPENAI)

"""Names derived from specs, shared by the operator, the CLI and the server."""

from __future__ import annotations

import hashlib
import re


def dns_label(text: str, max_length: int = 63) -> str:
    """`text` as a DNS-1123 label; long names keep a hash suffix so two never collide."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "x"
    if len(label) <= max_length:
        return label
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{label[: max_length - 9].rstrip('-')}-{digest}"


def inference_service_for(base_model_uri: str) -> str:
    """One shared InferenceService per base model: `tessera-<last path segment of its URI>`."""
    last = base_model_uri.rstrip("/").rsplit("/", 1)[-1]
    return dns_label(f"tessera-{last}")

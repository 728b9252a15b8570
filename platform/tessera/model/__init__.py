"""Base models: the tiny built-in LLaMA, and reading a model directory's identity."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tessera.model.tiny import IDENTITY_FILE, TINY_MODEL_NAME, init_tiny

__all__ = ["IDENTITY_FILE", "TINY_MODEL_NAME", "base_model_name", "init_tiny", "model_cache_dir"]


def model_cache_dir() -> Path:
    """Where remote and converted base models are kept on this machine (`TESSERA_CACHE_DIR`, else
    under the temp dir): shared by the steps of a run, so each fetches or converts a model once."""
    root = os.environ.get("TESSERA_CACHE_DIR") or Path(tempfile.gettempdir()) / "tessera-cache"
    return Path(root) / "models"


def base_model_name(model_dir: str | Path) -> str | None:
    """The name a model directory declares for itself, which adapters trained on it should carry.

    `tessera.json` (written by `init_tiny` and by `tessera model upload --name`) wins; otherwise
    the `_name_or_path` a Hugging Face config saved, when it is a hub name rather than a path.
    """
    model_dir = Path(model_dir)
    identity = model_dir / IDENTITY_FILE
    if identity.is_file():
        name = json.loads(identity.read_text()).get("name")
        if name:
            return str(name)
    config = model_dir / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_name_or_path") or ""
        if name and not name.startswith((".", "/")) and not Path(name).exists():
            return str(name)
    return None

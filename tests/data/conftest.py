"""Fixtures for the data tests: the tiny base model's tokenizer and FineTuneJobs built in code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer: byte-level BPE with Llama 3's special tokens and chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_job(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Any]:
    """A FineTuneJob over `dataset` (a spec.dataset mapping) with its store in `tmp_path`."""
    from tessera.api import load_job

    def make(dataset: dict[str, Any], overrides: list[str] = (), name: str = "data-test") -> Any:
        manifest = {
            "apiVersion": "tessera.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"uri": str(tiny_model_dir)},
                "dataset": dataset,
                "training": {"maxSeqLength": 256},
                "store": {"uri": str(tmp_path / "store")},
            },
        }
        return load_job(yaml.safe_dump(manifest), list(overrides))

    return make

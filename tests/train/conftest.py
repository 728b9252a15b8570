"""Fixtures for the trainer tests: the tiny base model, small FineTuneJobs, the `tessera` CLI as users run it.

The tiny LLaMA stands in for a real base model (no hub here), the local-directory store or the
moto S3 server (tests/conftest.py) for MinIO, and CPU processes for GPU workers.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
TFNS_SAMPLE = ROOT / "examples" / "data" / "tfns-sample.csv"
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


def sample_rows(count: int) -> list[dict[str, str]]:
    with TFNS_SAMPLE.open(newline="") as stream:
        return list(csv.DictReader(stream))[:count]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_job_file(directory: Path, model_dir: Path, name: str = "tfns-test", rows: int = 64,
                  dataset_uri: str | None = None, **spec: dict[str, Any]) -> Path:
    """A small TFNS FineTuneJob YAML in `directory` (store there too); `spec` sections are merged in."""
    data = dataset_uri or str(write_csv(directory / f"{name}.csv", sample_rows(rows)))
    manifest: dict[str, Any] = {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(model_dir), "name": "tessera/tiny-llama",
                          "quantization": {"bits": 4}, "computeDtype": "bfloat16"},
            "dataset": {"uri": data, "task": "sentiment", "labelMap": TFNS_LABELS, "evalSplit": 0.25,
                        "onBadRows": "skip"},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
            "training": {"epochs": 3, "learningRate": 0.005, "batchSize": 4, "maxSeqLength": 256,
                         "gradientCheckpointing": False, "checkpointEverySteps": 50, "loggingSteps": 2},
            "distribution": {"workers": 1, "gpusPerWorker": 0},
            "evaluation": {"maxSamples": 16, "maxNewTokens": 3, "batchSize": 16},
            "store": {"uri": str(directory / "store")},
        },
    }
    for section, values in spec.items():
        manifest["spec"].setdefault(section, {}).update(values)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture
def job_file(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Path]:
    """`make_job_file` in this test's temporary directory."""

    def make(**kwargs: Any) -> Path:
        return make_job_file(tmp_path, tiny_model_dir, **kwargs)

    return make


def tessera_command(*args: str) -> list[str]:
    """The `tessera` console script, run by this interpreter (what a user's shell runs)."""
    return [sys.executable, "-c", "from tessera.cli import main; main()", *args]


def run_tessera(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI to completion; its exit code, stdout and stderr are the user's view."""
    return subprocess.run(
        tessera_command(*map(str, args)), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, check=False,
    )

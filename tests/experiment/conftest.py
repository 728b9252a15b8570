"""Experiments over small FineTuneJob templates; the tiny random LLaMA stands in for a real base model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.train.conftest import sample_rows, tiny_model_dir, write_csv  # noqa: F401 - fixtures reused

TEMPLATE: dict[str, Any] = {
    "baseModel": {"uri": "models/tiny", "name": "tessera/tiny-llama", "quantization": {"bits": 4}},
    "dataset": {"uri": "data.csv", "task": "sentiment", "labelMap": {"0": "negative", "1": "positive",
                                                                      "2": "neutral"}},
    "store": {"uri": "store"},
}


def experiment_manifest(axes: list[dict[str, Any]], name: str = "ranks", template: dict[str, Any] | None = None,
                        **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"template": {"spec": copy.deepcopy(template or TEMPLATE)}, "matrix": {"axes": axes, **spec.pop(
            "matrix", {})}, **spec},
    }


def tiny_template_for(directory: Path, model_dir: Path) -> dict[str, Any]:
    """A FineTuneJob spec that trains the tiny model for a few steps on 48 TFNS rows (seconds on a CPU)."""
    data = write_csv(directory / "tfns.csv", sample_rows(48))
    return {
        "baseModel": {"uri": str(model_dir), "name": "tessera/tiny-llama", "quantization": {"bits": 4},
                      "computeDtype": "bfloat16"},
        "dataset": {"uri": str(data), "task": "sentiment", "evalSplit": 0.25, "onBadRows": "skip",
                    "labelMap": {"0": "negative", "1": "positive", "2": "neutral"}},
        "training": {"epochs": 1, "learningRate": 0.005, "batchSize": 4, "maxSeqLength": 128,
                     "gradientCheckpointing": False, "loggingSteps": 2},
        "distribution": {"workers": 1, "gpusPerWorker": 0},
        "evaluation": {"maxSamples": 12, "maxNewTokens": 3, "batchSize": 12},
        "cost": {"pricePerDeviceHour": 3.0},
        "store": {"uri": str(directory / "store")},
    }

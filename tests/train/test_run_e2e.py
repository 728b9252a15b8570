"""`tessera run` end to end on one machine, and `tessera evaluate --json` on the adapter it published.

Real parts: the `tessera` CLI in a subprocess, bitsandbytes 4-bit NF4 on the CPU backend, PEFT,
the local-directory store. Stand-ins: the tiny random LLaMA for a real base model, the CPU for
a GPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from tessera.store import local_manifest, manifest_digest

from .conftest import make_job_file, run_tessera

pytestmark = pytest.mark.slow

PROGRESS_KEYS = {"step", "totalSteps", "epoch", "percent", "loss", "tokensPerSecond", "etaSeconds",
                 "trainedTokens", "deviceHours", "checkpoints", "updatedAt"}
CLASSIFICATION_METRICS = {"accuracy", "f1_weighted", "per_class", "eval_loss", "samplesPerSecond", "secondsPerExample"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("run")
    job = make_job_file(workdir, tiny_model_dir, name="tfns-run", rows=96, cost={"pricePerDeviceHour": 2.5})
    result = run_tessera("run", "-f", job, "--json", "--no-progress")
    assert result.returncode == 0, result.stderr[-4000:]
    return {"job": job, "store": workdir / "store", "outcome": json.loads(result.stdout), "stderr": result.stderr,
            "data": workdir / "tfns-run.csv"}


def test_run_publishes_a_peft_adapter_that_peft_loads(finished_run: dict[str, Any], tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome = finished_run["outcome"]
    adapter_dir = Path(outcome["adapterUri"].removeprefix("file://"))
    assert adapter_dir.parent == finished_run["store"] / "adapters" / "default" / "tfns-run"
    assert {p.name for p in adapter_dir.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                        "model-card.json"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b), "the published adapter was never trained"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tessera/tiny-llama"
    assert config["r"] == 8


def test_model_card_and_published_record_carry_lineage_metrics_and_cost(
    finished_run: dict[str, Any], tiny_model_dir: Path
) -> None:
    outcome = finished_run["outcome"]
    adapter_dir = Path(outcome["adapterUri"].removeprefix("file://"))
    card = json.loads((adapter_dir / "model-card.json").read_text())
    assert card["baseModel"]["sha256"] == manifest_digest(local_manifest(tiny_model_dir))
    assert card["dataset"]["sha256"] == hashlib.sha256(finished_run["data"].read_bytes()).hexdigest()
    assert card["hyperparameters"]["lora"]["rank"] == 8
    assert card["hyperparameters"]["training"]["learningRate"] == 0.005
    assert card["metrics"]["adapter"]["accuracy"] == outcome["evaluation"]["adapter"]["accuracy"]
    assert card["training"]["trainedTokens"] == outcome["training"]["trainedTokens"] > 0
    assert card["training"]["deviceHours"] > 0
    assert card["cost"]["amount"] == pytest.approx(card["training"]["deviceHours"] * 2.5, rel=1e-3)
    assert card["createdAt"].endswith("Z")

    published = outcome["published"]
    weights = adapter_dir / "adapter_model.safetensors"
    assert published["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert published["datasetSha256"] == card["dataset"]["sha256"]
    assert published["baseModel"] == {"uri": str(tiny_model_dir), "name": "tessera/tiny-llama"}
    assert published["metrics"]["accuracy"] == outcome["evaluation"]["adapter"]["accuracy"]
    record = finished_run["store"] / "jobs" / "default" / "tfns-run" / "published.json"
    assert json.loads(record.read_text()) == published


def test_training_leaves_progress_checkpoints_and_a_loss_curve(finished_run: dict[str, Any]) -> None:
    job_dir = finished_run["store"] / "jobs" / "default" / "tfns-run"
    progress = json.loads((job_dir / "logs" / "progress.json").read_text())
    assert set(progress) == PROGRESS_KEYS
    training = finished_run["outcome"]["training"]
    assert progress["step"] == progress["totalSteps"] == training["step"]
    assert progress["percent"] == 100.0
    assert progress["trainedTokens"] == training["trainedTokens"]
    assert progress["checkpoints"] == [f"jobs/default/tfns-run/checkpoints/step-{training['step']}"]
    checkpoint = job_dir / "checkpoints" / f"step-{training['step']}"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "engine" / "optimizer.pt").is_file()
    assert (checkpoint / "rng" / "rank-0.json").is_file()
    curve = [json.loads(line) for line in (job_dir / "logs" / "train-log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in curve][-1] == training["step"]
    assert curve[-1]["loss"] < curve[0]["loss"], "the loss did not go down"


def test_evaluation_compares_base_adapter_and_majority(finished_run: dict[str, Any]) -> None:
    report = finished_run["outcome"]["evaluation"]
    assert report["task"] == "sentiment" and report["metric"] == "accuracy"
    assert report["samples"] == 16
    assert set(report["base"]) >= CLASSIFICATION_METRICS
    assert set(report["adapter"]) >= CLASSIFICATION_METRICS
    # The random base answers gibberish; after training the adapter answers with labels.
    assert report["adapter"]["unparsed_rate"] < report["base"]["unparsed_rate"]
    assert report["adapter"]["accuracy"] > report["base"]["accuracy"]
    assert report["majority"]["label"] in {"negative", "neutral", "positive"}
    assert "accuracy" in finished_run["stderr"] and "majority class" in finished_run["stderr"]


def test_evaluate_json_scores_any_adapter_on_any_dataset(finished_run: dict[str, Any]) -> None:
    job_dir = finished_run["store"] / "jobs" / "default" / "tfns-run"
    report_before = (job_dir / "eval" / "report.json").read_text()
    result = run_tessera(
        "evaluate", "-f", finished_run["job"], "--adapter", finished_run["outcome"]["adapterUri"],
        "--data", finished_run["data"], "--json", "--no-progress", "--set", "spec.evaluation.maxSamples=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert set(report["base"]) >= CLASSIFICATION_METRICS
    assert set(report["adapter"]) >= CLASSIFICATION_METRICS
    assert report["samples"] == 8
    assert report["adapterUri"] == finished_run["outcome"]["adapterUri"]
    assert report["data"] == str(finished_run["data"])
    # An ad-hoc evaluation never replaces the job's own report.
    assert (job_dir / "eval" / "report.json").read_text() == report_before


def test_rerunning_a_finished_job_publishes_nothing_new(finished_run: dict[str, Any]) -> None:
    result = run_tessera("run", "-f", finished_run["job"], "--json", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(result.stdout)
    assert again["adapterUri"] == finished_run["outcome"]["adapterUri"]
    assert again["training"]["resumedFrom"] == finished_run["outcome"]["training"]["step"]
    versions = list((finished_run["store"] / "adapters" / "default" / "tfns-run").iterdir())
    assert len(versions) == 1

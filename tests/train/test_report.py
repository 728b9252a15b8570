"""The evaluation report's pure parts: best checkpoint, majority baseline, improvement, the table."""

from __future__ import annotations

from tessera.api.records import EvaluationReport
from tessera.evaluate.report import best_checkpoint, format_table, improvement, majority_baseline
from tessera.publish import default_version, numeric_metrics


def test_best_checkpoint_by_metric_direction_ties_to_the_later() -> None:
    scores = {"step-10": {"accuracy": 0.7, "eval_loss": 0.9}, "step-20": {"accuracy": 0.8, "eval_loss": 1.1},
              "step-30": {"accuracy": 0.8, "eval_loss": 1.0}, "step-40": {"accuracy": None, "eval_loss": None}}
    assert best_checkpoint("accuracy", scores) == "step-30"
    assert best_checkpoint("eval_loss", scores) == "step-10"


def test_majority_baseline_answers_the_most_common_training_label() -> None:
    result = majority_baseline({"neutral": 60, "positive": 30, "negative": 10}, ["neutral", "positive", "neutral"])
    assert result == {"label": "neutral", "accuracy": 2 / 3}
    assert majority_baseline({}, ["neutral"]) is None


def test_improvement_is_positive_when_the_adapter_is_better() -> None:
    assert improvement("accuracy", {"accuracy": 0.5}, {"accuracy": 0.75}) == 0.25
    assert improvement("eval_loss", {"eval_loss": 2.0}, {"eval_loss": 1.5}) == 0.5
    assert improvement("accuracy", None, {"accuracy": 0.75}) is None


def test_table_lists_the_headline_metric_first_with_deltas() -> None:
    report = {"task": "sentiment", "metric": "f1_weighted", "samples": 3, "data": "eval split",
              "base": {"accuracy": 0.25, "f1_weighted": 0.1, "per_class": {}},
              "adapter": {"accuracy": 0.75, "f1_weighted": 0.7, "per_class": {}},
              "majority": {"label": "neutral", "accuracy": 0.5}, "checkpoint": "jobs/default/x/checkpoints/step-4"}
    lines = format_table(EvaluationReport.read(report)).splitlines()
    assert lines[0] == "sentiment on 3 examples (eval split)"
    assert lines[2].split() == ["f1_weighted", "0.1000", "0.7000", "+0.6000"]
    assert lines[3].split() == ["accuracy", "0.2500", "0.7500", "+0.5000"]
    assert not any("per_class" in line for line in lines)
    assert "majority class 'neutral': accuracy 0.5000" in lines


def test_publish_helpers() -> None:
    from datetime import datetime, timezone

    assert default_version(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "v20260102-030405"
    assert numeric_metrics({"accuracy": 0.5, "per_class": {}, "eval_loss": 1, "flag": True}) == {
        "accuracy": 0.5, "eval_loss": 1.0}

"""The records steps hand each other across processes: read typed, with one rule for old records."""

from __future__ import annotations

import pytest
from tessera.api.records import EvaluationReport, PublishedRecord, RecordError, RunOutcome, TrainingOutcome

PUBLISHED = {
    "name": "fpb", "version": "v1", "uri": "s3://tessera/adapters/team-a/fpb/v1", "sha256": "a" * 64,
    "baseModel": {"uri": "s3://tessera/models/tiny", "name": "tessera/tiny-llama"}, "task": "sentiment",
    "rank": 8, "metrics": {"accuracy": 0.8}, "datasetSha256": "b" * 64,
    "checkpoint": "jobs/team-a/fpb/checkpoints/step-4", "trainedTokens": 1200, "deviceHours": 0.01,
    "cost": {"amount": 0.02, "currency": "USD", "pricePerDeviceHour": 2.0},
}


def test_a_record_round_trips_and_keeps_what_a_newer_writer_added():
    document = {**PUBLISHED, "signedBy": "release-bot"}  # a field this version does not know
    record = PublishedRecord.read(document)
    assert record.base_model.name == "tessera/tiny-llama" and record.trained_tokens == 1200
    assert record.to_json() == document


def test_a_record_missing_a_required_field_is_refused_naming_it_never_its_values():
    old = {key: value for key, value in PUBLISHED.items() if key not in ("sha256", "checkpoint")}
    old["rank"] = "secret-rank-text"
    with pytest.raises(RecordError) as caught:
        PublishedRecord.read(old, "s3://tessera/jobs/team-a/fpb/published.json")
    message = str(caught.value)
    assert "s3://tessera/jobs/team-a/fpb/published.json is not a valid PublishedRecord" in message
    assert "sha256" in message and "checkpoint" in message and "rank" in message
    assert "secret-rank-text" not in message
    with pytest.raises(RecordError, match="expected a JSON object"):
        EvaluationReport.read(["not", "a", "report"])


def test_optional_fields_of_an_old_record_take_their_documented_defaults():
    report = EvaluationReport.read({"task": "sentiment", "metric": "accuracy", "adapter": {"accuracy": 0.7},
                                    "samples": 4})
    assert (report.base, report.majority, report.checkpoint, report.data) == (None, None, None, "eval split")
    assert report.score("adapter") == 0.7 and report.score("base") is None
    outcome = TrainingOutcome.read({"step": 4, "totalSteps": 4, "checkpoint": "c", "engine": "torch"})
    assert (outcome.world_size, outcome.trained_tokens, outcome.train_loss) == (1, 0, None)
    run = RunOutcome(job="team-a/fpb", adapter_uri=PUBLISHED["uri"], published=PublishedRecord.read(PUBLISHED),
                     training=outcome)
    assert RunOutcome.read(run.to_json()) == run and run.to_json()["adapterUri"] == PUBLISHED["uri"]

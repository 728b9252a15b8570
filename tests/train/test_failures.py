"""Bad input gets a clear error and loses nothing: bad rows named, a missing dataset caught before any
training, and no half-written adapter in the registry when a publish dies midway.

Stand-ins: moto's S3 server for MinIO (the registry test), the tiny LLaMA for a real base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tessera.errors import StoreUnavailableError

from .conftest import run_tessera, sample_rows, write_csv

pytestmark = pytest.mark.slow


def test_bad_rows_are_named_by_line_and_reason_and_nothing_trains(job_file, tmp_path: Path) -> None:
    rows = sample_rows(24)
    rows[3]["text"] = "   "  # data line 5 of the file (line 1 is the header)
    rows[7]["label"] = "7"  # line 9
    data = write_csv(tmp_path / "bad.csv", rows)
    job = job_file(name="bad-rows", dataset_uri=str(data), dataset={"onBadRows": "fail"})
    result = run_tessera("run", "-f", job, "--no-progress")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "line 5" in result.stderr and "empty text" in result.stderr
    assert "line 9" in result.stderr and "unknown label '7'" in result.stderr
    job_dir = tmp_path / "store" / "jobs" / "default" / "bad-rows"
    bad_rows = json.loads((job_dir / "prepared" / "bad_rows.json").read_text())
    assert [row["line"] for row in bad_rows] == [5, 9]
    assert not (job_dir / "checkpoints").exists()
    assert not (tmp_path / "store" / "adapters").exists()


def test_a_missing_dataset_fails_before_training_with_its_uri(job_file, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tfns.csv"
    job = job_file(name="no-data", dataset_uri=str(missing))
    result = run_tessera("run", "-f", job, "--no-progress")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"dataset {missing} does not exist" in result.stderr
    assert "[2/4] train" not in result.stderr
    assert not (tmp_path / "store" / "jobs" / "default" / "no-data" / "checkpoints").exists()


def test_a_publish_that_dies_midway_leaves_no_adapter_in_the_registry(
    job_file, tiny_model_dir, s3_env, s3_bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Everything in S3 here, the base model too (fetched once into the model cache)."""
    from minio import Minio
    from tessera.api import load_job
    from tessera.data import prepare
    from tessera.publish import publish_job
    from tessera.store import S3Store, local_manifest, manifest_digest, open_store
    from tessera.train.trainer import train_job

    from ..conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    store, _ = open_store(f"s3://{s3_bucket}")
    store.publish_dir(tiny_model_dir, "models/tiny-llama")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    path = job_file(name="broken-publish", rows=40, training={"maxSteps": 2},
                    evaluation={"enabled": False}, output={"version": "v1"},
                    baseModel={"uri": f"s3://{s3_bucket}/models/tiny-llama"},
                    store={"uri": f"s3://{s3_bucket}", "credentialsSecret": "tessera-store"})
    job = load_job(path)
    prepare(job)
    train_job(job, show_progress=False)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] != []

    real_put_file = S3Store._put_file

    def dies_on_the_weights(self, local, key, progress):  # noqa: ANN001 - same signature as the store's
        if key.endswith("adapter_model.safetensors"):
            raise StoreUnavailableError(f"connection reset while uploading {key}")
        return real_put_file(self, local, key, progress)

    monkeypatch.setattr(S3Store, "_put_file", dies_on_the_weights)
    with pytest.raises(StoreUnavailableError):
        publish_job(job)

    prefix = "adapters/default/broken-publish/v1"
    raw = Minio(s3_env.removeprefix("http://"), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, secure=False)
    # The failed publish cleared what it had uploaded (adapter_config.json went up before the weights).
    assert [o.object_name for o in raw.list_objects(s3_bucket, prefix=prefix + "/", recursive=True)] == []
    assert not store.exists(prefix)
    assert store.list("adapters") == [] and store.list("adapters", recursive=False) == []
    assert not store.exists("jobs/default/broken-publish/published.json")

    monkeypatch.setattr(S3Store, "_put_file", real_put_file)
    record = publish_job(job)  # the retry clears the interrupted attempt and publishes whole
    assert record.uri == f"s3://{s3_bucket}/{prefix}"
    assert sorted(store.list(prefix)) == [f"{prefix}/{name}" for name in
                                          ("adapter_config.json", "adapter_model.safetensors", "model-card.json")]
    card = json.loads(store.get_bytes(f"{prefix}/model-card.json"))
    assert card["baseModel"]["sha256"] == manifest_digest(local_manifest(tiny_model_dir))

    # Killed between the publish and its record: a rerun records the version it finds, whether the
    # job names its version or lets it default to a timestamp; no error, no second version.
    for version in ("v1", None):
        store.delete("jobs/default/broken-publish/published.json")
        job.spec.output.version = version
        assert publish_job(job) == record
        assert store.list("adapters/default/broken-publish", recursive=False) == [f"{prefix}/"]

"""What the operator reads from the artifact store: the trainer's progress, the evaluation report,
the publish record. The store is opened with the credentials of the job's Secret, not the
operator's own environment, so jobs of different teams can use different buckets and keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.api import FineTuneJob
from tessera.api.paths import eval_report_key, job_prefix, progress_key, published_key
from tessera.api.records import EvaluationReport, PublishedRecord
from tessera.errors import ObjectNotFoundError, StoreError
from tessera.store import RetryPolicy, S3Config, S3Store, Store, join_key, open_store

# The operator polls again soon: one short attempt now beats a long retry loop inside a handler.
POLL_RETRY = RetryPolicy(total_seconds=2.0, connect_timeout=2.0, read_timeout=10.0)


def open_job_store(uri: str, credentials: dict[str, str] | None) -> tuple[Store, str]:
    """The store of `uri`; for s3:// with the Secret's keys (KServe's names), else the operator's env."""
    if uri.startswith("s3://") and credentials is not None:
        bucket, _, key = uri[len("s3://"):].partition("/")
        return S3Store(bucket, S3Config.from_env(credentials), retry=POLL_RETRY), key.strip("/")
    return open_store(uri, retry=POLL_RETRY)


def _read(store: Store, key: str) -> dict[str, Any] | None:
    try:
        value = store.get_json(key)
    except ObjectNotFoundError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class ArtifactSnapshot:
    progress: dict[str, Any] | None
    report: EvaluationReport | None
    published: PublishedRecord | None


def read_job_artifacts(job: FineTuneJob, credentials: dict[str, str] | None,
                       need_report: bool, need_published: bool) -> ArtifactSnapshot:
    """The job's progress file, and its report and publish record once the steps that write them ran.

    Raises StoreError (StoreUnavailableError when transient), RecordError for a record this version
    cannot read; messages never carry a credential.
    """
    store, root = open_job_store(job.spec.store.uri, credentials)

    def read(key: str) -> dict[str, Any] | None:
        return _read(store, join_key(root, key))

    def read_record(kind: type[EvaluationReport] | type[PublishedRecord], key: str) -> Any:
        document = read(key)
        return None if document is None else kind.read(document, store.uri(join_key(root, key)))

    return ArtifactSnapshot(
        progress=read(progress_key(job)),
        report=read_record(EvaluationReport, eval_report_key(job)) if need_report else None,
        published=read_record(PublishedRecord, published_key(job)) if need_published else None,
    )


def delete_job_artifacts(job: FineTuneJob, credentials: dict[str, str] | None) -> None:
    """Remove the job's prefix (prepared data, checkpoints, evaluation, logs). Published adapters
    live under `adapters/` and stay. Raises StoreError."""
    store, root = open_job_store(job.spec.store.uri, credentials)
    store.delete(join_key(root, job_prefix(job)), recursive=True, missing_ok=True)


__all__ = ["ArtifactSnapshot", "StoreError", "delete_job_artifacts", "open_job_store", "read_job_artifacts"]

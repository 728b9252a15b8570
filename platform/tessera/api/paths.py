"""Artifact keys inside the store, relative to `spec.store.uri` (see ARCHITECTURE.md's layout)."""

from __future__ import annotations

from tessera.api.finetunejob import FineTuneJob


def job_prefix(job: FineTuneJob) -> str:
    return f"jobs/{job.metadata.namespace}/{job.metadata.name}"


def prepared_prefix(job: FineTuneJob) -> str:
    return f"{job_prefix(job)}/prepared"


def checkpoints_prefix(job: FineTuneJob) -> str:
    return f"{job_prefix(job)}/checkpoints"


def eval_prefix(job: FineTuneJob) -> str:
    return f"{job_prefix(job)}/eval"


def logs_prefix(job: FineTuneJob) -> str:
    return f"{job_prefix(job)}/logs"


def progress_key(job: FineTuneJob) -> str:
    return f"{logs_prefix(job)}/progress.json"


def eval_report_key(job: FineTuneJob) -> str:
    return f"{eval_prefix(job)}/report.json"


def published_key(job: FineTuneJob) -> str:
    return f"{job_prefix(job)}/published.json"


def adapter_prefix(namespace: str, name: str, version: str) -> str:
    return f"adapters/{namespace}/{name}/{version}"


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



# ---- teacher labelling (spec.dataset.teacher) ----

def labelled_prefix(job: FineTuneJob) -> str:
    """The label step's output: `data.jsonl` (what prepare reads), `manifest.json`, `rejected.json`."""
    return f"{job_prefix(job)}/labelled"


def teacher_cache_prefix(namespace: str) -> str:
    """The tenant's teacher answers, one object per (teacher, prompt, text) hash: shared by its jobs and
    kept by `tessera run --fresh`, so no request is ever paid for twice. A job name cannot start with '_'."""
    return f"jobs/{namespace}/_teacher-cache"


def labelled_data_key(job: FineTuneJob) -> str:
    return f"{labelled_prefix(job)}/data.jsonl"


def labelled_manifest_key(job: FineTuneJob) -> str:
    return f"{labelled_prefix(job)}/manifest.json"

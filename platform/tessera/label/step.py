"""`tessera label`: the step before prepare when a job has `spec.dataset.teacher`.

Reads `spec.dataset.uri`, asks the teacher about every row whose label is empty (every row with
`relabel: true`), and writes under `labelled_prefix(job)`:
- `data.jsonl`: the rows prepare trains on, keyed by task field: human-labelled rows as they
  were, teacher-labelled rows with the teacher's label, rows dropped for low confidence or an
  unparsed answer left out;
- `rejected.json`: each left-out row (row, line, reason, the teacher's answers);
- `manifest.json` (written last): teacher (host, model, prompt hash), counts (rows, human,
  labelled, kept, droppedLowConfidence, unparsed, failed), tokens in and out, requests,
  wall time, cost, the rows whose label came from the teacher, and the sha256 of `data.jsonl`.

Progress: a bar locally; in the store's progress document on a cluster (rows done / total, ETA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tessera.api import FineTuneJob, paths
from tessera.api.finetunejob import TeacherSpec
from tessera.data.load import LINE_KEY, ROW_KEY, read_dataset
from tessera.errors import TesseraError
from tessera.job_artifacts import JobArtifacts
from tessera.label.client import RequestCounts, TeacherError
from tessera.label.labeller import (
    LabelStats,
    RowLabel,
    TeacherCache,
    api_key_from_env,
    label_records,
    render_prompt,
    teacher_identity,
)
from tessera.store import Store, join_key
from tessera.tasks import RowError, Task, get_task
from tessera.tasks.base import is_missing

log = logging.getLogger(__name__)

REJECTED_FILE = "rejected.json"


class NoTeacherError(TesseraError):
    """`tessera label` on a job without `spec.dataset.teacher`."""


def needs_label(task: Task, record: Mapping[str, Any], relabel: bool) -> bool:
    value = record.get(task.label_field or "label")
    return relabel or is_missing(value) or (isinstance(value, str) and not value.strip())


def teacher_cache(artifacts: JobArtifacts) -> TeacherCache:
    return TeacherCache(artifacts.store, artifacts.key(paths.teacher_cache_prefix(artifacts.job.metadata.namespace)))


def _public(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def assemble(
    task: Task, teacher: TeacherSpec, records: Sequence[Mapping[str, Any]], asked: Mapping[int, RowLabel],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int], list[int]]:
    """(kept rows, rejected rows, counts, rows labelled by the teacher) from the teacher's verdicts.

    `asked` maps a record's index to the teacher's verdict on it; the others keep their human label."""
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    teacher_rows: list[int] = []
    counts = {"rows": len(records), "human": 0, "asked": len(asked), "labelled": 0, "kept": 0,
              "droppedLowConfidence": 0, "unparsed": 0, "failed": 0, "cached": 0}
    for index, record in enumerate(records):
        verdict = asked.get(index)
        if verdict is None:
            counts["human"] += 1
            kept.append(_public(record))
            continue
        counts["cached"] += verdict.cached
        where = {"row": record.get(ROW_KEY), "line": record.get(LINE_KEY)}
        if verdict.error is not None:
            counts["failed"] += 1
            rejected.append({**where, "reason": "failed", "error": verdict.error})
        elif verdict.label is None:
            counts["unparsed"] += 1
            rejected.append({**where, "reason": "unparsed", "answers": list(verdict.answers)})
        elif verdict.confidence < teacher.min_confidence:
            counts["labelled"] += 1
            counts["droppedLowConfidence"] += 1
            rejected.append({**where, "reason": "lowConfidence", "confidence": verdict.confidence,
                             "label": verdict.label, "answers": list(verdict.answers)})
        else:
            counts["labelled"] += 1
            kept.append({**_public(record), **(verdict.fields or {})})
            teacher_rows.append(len(kept))  # its row number in data.jsonl, as prepare will read it
    counts["kept"] = len(kept)
    return kept, rejected, counts, teacher_rows


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


class _Progress:
    """Rows done / total with an ETA: a tqdm bar for a person, the store's progress document for the operator."""

    def __init__(self, store: Store, key: str, total: int, show: bool) -> None:
        from tqdm.auto import tqdm

        self._store, self._key, self._total = store, key, total
        self._bar = tqdm(total=total, desc="label", unit="row", disable=not show, leave=False)
        self._done = 0
        self._started = time.monotonic()
        self._written = 0.0

    def row(self, verdict: RowLabel) -> None:
        self._done += 1
        self._bar.update(1)
        now = time.monotonic()
        if now - self._written >= 5 or self._done == self._total:
            self._written = now
            self.write()

    def write(self) -> None:
        elapsed = time.monotonic() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        eta = (self._total - self._done) / rate if rate > 0 else None
        # The trainer's progress document, counted in rows: the operator mirrors it into status.progress.
        self._store.put_json(self._key, {"stage": "label", "step": self._done, "totalSteps": self._total,
                                         "percent": round(100 * self._done / max(self._total, 1), 1),
                                         "etaSeconds": eta})

    def close(self) -> None:
        self._bar.close()


def label_job(job: FineTuneJob, *, show_progress: bool = True, backoff_base: float = 0.5) -> dict[str, Any]:
    """Run the label step of `job` and return its manifest. Raises TeacherError when the teacher
    cannot be used, or when rows failed and `allowPartial` is false (the cache keeps what was done)."""
    teacher = job.spec.dataset.teacher
    if teacher is None:
        raise NoTeacherError(f"{job.metadata.name}: spec.dataset.teacher is not set; nothing to label")
    # httpx logs every request at INFO: thousands of lines that would bury the progress and the summary.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    dataset = job.spec.dataset
    task = get_task(dataset.task)
    artifacts = JobArtifacts.open(job)
    store = artifacts.store
    prefix = artifacts.key(paths.labelled_prefix(job))
    manifest_key = artifacts.key(paths.labelled_manifest_key(job))
    # A manifest vouches for the files beside it: take it down before they change.
    store.delete(manifest_key, missing_ok=True)

    started = time.monotonic()
    source = read_dataset(dataset.uri, dataset.format, dataset.columns)
    indices = []
    for index, record in enumerate(source.records):
        if needs_label(task, record, teacher.relabel):
            try:
                render_prompt(teacher, task, record)
            except RowError:
                continue  # a row with no usable text: prepare reports it with the other bad rows
            indices.append(index)
    log.info("label: %d of %d rows of %s go to teacher %s at %s", len(indices), len(source.records), dataset.uri,
             teacher.model, teacher_identity(teacher, task)["host"])
    requests = RequestCounts()
    progress = _Progress(store, artifacts.key(paths.progress_key(job)), len(indices), show_progress)
    try:
        verdicts = label_records(teacher, task, [source.records[i] for i in indices], teacher_cache(artifacts),
                                 api_key_from_env(), on_row=progress.row, counts=requests, backoff_base=backoff_base)
    finally:
        progress.close()
    asked = dict(zip(indices, verdicts, strict=True))
    kept, rejected, counts, teacher_rows = assemble(task, teacher, source.records, asked)
    stats = LabelStats()
    stats.add(verdicts)
    if counts["failed"] and not teacher.allow_partial:
        first = next(r for r in rejected if r["reason"] == "failed")
        raise TeacherError(f"{counts['failed']} of {len(indices)} rows could not be labelled (first, row "
                           f"{first['row']}: {first['error']}); rerun to retry only those (answers are cached), "
                           "or set spec.dataset.teacher.allowPartial")
    data = _jsonl(kept)
    manifest = {
        "teacher": teacher_identity(teacher, task),
        "task": task.name,
        "source": {"uri": dataset.uri, "sha256": source.sha256},
        "counts": counts,
        "teacherRows": teacher_rows,
        "tokens": {"input": stats.tokens_in, "output": stats.tokens_out},
        "requests": {"sent": requests.sent, "retries": requests.retries, "failed": requests.failed,
                     "statuses": dict(sorted(requests.statuses.items()))},
        "wallSeconds": round(time.monotonic() - started, 3),
        "cost": {"amount": round(stats.cost(teacher), 6), "currency": teacher.price.currency,
                 "inputPerMillion": teacher.price.input_per_million,
                 "outputPerMillion": teacher.price.output_per_million},
        "minConfidence": teacher.min_confidence,
        "dataSha256": hashlib.sha256(data).hexdigest(),
    }
    store.put_bytes(artifacts.key(paths.labelled_data_key(job)), data)
    store.put_json(join_key(prefix, REJECTED_FILE), rejected)
    store.put_json(manifest_key, manifest)  # last: it vouches for the others
    log.info("label: %d labelled (%d from the cache), %d kept, %d dropped below confidence %.2f, %d unparsed, "
             "%d failed; %d tokens in, %d out; %.1fs", counts["labelled"], counts["cached"], counts["kept"],
             counts["droppedLowConfidence"], teacher.min_confidence, counts["unparsed"], counts["failed"],
             stats.tokens_in, stats.tokens_out, manifest["wallSeconds"])
    return manifest


def labelled_manifest(job: FineTuneJob) -> dict[str, Any] | None:
    """The label step's manifest for the job, None if it has not run (or is running)."""
    artifacts = JobArtifacts.open(job)
    key = artifacts.key(paths.labelled_manifest_key(job))
    return artifacts.store.get_json(key) if artifacts.store.exists(key) else None

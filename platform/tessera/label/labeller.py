"""Rows -> teacher answers -> one label per row with a confidence, through a cache in the store.

    results = label_records(teacher_spec, task, records, cache, api_key)   # any records
    manifest = label_job(job)                                             # the job's label step

The cache holds one object per (teacher, sampling settings, prompt) hash under the tenant's
`teacher_cache_prefix`, written as soon as a row's answers are all in. A rerun, after a kill or
for another job of the same tenant, reads it first and sends only what it lacks: no answered
request is ever sent twice. Answers are parsed with the task's own parser; the majority of the
`samples` parsed labels wins, and its share of the samples is the row's confidence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tessera.api.finetunejob import TeacherSpec
from tessera.label.client import (
    API_KEY_ENV,
    Answer,
    RequestCounts,
    TeacherClient,
    TeacherError,
    TeacherRefusedError,
    teacher_host,
)
from tessera.store import Store, join_key
from tessera.tasks import ClassificationTask, Task
from tessera.tasks.base import is_missing

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def render_prompt(teacher: TeacherSpec, task: Task, record: Mapping[str, Any]) -> str:
    """The prompt the teacher sees: the override with `{field}` filled from the record, or the
    task's own prompt (exactly what the student is trained on for that row)."""
    if teacher.prompt is not None:
        prompt = teacher.prompt
        for name in task.fields:
            if name != task.label_field and not is_missing(record.get(name)):
                prompt = prompt.replace("{" + name + "}", str(record[name]))
        return prompt
    assert isinstance(task, ClassificationTask)
    return task.teacher_prompt(record)


def prompt_template_sha256(teacher: TeacherSpec, task: Task) -> str:
    """sha256 of the prompt template (the override, or the task's prompt around an empty text)."""
    template = teacher.prompt if teacher.prompt is not None else render_prompt(teacher, task, {"text": "{text}"})
    return hashlib.sha256(template.encode()).hexdigest()


def cache_key(teacher: TeacherSpec, prompt: str) -> str:
    """sha256 of the teacher (endpoint, model, sampling settings) and the full prompt (which holds the text)."""
    identity = [CACHE_VERSION, teacher.url.rstrip("/"), teacher.model, teacher.temperature, teacher.max_tokens,
                teacher.samples, prompt]
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()


def vote(labels: Sequence[str | None], samples: int) -> tuple[str | None, float]:
    """(majority label, its share of all samples); (None, 0.0) when no answer named a label.
    A tie goes to the label that came first, so a rerun picks the same one."""
    named = [label for label in labels if label is not None]
    if not named:
        return None, 0.0
    counts = Counter(named)
    best = max(counts.values())
    label = next(label for label in named if counts[label] == best)
    return label, best / samples


@dataclass(frozen=True)
class RowLabel:
    """The teacher's verdict on one row. `label` None: unparsed (the answers named no label, or lacked a
    field the task needs) or failed (`error`). `fields`: what the row gets (the label, and e.g. a conviction)."""

    key: str
    label: str | None
    confidence: float
    answers: tuple[str, ...]
    tokens_in: int
    tokens_out: int
    cached: bool
    error: str | None = None
    fields: dict[str, Any] | None = None


class TeacherCache:
    """Answers by cache key, as small JSON objects in the store (`<prefix>/<key[:2]>/<key>.json`)."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return join_key(self.prefix, f"{key[:2]}/{key}.json")

    def get(self, key: str) -> list[Answer] | None:
        location = self._key(key)
        if not self.store.exists(location):
            return None
        entry = self.store.get_json(location)
        return [Answer(a["text"], a["tokensIn"], a["tokensOut"]) for a in entry["answers"]]

    def put(self, key: str, answers: Sequence[Answer]) -> None:
        entry = {"answers": [{"text": a.text, "tokensIn": a.tokens_in, "tokensOut": a.tokens_out} for a in answers]}
        self.store.put_json(self._key(key), entry)


def _verdict(key: str, task: Task, answers: Sequence[Answer], samples: int, cached: bool) -> RowLabel:
    assert isinstance(task, ClassificationTask)
    texts = tuple(a.text for a in answers)
    label, confidence = vote([task.parse(text) for text in texts], samples)
    fields = task.teacher_fields(label, texts) if label is not None else None
    if fields is None:
        label, confidence = None, 0.0
    return RowLabel(key, label, confidence, texts, sum(a.tokens_in for a in answers),
                    sum(a.tokens_out for a in answers), cached, fields=fields)


async def _label_all(
    teacher: TeacherSpec, task: Task, prompts: Sequence[str], cache: TeacherCache, api_key: str | None,
    on_row: Callable[[RowLabel], None], counts: RequestCounts, backoff_base: float,
) -> list[RowLabel]:
    keys = [cache_key(teacher, prompt) for prompt in prompts]
    results: dict[str, RowLabel] = {}
    missing: dict[str, str] = {}
    for key, prompt in zip(keys, prompts, strict=True):
        if key in results or key in missing:
            continue
        answers = await asyncio.to_thread(cache.get, key)
        if answers is None:
            missing[key] = prompt
        else:
            results[key] = _verdict(key, task, answers, teacher.samples, cached=True)
            on_row(results[key])
    if not missing:
        return [results[key] for key in keys]

    async with TeacherClient(teacher, api_key, backoff_base=backoff_base) as client:
        await client.check()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for item in missing.items():
            queue.put_nowait(item)
        fatal: list[TeacherError] = []
        # Rows failing one after the other with none answered: the teacher is down, not one row bad.
        # Stopping then bounds the step's time by a few rows' retries, not by the whole dataset's.
        streak_limit = max(3, 2 * teacher.max_concurrency)
        streak = 0

        async def worker() -> None:
            nonlocal streak
            while not queue.empty() and not fatal:
                key, prompt = queue.get_nowait()
                try:
                    answers = [await client.ask(prompt) for _ in range(teacher.samples)]
                except TeacherRefusedError as error:
                    fatal.append(error)  # every other row would be refused the same way
                    continue
                except TeacherError as error:  # this row's retries are spent; the others go on
                    results[key] = RowLabel(key, None, 0.0, (), 0, 0, cached=False, error=str(error))
                    on_row(results[key])
                    streak += 1
                    if streak >= streak_limit:
                        fatal.append(TeacherError(f"stopped after {streak} rows in a row failed ({error})"))
                    continue
                streak = 0
                await asyncio.to_thread(cache.put, key, answers)
                results[key] = _verdict(key, task, answers, teacher.samples, cached=False)
                on_row(results[key])

        try:
            await asyncio.gather(*(worker() for _ in range(min(teacher.max_concurrency, len(missing)))))
        finally:
            counts.sent += client.counts.sent
            counts.retries += client.counts.retries
            counts.failed += client.counts.failed
            for status, number in client.counts.statuses.items():
                counts.statuses[status] = counts.statuses.get(status, 0) + number
        if fatal:
            raise fatal[0]
    return [results[key] for key in keys]


def label_records(
    teacher: TeacherSpec, task: Task, records: Sequence[Mapping[str, Any]], cache: TeacherCache,
    api_key: str | None, *, on_row: Callable[[RowLabel], None] = lambda row: None,
    counts: RequestCounts | None = None, backoff_base: float = 0.5,
) -> list[RowLabel]:
    """The teacher's label for each record, in order (identical prompts are asked once).

    Raises TeacherError when the teacher is unreachable, refuses the key or the model; a row whose
    retries are spent comes back with `error` set and the others go on."""
    prompts = [render_prompt(teacher, task, record) for record in records]
    return asyncio.run(_label_all(teacher, task, prompts, cache, api_key, on_row, counts or RequestCounts(),
                                  backoff_base))


def api_key_from_env() -> str | None:
    """The teacher's key: a pod gets it from the job's Secret, a laptop from its environment."""
    return os.environ.get(API_KEY_ENV) or None


@dataclass
class LabelStats:
    """Totals over rows for the manifest: tokens and cost."""

    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, rows: Sequence[RowLabel]) -> None:
        self.tokens_in += sum(row.tokens_in for row in rows)
        self.tokens_out += sum(row.tokens_out for row in rows)

    def cost(self, teacher: TeacherSpec) -> float:
        price = teacher.price
        return (self.tokens_in * price.input_per_million + self.tokens_out * price.output_per_million) / 1e6


def teacher_identity(teacher: TeacherSpec, task: Task) -> dict[str, Any]:
    """What a manifest and a model card say about the teacher (no URL path, no key)."""
    return {"host": teacher_host(teacher.url), "model": teacher.model,
            "promptSha256": prompt_template_sha256(teacher, task), "samples": teacher.samples,
            "temperature": teacher.temperature}

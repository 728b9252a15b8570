"""Teacher vs student on the held-out rows a person labelled: the distillation section of the report.

For a job with `spec.dataset.teacher`, the evaluate step asks the teacher about the same held-out
rows the student answered (through the label step's cache), and reports on the rows whose label
a person wrote (all of `evalUri`; for an `evalSplit`, the rows the teacher did not label): each
one's accuracy, how often they agree, and each one's cost per 1,000 predictions:
- the teacher's from its tokens per prediction at `teacher.price`, and from the seconds per
  prediction it took here at `spec.cost.pricePerDeviceHour` (for a teacher on a device you pay by the hour);
- the student's from its measured throughput at `spec.cost.pricePerDeviceHour`: the evaluate step's
  batched generation on this device, and, given a server with the student loaded
  (`tessera evaluate --serving-url`), its answers there at the teacher's concurrency.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from tessera.api import FineTuneJob
from tessera.tasks import Task


def accuracy(preds: Sequence[str | None], golds: Sequence[str | None]) -> float | None:
    pairs = [(p, g) for p, g in zip(preds, golds, strict=True) if g is not None]
    return sum(p == g for p, g in pairs) / len(pairs) if pairs else None


def agreement(a: Sequence[str | None], b: Sequence[str | None]) -> float | None:
    return sum(x is not None and x == y for x, y in zip(a, b, strict=True)) / len(a) if a else None


def per_thousand_by_time(seconds_per_prediction: float | None, price_per_hour: float) -> float | None:
    """Cost of 1,000 predictions on a device billed by the hour, at the measured seconds per prediction."""
    return None if seconds_per_prediction is None else 1000 * seconds_per_prediction * price_per_hour / 3600


def per_thousand_by_tokens(tokens_in: int, tokens_out: int, predictions: int, price: Any) -> float | None:
    """Cost of 1,000 predictions at a price per 1M input and output tokens, from the tokens measured."""
    if not predictions:
        return None
    return 1000 * (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6 / predictions


def serving_seconds_per_prediction(url: str, model: str, prompts: Sequence[str], concurrency: int,
                                   max_tokens: int) -> float:
    """Wall seconds per answer of `model` on a running OpenAI-compatible server, `concurrency` in flight
    (the label step's client: the same checks, retries and errors)."""
    import asyncio

    from tessera.api.finetunejob import TeacherSpec
    from tessera.label.client import TeacherClient

    spec = TeacherSpec(url=url, model=model, max_concurrency=concurrency, max_tokens=max_tokens)

    async def measure() -> float:
        async with TeacherClient(spec, None) as client:
            await client.check()
            gate = asyncio.Semaphore(concurrency)

            async def one(prompt: str) -> None:
                async with gate:
                    await client.ask(prompt)

            started = time.perf_counter()
            await asyncio.gather(*(one(prompt) for prompt in prompts))
            return (time.perf_counter() - started) / len(prompts)

    return asyncio.run(measure())


def human_rows(job: FineTuneJob, rows: Sequence[Mapping[str, Any]], teacher_rows: Sequence[int]) -> list[int]:
    """Indices of the eval rows whose label a person wrote."""
    if job.spec.dataset.eval_uri:
        return list(range(len(rows)))
    labelled = set(teacher_rows)
    return [i for i, row in enumerate(rows) if row.get("row") not in labelled]


def compare(
    golds: Sequence[str | None], student: Sequence[str | None], teacher: Sequence[str | None],
) -> dict[str, Any]:
    """Accuracy of each against the golds, and their agreement (pure)."""
    return {"samples": len(golds), "teacherAccuracy": accuracy(teacher, golds),
            "studentAccuracy": accuracy(student, golds), "agreement": agreement(student, teacher)}


def _eval_records(job: FineTuneJob, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The source records of the eval rows (their text, for the teacher's prompt), by row number."""
    from tessera.api.paths import labelled_data_key
    from tessera.data import read_dataset
    from tessera.job_artifacts import JobArtifacts

    dataset = job.spec.dataset
    if dataset.eval_uri:
        source = read_dataset(dataset.eval_uri, dataset.format, dataset.columns)
    else:
        source = read_dataset(JobArtifacts.open(job).uri(labelled_data_key(job)), "jsonl")
    by_row = {record["_row"]: record for record in source.records}
    return [by_row[row["row"]] for row in rows]


def teacher_vs_student(
    job: FineTuneJob, task: Task, rows: Sequence[Mapping[str, Any]], student_answers: Sequence[str],
    student_seconds_per_example: float | None, serving: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The distillation section of a teacher job's report (asks the teacher what its cache lacks).
    `serving`: (URL, model name) of a server with the student loaded, to time it there too."""
    from tessera.job_artifacts import JobArtifacts
    from tessera.label import label_records, labelled_manifest, teacher_identity
    from tessera.label.client import RequestCounts
    from tessera.label.labeller import api_key_from_env
    from tessera.label.step import teacher_cache

    teacher = job.spec.dataset.teacher
    assert teacher is not None
    manifest = labelled_manifest(job) or {}
    chosen = human_rows(job, rows, manifest.get("teacherRows", []))
    records = _eval_records(job, [rows[i] for i in chosen])
    counts = RequestCounts()
    started = time.perf_counter()
    verdicts = label_records(teacher, task, records, teacher_cache(JobArtifacts.open(job)), api_key_from_env(),
                             counts=counts)
    seconds = time.perf_counter() - started
    asked = sum(not v.cached for v in verdicts)
    golds = [rows[i].get("label") for i in chosen]
    student = [task.parse(student_answers[i]) for i in chosen]
    section = compare(golds, student, [v.label for v in verdicts])
    price_per_hour = job.spec.cost.price_per_device_hour
    tokens_in, tokens_out = sum(v.tokens_in for v in verdicts), sum(v.tokens_out for v in verdicts)
    label_wall = manifest.get("wallSeconds")
    label_sent = manifest.get("counts", {}).get("asked", 0) - manifest.get("counts", {}).get("cached", 0)
    served = None if serving is None else serving_seconds_per_prediction(
        serving[0], serving[1], [rows[i]["prompt"] for i in chosen], teacher.max_concurrency,
        job.spec.evaluation.max_new_tokens)
    return {
        **section,
        "teacher": teacher_identity(teacher, task),
        "gold": "human",
        "labelling": {"wallSeconds": label_wall, "rowsAsked": manifest.get("counts", {}).get("asked"),
                      "rowsSent": label_sent, "costAmount": manifest.get("cost", {}).get("amount")},
        "costPer1000": {
            "currency": job.spec.cost.currency,
            "teacherByTokens": per_thousand_by_tokens(tokens_in, tokens_out, len(verdicts), teacher.price),
            "teacherByTime": per_thousand_by_time(seconds / asked if asked else None, price_per_hour),
            "studentByTime": per_thousand_by_time(student_seconds_per_example, price_per_hour),
            "studentByServing": per_thousand_by_time(served, price_per_hour),
            "studentServingSecondsPerPrediction": served,
            "pricePerDeviceHour": price_per_hour,
            "teacherSecondsPerPrediction": seconds / asked if asked else None,
            "studentSecondsPerPrediction": student_seconds_per_example,
        },
    }


def format_distillation(section: Mapping[str, Any]) -> str:
    """Teacher vs student, a few lines for a person."""
    def cell(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    cost = section["costPer1000"]
    currency = cost["currency"]
    return "\n".join([
        f"teacher {section['teacher']['model']} at {section['teacher']['host']} vs student, on "
        f"{section['samples']} human-labelled held-out rows",
        f"  accuracy  teacher {cell(section['teacherAccuracy'])}  student {cell(section['studentAccuracy'])}  "
        f"agreement {cell(section['agreement'])}",
        f"  cost per 1,000 predictions ({currency}): teacher {cell(cost['teacherByTokens'], '.6f')} by tokens, "
        f"{cell(cost['teacherByTime'], '.6f')} by device time; student {cell(cost['studentByTime'], '.6f')} "
        f"by device time, {cell(cost.get('studentByServing'), '.6f')} served (at {cost['pricePerDeviceHour']} "
        "per device hour)",
    ])

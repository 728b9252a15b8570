"""Row-level validation: every bad record is reported by line number and reason, then fail or skip.

Reasons a record is bad: it could not be read (wrong cell count, not a JSON object), a required
field is missing or empty, its label is not one of the task's, or (when a tokenizer is given)
the rendered example is longer than `spec.training.maxSeqLength` tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from tessera.data.load import ERROR_KEY, LINE_KEY, ROW_KEY
from tessera.errors import DatasetError, InvalidSpecError
from tessera.tasks import Example, RowError, Task, get_task

if TYPE_CHECKING:
    from tessera.api import FineTuneJob

SHOWN_BAD_ROWS = 20


@dataclass(frozen=True)
class BadRow:
    """One record that breaks a rule: where it is in the source and why it is refused."""

    row: int
    line: int | None
    reason: str
    field: str | None = None

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.row}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadRowsError(DatasetError):
    """The dataset has bad rows and the job says to fail on them (or has no good row at all)."""

    def __init__(self, uri: str, bad_rows: Sequence[BadRow], total: int, policy: str, report: str = "") -> None:
        self.uri = uri
        self.bad_rows = list(bad_rows)
        self.total = total
        super().__init__(describe_bad_rows(uri, self.bad_rows, total, policy, report))


def describe_bad_rows(uri: str, bad_rows: Sequence[BadRow], total: int, policy: str, report: str = "") -> str:
    """A person-readable account: the count, the commonest reasons, the first rows, what to do."""
    shown = "\n".join(f"  {bad}" for bad in bad_rows[:SHOWN_BAD_ROWS])
    more = f"\n  ...and {len(bad_rows) - SHOWN_BAD_ROWS} more" if len(bad_rows) > SHOWN_BAD_ROWS else ""
    # Numbers masked, so "812 tokens, longer..." and "640 tokens, longer..." count as one reason.
    reasons = Counter(re.sub(r"\d+", "N", bad.reason.split(";")[0]) for bad in bad_rows)
    summary = ", ".join(f"{reason} ({count})" for reason, count in reasons.most_common(3))
    where = f"\nThe full list is in {report}." if report else ""
    if len(bad_rows) == total:
        advice = "No row is usable: check spec.dataset.columns, spec.dataset.labelMap and spec.dataset.task."
    elif policy == "fail":
        advice = "Fix these rows, or set spec.dataset.onBadRows=skip to train without them."
    else:
        advice = ""
    return (
        f"dataset {uri}: {len(bad_rows)} of {total} rows are bad (spec.dataset.onBadRows={policy}); "
        f"reasons: {summary}\n{shown}{more}{where}\n{advice}"
    ).rstrip()


def check_columns(task: Task, columns: Mapping[str, str]) -> None:
    """Refuse a column mapping onto a field the task does not have (a typo would empty every row)."""
    unknown = [name for name in columns if name not in task.fields]
    if unknown:
        raise InvalidSpecError([
            f"spec.dataset.columns.{name}: the {task.name} task has no field {name!r}; "
            f"its fields are {', '.join(task.fields)}" for name in unknown
        ])


def record_examples(task: Task, record: Mapping[str, Any], label_map: Mapping[str, str] | None = None) -> list[Example]:
    """The examples one record stands for; raises `RowError` when it breaks the task's rules."""
    if record.get(ERROR_KEY):
        raise RowError(str(record[ERROR_KEY]))
    return task.to_examples(record, label_map)


def _bad(record: Mapping[str, Any], reason: str, field: str | None = None) -> BadRow:
    return BadRow(row=record[ROW_KEY], line=record.get(LINE_KEY), reason=reason, field=field)


@dataclass(frozen=True)
class CheckedRecord:
    """A record that passed validation, with its examples and their token lengths (when measured)."""

    record: Mapping[str, Any]
    examples: list[Example]
    lengths: list[int] | None = None


def check_records(
    records: Sequence[Mapping[str, Any]],
    task: Task,
    label_map: Mapping[str, str] | None = None,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
) -> tuple[list[CheckedRecord], list[BadRow]]:
    """`validate_records` keeping what it computed: each good record's examples and token lengths."""
    from tessera.data.template import encode_examples

    passed: list[tuple[Mapping[str, Any], list[Example]]] = []
    bad: list[BadRow] = []
    for record in tqdm(records, desc="validating rows", unit="row", disable=None, leave=False):
        try:
            passed.append((record, record_examples(task, record, label_map)))
        except RowError as error:
            bad.append(_bad(record, error.reason, error.field))
    if tokenizer is None:
        return [CheckedRecord(record, examples) for record, examples in passed], bad
    encoded = iter(encode_examples([e for _, examples in passed for e in examples], tokenizer))
    good: list[CheckedRecord] = []
    for record, examples in passed:
        lengths = [len(next(encoded)[0]) for _ in examples]
        if max_seq_length is not None and not task.chunked and max(lengths) > max_seq_length:
            bad.append(_bad(record, f"{max(lengths)} tokens, longer than spec.training.maxSeqLength "
                                    f"{max_seq_length}"))
        else:
            good.append(CheckedRecord(record, examples, lengths))
    bad.sort(key=lambda b: b.row)
    return good, bad


def validate_records(
    records: Sequence[Mapping[str, Any]],
    task: Task | str,
    job: FineTuneJob | None = None,
    *,
    label_map: Mapping[str, str] | None = None,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
) -> tuple[list[Mapping[str, Any]], list[BadRow]]:
    """Split records into good ones and `BadRow`s (in source order).

    `label_map` and `max_seq_length` default to the job's `spec.dataset.labelMap` and
    `spec.training.maxSeqLength`. Lengths are checked only with a `tokenizer`, on the example
    rendered as it will be trained (the base model's chat template included); tasks that chunk
    long documents (`text`) are never too long.
    """
    task = get_task(task) if isinstance(task, str) else task
    if job is not None:
        label_map = job.spec.dataset.label_map if label_map is None else label_map
        max_seq_length = max_seq_length or job.spec.training.max_seq_length
    good, bad = check_records(records, task, label_map, tokenizer, max_seq_length)
    return [checked.record for checked in good], bad


def enforce_policy(uri: str, good_count: int, bad: Sequence[BadRow], policy: str, report: str = "") -> None:
    """Raise `BadRowsError` when the job fails on bad rows and has some, or when no row is good."""
    total = good_count + len(bad)
    if total == 0:
        raise DatasetError(f"dataset {uri} has no rows")
    if bad and (policy == "fail" or good_count == 0):
        raise BadRowsError(uri, bad, total, policy, report)

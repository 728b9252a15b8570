"""What every task is: record -> Example (prompt, completion, label), generated text -> label, metrics.

A task sees records whose keys are its own field names (the job's `spec.dataset.columns` has
already mapped source columns onto them, and `spec.dataset.labelMap` has rewritten raw labels).
A record that breaks the task's rules raises `RowError` naming the field; the data layer turns
that into a bad-row report with the row's line number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from tessera.tasks import metrics as m
from tessera.tasks import parsing


class RowError(ValueError):
    """One record breaks one of the task's rules; `field` is the task field at fault, if any."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    `prompt` is the instruction the model sees and `completion` the answer it learns (for `text`,
    the prompt is empty and the completion is the document). `label` is the canonical answer that
    `Task.parse` recovers from generated text (None for free-form tasks). `messages` holds a chat
    conversation (the `chat` task) so it can be rendered with the base model's own chat template.
    """

    prompt: str
    completion: str
    label: str | None = None
    messages: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Example:
        return cls(
            prompt=row.get("prompt", ""),
            completion=row["completion"],
            label=row.get("label"),
            messages=row.get("messages"),
        )


def instruction_prompt(instruction: str, input_text: str) -> str:
    """FinGPT's instruction format."""
    return f"Instruction: {instruction}\nInput: {input_text}\nAnswer: "


def is_missing(value: Any) -> bool:
    """None, a float NaN (pandas/Parquet nulls) or a missing key."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def require_value(record: Mapping[str, Any], name: str) -> Any:
    """The field's value as read (string, number, list...), or a `RowError` if it is absent or blank."""
    if name not in record or is_missing(record[name]):
        raise RowError(f"missing field '{name}'", name)
    value = record[name]
    if isinstance(value, str) and not value.strip():
        raise RowError(f"empty {name}", name)
    return value


def require_text(record: Mapping[str, Any], name: str) -> str:
    """The field as a stripped, non-empty string, or a `RowError` naming it."""
    value = require_value(record, name)
    return value.strip() if isinstance(value, str) else str(value)


def optional_text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    if is_missing(value) or not str(value).strip():
        return None
    return str(value).strip()


def raw_label(value: Any) -> str:
    """A label cell as text: integers stay integers even when a reader made them floats (2.0 -> '2')."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def apply_label_map(
    record: Mapping[str, Any], field: str | None, label_map: Mapping[str, str] | None
) -> Mapping[str, Any]:
    """The record with its raw label rewritten through `spec.dataset.labelMap` (unmapped labels kept)."""
    if not label_map or field is None or record.get(field) is None:
        return record
    mapped = label_map.get(raw_label(record[field]))
    return record if mapped is None else {**record, field: mapped}


def single_label(examples: Sequence[Example]) -> str | None:
    """The label of a record that is one example (what stratification uses), else None."""
    return examples[0].label if len(examples) == 1 else None


class Task:
    """The contract every task implements; classification tasks inherit `ClassificationTask`."""

    name: ClassVar[str]
    labels: ClassVar[tuple[str, ...] | None] = None
    label_field: ClassVar[str | None] = "label"
    fields: ClassVar[tuple[str, ...]] = ()
    default_metric: ClassVar[str] = "accuracy"
    generative: ClassVar[bool] = False
    # Free-form documents are chunked to the sequence length instead of being refused as too long.
    chunked: ClassVar[bool] = False

    def to_example(self, record: Mapping[str, Any]) -> Example:
        raise NotImplementedError

    def expand(self, record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The records one source row stands for (one, except for wide formats such as headlines)."""
        return [record]

    def to_examples(self, record: Mapping[str, Any], label_map: Mapping[str, str] | None = None) -> list[Example]:
        """The examples one record stands for, its raw labels first rewritten by `label_map`."""
        return [self.to_example(apply_label_map(r, self.label_field, label_map)) for r in self.expand(record)]

    def stratify_key(self, record: Mapping[str, Any], label_map: Mapping[str, str] | None = None) -> str | None:
        """The label a split or sample keeps in proportion; None for a record of several examples,
        a task without labels, or a record whose label cannot be read."""
        if self.labels is None:
            return None
        try:
            return single_label(self.to_examples(record, label_map))
        except RowError:
            return None

    def parse(self, generated: str) -> str | None:
        raise NotImplementedError

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str | None]) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, examples: Sequence[Example], generations: Sequence[str]) -> dict[str, Any]:
        """The task's metrics for generated answers to `examples` (what an evaluator calls)."""
        return self.metrics([self.parse(g) for g in generations], [e.label for e in examples])


class ClassificationTask(Task):
    """A closed label set; answers are parsed by finding the first label word (or synonym)."""

    # Other words for a label, in gold data and in generated answers alike.
    synonyms: ClassVar[Mapping[str, str]] = {}
    # Spellings accepted in gold data only (e.g. 0/1), too ambiguous to read out of generated text.
    gold_aliases: ClassVar[Mapping[str, str]] = {}
    json_keys: ClassVar[tuple[str, ...]] = ("answer", "label")

    def normalize_label(self, value: Any) -> str:
        """The canonical label for a raw gold label, or a `RowError` listing the allowed ones."""
        assert self.labels is not None
        text = raw_label(value).lower()
        if text in self.labels:
            return text
        canonical = self.synonyms.get(text) or self.gold_aliases.get(text)
        if canonical is not None:
            return canonical
        raise RowError(
            f"unknown label {raw_label(value)!r}; expected one of {', '.join(self.labels)} "
            "(map raw labels with spec.dataset.labelMap)",
            self.label_field,
        )

    def parse(self, generated: str) -> str | None:
        assert self.labels is not None
        vocabulary = {**{label: label for label in self.labels}, **self.synonyms}
        return parsing.find_label(generated, vocabulary, self.json_keys)

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str | None]) -> dict[str, Any]:
        return m.classification_metrics(preds, golds, self.labels)

    # ---- a teacher model labels the rows (tessera.label) ----

    def teacher_prompt(self, record: Mapping[str, Any]) -> str:
        """The prompt of a record whose label is still to come: what the student will be asked."""
        assert self.labels is not None and self.label_field is not None
        # The prompt never shows the label: any valid one renders it.
        return self.to_example({**record, self.label_field: self.labels[0]}).prompt

    def teacher_fields(self, label: str, answers: Sequence[str]) -> dict[str, Any] | None:
        """The fields the teacher's `answers` give a row once their majority `label` is decided;
        None when they lack something a training example needs."""
        assert self.label_field is not None
        return {self.label_field: label}


class GenerativeTask(Task):
    """Free-form answers, scored by ROUGE against the reference completion."""

    labels = None
    label_field = None
    default_metric = "rougeL"
    generative = True

    def parse(self, generated: str) -> str | None:
        return generated.strip() or None

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str | None]) -> dict[str, Any]:
        return m.rouge(preds, [g or "" for g in golds])

    def score(self, examples: Sequence[Example], generations: Sequence[str]) -> dict[str, Any]:
        return self.metrics([self.parse(g) for g in generations], [e.completion for e in examples])


def loads_json_field(record: Mapping[str, Any], name: str) -> Any:
    """A field that may hold a structure or that structure as JSON text (CSV cells)."""
    value = record.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as error:
            raise RowError(f"field '{name}' is not valid JSON ({error.args[0]})", name) from None
    return value


__all__ = [
    "ClassificationTask",
    "Example",
    "GenerativeTask",
    "RowError",
    "Task",
    "apply_label_map",
    "instruction_prompt",
    "is_missing",
    "loads_json_field",
    "optional_text",
    "raw_label",
    "require_text",
    "require_value",
    "single_label",
]

"""XBRL tagging: which US GAAP element does a value in a filing's text segment report?

Record fields: `text` (a sentence from a filing), `value` (the figure in it to tag), `label` (the
element name, e.g. `Revenues`; a `us-gaap:` prefix is accepted and dropped). The tag set is open,
as US GAAP has thousands of elements: any element-shaped name is a valid label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tessera.tasks import metrics as m
from tessera.tasks import parsing
from tessera.tasks.base import Example, RowError, Task, instruction_prompt, raw_label, require_text, require_value

_PREFIX = re.compile(r"^\s*us[-_]gaap[:_]", re.IGNORECASE)
_ELEMENT = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_PREFIXED = re.compile(r"us[-_]gaap[:_]([A-Za-z][A-Za-z0-9]*)", re.IGNORECASE)
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Z][A-Za-z0-9]*(?![A-Za-z0-9])")
# Capitalised words that start an answer sentence rather than name an element.
_NOT_ELEMENTS = frozenset({
    "The", "Tag", "Answer", "Element", "XBRL", "US", "GAAP", "It", "This", "That", "Is", "A", "An",
    "Value", "Input", "Output", "Label", "Correct", "Best", "Appropriate",
})


def instruction(value: str) -> str:
    return f"What is the US GAAP XBRL tag of the value {value} in the input text? Answer with the tag name only."


def normalize_element(value: str) -> str | None:
    """'us-gaap:Revenues' -> 'Revenues'; None when it is not shaped like an element name."""
    name = _PREFIX.sub("", value).strip()
    return name if _ELEMENT.match(name) else None


class XbrlTagsTask(Task):
    name = "xbrl-tags"
    labels = None
    fields = ("text", "value", "label")

    def to_example(self, record: Mapping[str, Any]) -> Example:
        text = require_text(record, "text")
        value = require_text(record, "value")
        raw = raw_label(require_value(record, "label"))
        label = normalize_element(raw)
        if label is None:
            raise RowError(f"unknown label {raw!r}: not a US GAAP element name such as 'Revenues'", "label")
        return Example(prompt=instruction_prompt(instruction(value), text), completion=label, label=label)

    def parse(self, generated: str) -> str | None:
        obj = parsing.extract_json(generated)
        if obj is not None:
            value = parsing.json_value(obj, ("tag", "element", "answer", "label"))
            if isinstance(value, str) and normalize_element(value):
                return normalize_element(value)
        prefixed = _PREFIXED.search(generated)
        if prefixed:
            return prefixed.group(1)
        return next((c for c in _CANDIDATE.findall(generated) if c not in _NOT_ELEMENTS), None)

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str | None]) -> dict[str, Any]:
        return m.classification_metrics(preds, golds)

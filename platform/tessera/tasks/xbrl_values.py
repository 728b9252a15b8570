"""XBRL value extraction: what figure does a filing's text segment report for a US GAAP element?

Record fields: `text` (a sentence from a filing), `tag` (the element, e.g. `Revenues`), `label`
(the value as a number; '$1.2 million', '(350)' and '1,200,000' are read as numbers). Answers
are compared as numbers written one canonical way, so '1,200,000' matches '1200000'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tessera.tasks import metrics as m
from tessera.tasks import parsing
from tessera.tasks.base import Example, RowError, Task, instruction_prompt, raw_label, require_text, require_value
from tessera.tasks.xbrl_tags import normalize_element


def instruction(tag: str) -> str:
    return f"What is the value of the US GAAP XBRL tag {tag} in the input text? Answer with the number only."


def _number(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return parsing.canonical_number(float(value))
    number = parsing.parse_number(str(value))
    return None if number is None else parsing.canonical_number(number)


class XbrlValuesTask(Task):
    name = "xbrl-values"
    labels = None
    fields = ("text", "tag", "label")

    def to_example(self, record: Mapping[str, Any]) -> Example:
        text = require_text(record, "text")
        tag = require_text(record, "tag")
        element = normalize_element(tag) or tag
        raw = require_value(record, "label")
        label = _number(raw)
        if label is None:
            raise RowError(f"label {raw_label(raw)!r} is not a number", "label")
        return Example(prompt=instruction_prompt(instruction(element), text), completion=label, label=label)

    def parse(self, generated: str) -> str | None:
        obj = parsing.extract_json(generated)
        if obj is not None:
            value = parsing.json_value(obj, ("value", "answer", "label"))
            if value is not None and _number(value) is not None:
                return _number(value)
        return _number(generated)

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str | None]) -> dict[str, Any]:
        return {
            "accuracy": m.accuracy(preds, golds),
            "unparsed_rate": sum(p is None for p in preds) / len(preds) if preds else 0.0,
        }

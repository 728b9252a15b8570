"""Named-entity typing in financial text: is this entity a person, an organization or a location?

Record fields: `text` (the sentence), `entity` (a span of it), `label` (person / organization /
location; CoNLL tags PER / ORG / LOC are accepted). The prompt follows FinGPT's NER
classification set (fingpt-ner-cls).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.tasks.base import (
    ClassificationTask,
    Example,
    RowError,
    instruction_prompt,
    require_text,
    require_value,
)

LABELS = ("person", "organization", "location")
SYNONYMS = {
    "per": "person", "individual": "person",
    "org": "organization", "organisation": "organization", "company": "organization",
    "loc": "location", "place": "location", "country": "location", "city": "location",
}


def instruction(entity: str) -> str:
    return (
        f"What is the entity type of '{entity}' in the input sentence? "
        "Please choose an answer from {person/organization/location}."
    )


class NerTask(ClassificationTask):
    name = "ner"
    labels = LABELS
    fields = ("text", "entity", "label")
    synonyms = SYNONYMS
    json_keys = ("answer", "type", "entity_type", "label")

    def to_example(self, record: Mapping[str, Any]) -> Example:
        text = require_text(record, "text")
        entity = require_text(record, "entity")
        if entity.lower() not in text.lower():
            raise RowError(f"entity {entity!r} does not occur in the text", "entity")
        label = self.normalize_label(require_value(record, "label"))
        return Example(prompt=instruction_prompt(instruction(entity), text), completion=label, label=label)

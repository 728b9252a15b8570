"""Yes/no questions about a news headline, as FinGPT builds its headline task from the gold-news data.

Two record shapes:
- wide (the gold commodity news CSV, Sinha & Khandait 2020): `text` (map it from `News`) and one
  0/1 column per question, named as in that CSV (`Price Direction Up`, `Price Direction
  Constant`, `Price Direction Down`, `Past Information`, `Future Information`, `Asset
  Comparision` [sic]); each row becomes one example per question column present. Its `Price
  Sentiment` column is not a yes/no question: train it with the `sentiment` task instead.
- long: `text`, `question`, `label` (yes/no, 1/0, true/false), one example per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.tasks.base import (
    ClassificationTask,
    Example,
    RowError,
    instruction_prompt,
    is_missing,
    require_text,
    require_value,
)

LABELS = ("no", "yes")
QUESTIONS = {
    "Price Direction Up": "Does the news headline talk about price going up?",
    "Price Direction Constant": "Does the news headline talk about price staying constant?",
    "Price Direction Down": "Does the news headline talk about price going down?",
    "Past Information": "Does the news headline talk about past price information?",
    "Future Information": "Does the news headline talk about future price information?",
    "Asset Comparision": "Does the news headline compare gold with any other asset?",
}
SYNONYMS = {"true": "yes", "false": "no"}
GOLD_ALIASES = {"1": "yes", "0": "no", "y": "yes", "n": "no"}


def instruction(question: str) -> str:
    return f"{question} Please choose an answer from {{Yes/No}}."


class HeadlineTask(ClassificationTask):
    name = "headline"
    labels = LABELS
    fields = ("text", "question", "label", *QUESTIONS)
    synonyms = SYNONYMS
    gold_aliases = GOLD_ALIASES

    def expand(self, record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        if "question" in record:
            return [record]
        present = [column for column in QUESTIONS if not is_missing(record.get(column))]
        if not present:
            raise RowError(
                "missing field: a headline row needs 'question' and 'label', or the gold-news question "
                f"columns ({', '.join(QUESTIONS)})",
                "question",
            )
        meta = {k: v for k, v in record.items() if k not in QUESTIONS}
        return [{**meta, "question": QUESTIONS[column], "label": record[column]} for column in present]

    def to_example(self, record: Mapping[str, Any]) -> Example:
        text = require_text(record, "text")
        question = require_text(record, "question")
        label = self.normalize_label(require_value(record, "label"))
        return Example(
            prompt=instruction_prompt(instruction(question), text), completion=label.capitalize(), label=label
        )

"""Sentiment of a financial text: negative / neutral / positive (FPB, FiQA-SA, TFNS, NWGI).

Record fields: `text`, `label`. Gold labels may be FPB's words, NWGI's seven grades (folded to
three: "strong negative" -> negative ...), or FiQA-SA's score in [-1, 1] written with a decimal
point (below -0.1 negative, above 0.1 positive, else neutral, as FinGPT folds it). TFNS's integer
classes need the job's label map ({"0": negative, "1": positive, "2": neutral}) because an integer
class is not a sentiment by itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tessera.tasks.base import ClassificationTask, Example, instruction_prompt, raw_label, require_text, require_value

LABELS = ("negative", "neutral", "positive")
INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."

# NWGI's seven grades and the words models (and other datasets) use for the same three classes.
SYNONYMS = {
    **{f"{grade} {polarity}": polarity for grade in ("strong", "strongly", "moderately", "mildly",
                                                     "slightly", "very") for polarity in ("negative", "positive")},
    "bearish": "negative", "bullish": "positive", "neg": "negative", "pos": "positive",
    "mixed": "neutral", "none": "neutral", "neu": "neutral",
}
_SCORE = re.compile(r"^[-+]?\d*\.\d+$")
FIQA_THRESHOLD = 0.1


class SentimentTask(ClassificationTask):
    name = "sentiment"
    labels = LABELS
    fields = ("text", "label")
    synonyms = SYNONYMS
    json_keys = ("answer", "sentiment", "label")

    def normalize_label(self, value: Any) -> str:
        text = raw_label(value)
        if _SCORE.match(text):
            score = float(text)
            return "negative" if score < -FIQA_THRESHOLD else "positive" if score > FIQA_THRESHOLD else "neutral"
        return super().normalize_label(value)

    def to_example(self, record: Mapping[str, Any]) -> Example:
        text = require_text(record, "text")
        label = self.normalize_label(require_value(record, "label"))
        return Example(prompt=instruction_prompt(INSTRUCTION, text), completion=label, label=label)

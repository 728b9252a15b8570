"""Domain adaptation on raw documents: causal language modelling, no instruction and no label.

Record field: `text` (a document of any length). Documents are chunked to the sequence length and
packed, so nothing is refused as too long. The measure of progress is the evaluation loss
(perplexity) on held-out documents, which the evaluator computes from the model's logits; the
ROUGE `metrics` here only serve continuations a caller generates itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.tasks.base import Example, GenerativeTask, require_text


class TextTask(GenerativeTask):
    name = "text"
    fields = ("text",)
    default_metric = "eval_loss"
    chunked = True

    def to_example(self, record: Mapping[str, Any]) -> Example:
        return Example(prompt="", completion=require_text(record, "text"))

"""Buy / sell / hold with a conviction in [0, 1], from a table of a company's financial metrics.

Record fields: `ticker` (optional), `table` (the metrics: a mapping, a list of [name, value]
pairs, or either as JSON text; with no `table` field, every other field of the record is a
metric, which suits a flat CSV with one column per metric), `label` (buy / sell / hold) and
`conviction` (a number in [0, 1]). The model answers in JSON: {"action": "buy", "conviction": 0.8}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tessera.tasks import metrics as m
from tessera.tasks import parsing
from tessera.tasks.base import (
    ClassificationTask,
    Example,
    RowError,
    instruction_prompt,
    is_missing,
    loads_json_field,
    optional_text,
    require_value,
)

LABELS = ("buy", "hold", "sell")
SYNONYMS = {
    "strong buy": "buy", "outperform": "buy", "overweight": "buy", "accumulate": "buy",
    "strong sell": "sell", "underperform": "sell", "underweight": "sell", "reduce": "sell",
    "neutral": "hold", "market perform": "hold", "equal weight": "hold",
}
_NOT_METRICS = frozenset({"ticker", "table", "label", "conviction"})
_CONVICTION = re.compile(r"(?:conviction|confidence)\D{0,12}?(\d*\.?\d+)", re.IGNORECASE)


def instruction(ticker: str | None) -> str:
    subject = ticker or "this company"
    return (
        f"Based on the financial metrics below, should an investor buy, sell or hold {subject}? "
        'Answer in JSON as {"action": "buy|sell|hold", "conviction": a number between 0 and 1}.'
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_table(table: Any) -> str:
    """The metrics as a Markdown table, the form instruction-tuned models read best."""
    if isinstance(table, str):
        return table.strip()
    rows = table.items() if isinstance(table, Mapping) else table
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {_format_value(value)} |" for name, value in rows]
    return "\n".join(lines)


def _conviction(value: Any) -> float:
    try:
        conviction = float(value)
    except (TypeError, ValueError):
        raise RowError(f"conviction {value!r} is not a number", "conviction") from None
    if not 0.0 <= conviction <= 1.0:
        raise RowError(f"conviction {conviction} is outside [0, 1]", "conviction")
    return conviction


def answer(action: str, conviction: float) -> str:
    return json.dumps({"action": action, "conviction": round(conviction, 2)})


class RecommendationTask(ClassificationTask):
    name = "recommendation"
    labels = LABELS
    fields = ("ticker", "table", "label", "conviction")
    synonyms = SYNONYMS
    json_keys = ("action", "recommendation", "answer", "label")

    def _table(self, record: Mapping[str, Any]) -> Any:
        if "table" in record:
            table = loads_json_field(record, "table")
        else:
            table = {k: v for k, v in record.items()
                     if k not in _NOT_METRICS and not k.startswith("_") and not is_missing(v)}
        if not table or (isinstance(table, str) and not table.strip()):
            raise RowError("empty table: no financial metrics in the row", "table")
        pairs = isinstance(table, list) and all(isinstance(p, list | tuple) and len(p) == 2 for p in table)
        if not (isinstance(table, str | Mapping) or pairs):
            raise RowError("table must be a mapping of metric -> value, a list of [metric, value] pairs, "
                           "or text", "table")
        return table

    def to_example(self, record: Mapping[str, Any]) -> Example:
        table = render_table(self._table(record))
        label = self.normalize_label(require_value(record, "label"))
        conviction = _conviction(require_value(record, "conviction"))
        prompt = instruction_prompt(instruction(optional_text(record, "ticker")), table)
        return Example(prompt=prompt, completion=answer(label, conviction), label=label)

    def parse_conviction(self, generated: str) -> float | None:
        """The conviction in an answer (JSON field or 'conviction: 0.7'), None when absent or out of range."""
        obj = parsing.extract_json(generated)
        value = parsing.json_value(obj, ("conviction", "confidence", "score")) if obj else None
        if value is None:
            match = _CONVICTION.search(generated)
            value = match.group(1) if match else None
        try:
            conviction = float(value) if value is not None else None
        except (TypeError, ValueError):
            return None
        return conviction if conviction is not None and 0.0 <= conviction <= 1.0 else None

    def teacher_prompt(self, record: Mapping[str, Any]) -> str:
        return super().teacher_prompt({**record, "conviction": 0.5})  # the prompt shows no conviction either

    def teacher_fields(self, label: str, answers: Sequence[str]) -> dict[str, Any] | None:
        """The label and the mean conviction of the answers that chose it (none given: not usable)."""
        convictions = [c for a in answers if self.parse(a) == label and (c := self.parse_conviction(a)) is not None]
        if not convictions:
            return None
        return {"label": label, "conviction": round(sum(convictions) / len(convictions), 4)}

    def score(self, examples: Sequence[Example], generations: Sequence[str]) -> dict[str, Any]:
        scores = super().score(examples, generations)
        predicted = [self.parse_conviction(g) for g in generations]
        gold = [self.parse_conviction(e.completion) for e in examples]
        pairs = [(p, g) for p, g in zip(predicted, gold, strict=True) if g is not None]
        scores["conviction_mse"] = m.mse([p for p, _ in pairs], [g for _, g in pairs])
        return scores

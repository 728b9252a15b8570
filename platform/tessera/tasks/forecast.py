"""Next-period stock move: direction (up/down) and a magnitude bin, as FinGPT-Forecaster answers it.

Record fields: `ticker` (optional), `history` (recent period returns in percent, as a list or
text), `news` (optional headlines, a list or text), `text` (optional other context; at least one
of history, news, text is required) and `label`: a bin ('up 2-3%', 'Up by 2-3%', FinGPT's 'U3',
'D5+') or the realised return in percent ('2.4', '-1.3%'), which is binned. Bins are 1% wide up
to 5%, then 'more than 5%'. Metrics: exact-bin accuracy, direction (binary) accuracy, and the
mean squared error of the signed bin midpoints in percentage points squared.
"""

from __future__ import annotations

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
    raw_label,
    require_value,
)

BINS = ("0-1%", "1-2%", "2-3%", "3-4%", "4-5%", "5+%")
DIRECTIONS = ("up", "down")
LABELS = tuple(f"{direction} {b}" for direction in DIRECTIONS for b in BINS)
INSTRUCTION = (
    "Predict the stock's price move over the next period from its recent returns and news. Answer with "
    'the direction and the size of the move, e.g. "Up by 2-3%" or "Down by more than 5%".'
)
_DIRECTION_WORDS = {
    **dict.fromkeys(("up", "rise", "rises", "increase", "increases", "gain", "gains", "higher", "bullish"), "up"),
    **dict.fromkeys(("down", "fall", "falls", "decline", "declines", "decrease", "decreases", "drop", "drops",
                     "lower", "bearish"), "down"),
}
_FINGPT_CODE = re.compile(r"(?<![A-Za-z0-9])([UD])([1-5])(\+?)(?![A-Za-z0-9])")
_RANGE = re.compile(r"(\d+(?:\.\d+)?)\s*%?\s*(?:-|\u2013|to)\s*(\d+(?:\.\d+)?)\s*%")
_MORE_THAN = re.compile(r"(?:more than|over|above|greater than|beyond)\s*5\s*%|5\s*\+\s*%|5\s*%\s*\+")
_PERCENT = re.compile(r"[-+\u2212]?\d+(?:\.\d+)?\s*%")


def bin_of(percent: float) -> str:
    """The magnitude bin of a move of `percent` (sign ignored)."""
    return BINS[min(int(abs(percent)), len(BINS) - 1)]


def label_of(percent: float) -> str:
    return f"{'down' if percent < 0 else 'up'} {bin_of(percent)}"


def midpoint(label: str) -> float:
    """The signed centre of a bin, in percent: 'up 2-3%' -> 2.5, 'down 5+%' -> -5.5."""
    direction, magnitude = label.split(" ", 1)
    value = BINS.index(magnitude) + 0.5
    return -value if direction == "down" else value


def answer(label: str) -> str:
    direction, magnitude = label.split(" ", 1)
    size = "more than 5%" if magnitude == "5+%" else magnitude
    return f"{direction.capitalize()} by {size}"


def parse_move(text: str) -> str | None:
    """A bin label from an answer ('Up by 2-3%', 'U3', 'down more than 5%', 'a 1.4% fall')."""
    code = _FINGPT_CODE.search(text)
    if code:
        direction = "up" if code.group(1) == "U" else "down"
        index = int(code.group(2)) - 1 if not code.group(3) else len(BINS) - 1
        return f"{direction} {BINS[index]}"
    lowered = text.lower()
    direction = parsing.find_word(lowered, _DIRECTION_WORDS)
    if _MORE_THAN.search(lowered):
        return f"{direction} {BINS[-1]}" if direction else None
    span = _RANGE.search(lowered)
    if span:
        return f"{direction} {bin_of(float(span.group(1)))}" if direction else None
    percent = _PERCENT.search(lowered)
    if percent:
        value = parsing.parse_number(percent.group(0))
        if value is None:
            return None
        if direction is None:
            # A signed number says the direction by itself; an unsigned one does not.
            return label_of(value) if percent.group(0)[0] in "-+\u2212" else None
        return f"{direction} {bin_of(value)}"
    return None


def _listing(value: Any, name: str) -> str | None:
    if is_missing(value):
        return None
    if isinstance(value, str) and value.strip().startswith("["):
        value = loads_json_field({name: value}, name)
    if isinstance(value, list):
        if name == "history":
            return ", ".join(f"{float(v):+.1f}%" for v in value) if value else None
        return "; ".join(str(v) for v in value) if value else None
    return str(value).strip() or None


class ForecastTask(ClassificationTask):
    name = "forecast"
    labels = LABELS
    fields = ("ticker", "history", "news", "text", "label")
    json_keys = ("prediction", "answer", "move", "label")

    def normalize_label(self, value: Any) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return label_of(float(value))
        text = raw_label(value)
        number = re.fullmatch(r"\s*[-+\u2212]?\d+(?:\.\d+)?\s*%?\s*", text)
        parsed = label_of(parsing.parse_number(text) or 0.0) if number else parse_move(text)
        if parsed is None:
            raise RowError(
                f"unknown label {text!r}; expected a move such as 'up 2-3%', 'U3', 'down 5+%', or a return in percent",
                "label",
            )
        return parsed

    def to_example(self, record: Mapping[str, Any]) -> Example:
        try:
            history = _listing(record.get("history"), "history")
        except (TypeError, ValueError):
            raise RowError("history must be a list of returns in percent, or text", "history") from None
        news = _listing(record.get("news"), "news")
        context = optional_text(record, "text")
        if not (history or news or context):
            raise RowError("missing field: a forecast row needs 'history', 'news' or 'text'", "history")
        ticker = optional_text(record, "ticker")
        lines = [f"Ticker: {ticker}" if ticker else None,
                 f"Recent returns (oldest first): {history}" if history else None,
                 f"News: {news}" if news else None, context]
        label = self.normalize_label(require_value(record, "label"))
        prompt = instruction_prompt(INSTRUCTION, "\n".join(line for line in lines if line))
        return Example(prompt=prompt, completion=answer(label), label=label)

    def parse(self, generated: str) -> str | None:
        obj = parsing.extract_json(generated)
        if obj is not None:
            value = parsing.json_value(obj, self.json_keys)
            if isinstance(value, str) and parse_move(value):
                return parse_move(value)
        return parse_move(generated)

    def metrics(self, preds: Sequence[str | None], golds: Sequence[str]) -> dict[str, Any]:
        scores = m.classification_metrics(preds, golds, self.labels)
        scores["binary_accuracy"] = m.binary_accuracy(
            [p.split(" ")[0] if p else None for p in preds], [g.split(" ")[0] for g in golds]
        )
        scores["mse"] = m.mse([midpoint(p) if p else None for p in preds], [midpoint(g) for g in golds])
        return scores

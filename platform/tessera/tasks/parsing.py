"""Reading answers out of generated text: labels, JSON objects and numbers.

Models answer in many shapes ("Positive.", "the sentiment is negative", '{"answer": "buy"} because
...', "No,"): these helpers find the answer the way a reader would, and return None when there is
none rather than guessing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

_DECODER = json.JSONDecoder()


def extract_json(text: str) -> Any | None:
    """The first JSON object in `text`, ignoring any text around it (None when there is none)."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def json_value(obj: Mapping[str, Any], keys: Iterable[str]) -> Any | None:
    """The value of the first of `keys` present in `obj`, matching key names case-insensitively."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


@lru_cache(maxsize=64)
def _word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so "strong buy" wins over "buy" where both start at the same place.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")


@lru_cache(maxsize=64)
def _choices_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Two or more label words joined only by separators: the instruction's choice list echoed back.
    word = _word_pattern(words).pattern
    return re.compile(rf"{{?\s*{word}(?:\s*(?:/|,|\||\bor\b)\s*{word})+\s*}}?")


def find_word(text: str, vocabulary: Mapping[str, str]) -> str | None:
    """The label of the first vocabulary word (whole word, any case) in `text`.

    A chatty model often repeats the choices before answering ("From {negative/neutral/positive},
    I'd say positive"); that echo names every label and is skipped, as FinGPT's scripts would.
    """
    words = tuple(vocabulary)
    answer = _choices_pattern(words).sub(" ", text.lower())
    match = _word_pattern(words).search(answer)
    return vocabulary[match.group(0)] if match else None


def find_label(text: str, vocabulary: Mapping[str, str], json_keys: Iterable[str] = ("answer", "label")) -> str | None:
    """A label from generated text: a JSON answer field if there is one, else the first label word."""
    obj = extract_json(text)
    if obj is not None:
        value = json_value(obj, json_keys)
        if isinstance(value, str):
            found = find_word(value, vocabulary)
            if found is not None:
                return found
    return find_word(text, vocabulary)


_SCALES = {
    "thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "m": 1e6, "mln": 1e6,
    "billion": 1e9, "bn": 1e9, "b": 1e9, "trillion": 1e12, "tn": 1e12,
}
_NUMBER = re.compile(
    r"(?P<open>\()?\s*(?P<sign>[-+\u2212])?\s*(?:[$\u20ac\u00a3]|usd|eur|gbp)?\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*(?P<scale>thousand|trillion|billion|million|mln|mn|bn|tn|k|m|b)(?![a-z]))?"
    r"\s*(?P<close>\))?",
    re.IGNORECASE,
)


def parse_number(text: str) -> float | None:
    """The first number in `text`: '$1,250.5 million' -> 1250500000.0, '(3.2)' -> -3.2, '-7%' -> -7.0."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group("digits").replace(",", ""))
    if match.group("scale"):
        value *= _SCALES[match.group("scale").lower()]
    negative = match.group("sign") in ("-", "\u2212") or bool(match.group("open") and match.group("close"))
    return -value if negative else value


def canonical_number(value: float) -> str:
    """One spelling per number, so gold and parsed values compare as strings: 1250000.0 -> '1250000'."""
    rounded = round(value, 6)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.6f}".rstrip("0").rstrip(".")

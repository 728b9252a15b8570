"""Evaluation metrics as pure functions of predictions and gold answers.

Conventions, chosen to match scikit-learn and Google's `rouge-score` so numbers compare with
published ones:
- a prediction of `None` means the model's answer could not be parsed: it counts as wrong, and
  it is never a class of its own (it adds a false negative to the gold class, nothing else);
- precision, recall and F1 of a class nobody predicted (or that never occurs) are 0, as
  scikit-learn's `zero_division=0`;
- weighted F1 averages the per-class F1 weighted by each class's gold support;
- ROUGE tokenises like `rouge-score` without stemming (lower case, runs of [a-z0-9]) and reports
  the F-measure averaged over examples.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

Label = Hashable


def _check_lengths(preds: Sequence[object], golds: Sequence[object]) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")


def accuracy(preds: Sequence[Label | None], golds: Sequence[Label]) -> float:
    """Fraction of predictions equal to their gold answer (0.0 for no examples)."""
    _check_lengths(preds, golds)
    if not golds:
        return 0.0
    return sum(p is not None and p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def per_class(
    preds: Sequence[Label | None], golds: Sequence[Label], labels: Sequence[Label] | None = None
) -> dict[Label, dict[str, float]]:
    """Precision, recall, F1 and gold support of every class.

    The classes are `labels` when given (in that order), else every gold or predicted label in
    first-seen order; unparsed predictions (`None`) are never a class.
    """
    _check_lengths(preds, golds)
    if labels is None:
        labels = list(dict.fromkeys([*golds, *(p for p in preds if p is not None)]))
    true_positives: Counter[Label] = Counter()
    predicted: Counter[Label] = Counter(p for p in preds if p is not None)
    support: Counter[Label] = Counter(golds)
    for p, g in zip(preds, golds, strict=True):
        if p is not None and p == g:
            true_positives[g] += 1
    report: dict[Label, dict[str, float]] = {}
    for label in labels:
        precision = true_positives[label] / predicted[label] if predicted[label] else 0.0
        recall = true_positives[label] / support[label] if support[label] else 0.0
        report[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": support[label],
        }
    return report


def weighted_f1(preds: Sequence[Label | None], golds: Sequence[Label]) -> float:
    """Per-class F1 averaged with the classes' gold support as weights (scikit-learn's 'weighted')."""
    if not golds:
        return 0.0
    report = per_class(preds, golds)
    return sum(scores["f1"] * scores["support"] for scores in report.values()) / len(golds)


def classification_metrics(
    preds: Sequence[Label | None], golds: Sequence[Label], labels: Sequence[Label] | None = None
) -> dict[str, object]:
    """Accuracy, weighted F1, the unparsed fraction and the per-class table, in one dict."""
    _check_lengths(preds, golds)
    return {
        "accuracy": accuracy(preds, golds),
        "f1_weighted": weighted_f1(preds, golds),
        "unparsed_rate": sum(p is None for p in preds) / len(preds) if preds else 0.0,
        "per_class": {str(k): v for k, v in per_class(preds, golds, labels).items()},
    }


def mse(preds: Sequence[float | None], golds: Sequence[float]) -> float | None:
    """Mean squared error over the pairs whose prediction parsed; None when none did."""
    _check_lengths(preds, golds)
    pairs = [(p, g) for p, g in zip(preds, golds, strict=True) if p is not None]
    if not pairs:
        return None
    return sum((p - g) ** 2 for p, g in pairs) / len(pairs)


def binary_accuracy(preds: Sequence[bool | None], golds: Sequence[bool]) -> float:
    """Accuracy of a yes/no outcome (e.g. 'the price goes up'); an unparsed prediction is wrong."""
    return accuracy(preds, golds)


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """`rouge-score`'s default tokenisation (no stemming)."""
    return _ROUGE_TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the dynamic-programming table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _f_measure(overlap: int, predicted: int, reference: int) -> float:
    if not predicted or not reference:
        return 0.0
    return _f1(overlap / predicted, overlap / reference)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F-measure of one prediction against one reference (clipped n-gram overlap)."""
    pred_ngrams = _ngrams(rouge_tokens(prediction), n)
    ref_ngrams = _ngrams(rouge_tokens(reference), n)
    overlap = sum((pred_ngrams & ref_ngrams).values())
    return _f_measure(overlap, sum(pred_ngrams.values()), sum(ref_ngrams.values()))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of tokens."""
    pred_tokens, ref_tokens = rouge_tokens(prediction), rouge_tokens(reference)
    return _f_measure(_lcs_length(pred_tokens, ref_tokens), len(pred_tokens), len(ref_tokens))


def rouge(preds: Sequence[str | None], refs: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures averaged over examples (None scores 0)."""
    _check_lengths(preds, refs)
    if not refs:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    pairs = [(p or "", r) for p, r in zip(preds, refs, strict=True)]
    return {
        "rouge1": sum(rouge_n(p, r, 1) for p, r in pairs) / len(pairs),
        "rouge2": sum(rouge_n(p, r, 2) for p, r in pairs) / len(pairs),
        "rougeL": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
    }

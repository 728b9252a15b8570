"""The evaluation report's arithmetic: pure functions from scores to the numbers of an `EvaluationReport`
(`tessera.api.records`) and a readable table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from tessera.api.records import EvaluationReport
from tessera.evaluate.distillation import format_distillation

# Metrics where a smaller number is the better model.
LOWER_IS_BETTER = frozenset({"mse", "eval_loss"})
_TABLE_SKIP = {"per_class"}


def is_better(metric: str, candidate: float | None, incumbent: float | None) -> bool:
    """Whether `candidate` beats `incumbent` on `metric` (a missing value never wins)."""
    if candidate is None:
        return False
    if incumbent is None:
        return True
    return candidate < incumbent if metric in LOWER_IS_BETTER else candidate > incumbent


def best_checkpoint(metric: str, scores: Mapping[str, Mapping[str, Any]]) -> str:
    """The checkpoint whose scores are best on `metric`; ties go to the later one (listed last)."""
    best: str | None = None
    for checkpoint, values in scores.items():
        if best is None or not is_better(metric, scores[best].get(metric), values.get(metric)):
            best = checkpoint
    if best is None:
        raise ValueError("no checkpoint to choose from")
    return best


def majority_baseline(train_labels: Mapping[str, int], golds: Sequence[str | None]) -> dict[str, Any] | None:
    """Accuracy of always answering the training split's most common label (None without labels)."""
    if not train_labels or not golds:
        return None
    label = max(sorted(train_labels), key=lambda name: train_labels[name])
    return {"label": label, "accuracy": sum(g == label for g in golds) / len(golds)}


def label_counts(labels: Sequence[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(label for label in labels if label).items()))


def improvement(metric: str, base: Mapping[str, Any] | None, adapter: Mapping[str, Any]) -> float | None:
    """Adapter minus base on `metric` (positive is better for every metric, losses included)."""
    if not base or base.get(metric) is None or adapter.get(metric) is None:
        return None
    delta = adapter[metric] - base[metric]
    return -delta if metric in LOWER_IS_BETTER else delta


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(report: EvaluationReport) -> str:
    """Base vs adapter, one metric a row, the headline metric first."""
    base = report.base or {}
    adapter = report.adapter
    metric = report.metric
    names = [metric] + [
        name for name in dict.fromkeys([*adapter, *base])
        if name != metric and name not in _TABLE_SKIP and isinstance(adapter.get(name, base.get(name)), (int, float))
    ]
    rows = [("metric", "base", "adapter", "adapter - base")]
    for name in names:
        a, b = adapter.get(name), base.get(name)
        delta = "-" if a is None or b is None else f"{a - b:+.4f}"
        rows.append((name, _cell(b), _cell(a), delta))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{report.task} on {report.samples} examples ({report.data})"]
    lines += ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows]
    if report.majority:
        lines.append(f"majority class '{report.majority.label}': accuracy {report.majority.accuracy:.4f}")
    if report.checkpoint:
        lines.append(f"adapter: {report.checkpoint}")
    if report.distillation:
        lines.append(format_distillation(report.distillation))
    return "\n".join(lines)

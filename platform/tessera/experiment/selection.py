"""The selection rule: among the cells that succeeded and met every budget, the best held-out score.

Cells run under several seeds (`repeats`) are one configuration: its score is the mean over its
repeats, with the spread beside it. A single score over n held-out rows carries its 95% Wilson
interval where the metric is a proportion (accuracy); the report says when the winner's interval
overlaps the runner-up's, i.e. when the data cannot tell the two apart.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from pydantic import BaseModel, Field

from tessera.api.experiment import Selection, short_value
from tessera.experiment.results import CellResult

PROPORTION_METRICS = ("accuracy", "binary_accuracy")
Z95 = 1.959964


class Candidate(BaseModel):
    """One configuration (a cell, or a cell's repeats together) under the rule."""

    key: str
    cells: list[str]
    values: dict[str, Any]
    score: float | None = None
    spread: float | None = None
    low: float | None = None
    high: float | None = None
    eligible: bool = True
    reason: str = ""
    best_cell: str | None = None
    adapter_uri: str | None = None


class Choice(BaseModel):
    """The rule's verdict: the ranking, the winner and why, and whether the winner is separated."""

    metric: str
    maximize: bool
    ranking: list[Candidate] = Field(default_factory=list)
    winner: Candidate | None = None
    reason: str = ""
    separated: bool | None = None


def wilson_interval(proportion: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion observed on n rows."""
    if n <= 0:
        return (0.0, 1.0)
    denominator = 1 + Z95**2 / n
    centre = (proportion + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(proportion * (1 - proportion) / n + Z95**2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def pareto_front_indices(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score."""
    front = []
    for i, (cost, score) in enumerate(points):
        better = (lambda a, b: a >= b) if maximize else (lambda a, b: a <= b)
        dominated = any(
            j != i and c <= cost and better(s, score) and (c < cost or s != score) for j, (c, s) in enumerate(points)
        )
        if not dominated:
            front.append(i)
    return front


def over_budget(result: CellResult, selection: Selection) -> str | None:
    """Which budget a cell breaks (or has no measure for), None when it meets them all."""
    budgets = selection.budgets
    checks = (
        ("cost", result.cost, budgets.max_cost),
        ("device hours", result.device_hours, budgets.max_device_hours),
        ("adapter bytes", result.adapter_bytes, budgets.max_adapter_bytes),
        ("seconds per example", result.seconds_per_example, budgets.max_seconds_per_example),
    )
    for name, value, limit in checks:
        if limit is None:
            continue
        if value is None:
            return f"no measured {name} to hold against the budget {limit:g}"
        if value > limit:
            return f"{name} {value:.6g} over the budget {limit:g}"
    return None


def config_key(result: CellResult) -> str:
    return ", ".join(f"{k}={short_value(result.values[k])}" for k in sorted(result.values)) or result.name


def select(results: list[CellResult], selection: Selection) -> Choice:
    metric, maximize = selection.metric, selection.maximize
    groups: dict[str, list[CellResult]] = {}
    for result in results:
        groups.setdefault(config_key(result), []).append(result)
    candidates = [_candidate(key, members, selection) for key, members in groups.items()]
    ranked = sorted(
        candidates,
        key=lambda c: (not c.eligible, c.score is None, -(c.score or 0.0) if maximize else (c.score or 0.0), c.key),
    )
    choice = Choice(metric=metric, maximize=maximize, ranking=ranked)
    eligible = [c for c in ranked if c.eligible and c.score is not None]
    if not eligible:
        choice.reason = f"no cell succeeded within the budgets with a {metric} score"
        return choice
    winner = choice.winner = eligible[0]
    budgets = {k: v for k, v in selection.budgets.model_dump(by_alias=True).items() if v is not None}
    within = f", within {', '.join(f'{k} {v:g}' for k, v in budgets.items())}" if budgets else ""
    goal = "highest" if maximize else "lowest"
    choice.reason = (f"{goal} held-out {metric} ({winner.score:.4f}) of {len(eligible)} eligible "
                     f"configuration(s){within}")
    if len(eligible) > 1:
        runner_up = eligible[1]
        if winner.low is not None and runner_up.high is not None and runner_up.low is not None:
            choice.separated = (winner.low > runner_up.high) if maximize else (winner.high or 0) < runner_up.low
            if not choice.separated:
                choice.reason += (f"; not separated from the runner-up {runner_up.key} ({runner_up.score:.4f}): "
                                  "their 95% intervals overlap")
    return choice


def _candidate(key: str, members: list[CellResult], selection: Selection) -> Candidate:
    metric = selection.metric
    scores = [m.score(metric) for m in members]
    candidate = Candidate(key=key, cells=[m.name for m in members], values=members[0].values)
    failed = [m for m in members if m.phase != "Succeeded"]
    if failed:
        candidate.eligible = False
        candidate.reason = f"{failed[0].name} {failed[0].phase.lower()}: {failed[0].reason or 'no reason given'}"
        return candidate
    if any(s is None for s in scores):
        candidate.eligible = False
        candidate.reason = f"no {metric} score"
        return candidate
    broken = [b for b in (over_budget(m, selection) for m in members) if b]
    if broken:
        candidate.eligible = False
        candidate.reason = broken[0]
    values = [float(s) for s in scores if s is not None]
    candidate.score = statistics.fmean(values)
    best = max(range(len(members)), key=lambda i: values[i] if selection.maximize else -values[i])
    candidate.best_cell, candidate.adapter_uri = members[best].name, members[best].adapter_uri
    if len(values) > 1:
        candidate.spread = statistics.stdev(values)
        half = Z95 * candidate.spread / math.sqrt(len(values))
        candidate.low, candidate.high = candidate.score - half, candidate.score + half
    elif metric in PROPORTION_METRICS and members[0].samples:
        candidate.low, candidate.high = wilson_interval(candidate.score, int(members[0].samples))
    return candidate

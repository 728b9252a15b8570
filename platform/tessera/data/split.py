"""Deterministic train/eval splits and samples, stratified by label where the task has one.

The same records and seed always give the same result, on any machine and in any process
(no dependence on hash randomisation), and results keep the records' source order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _allocate(group_sizes: Sequence[int], picks: int) -> list[int]:
    """Picks per group proportional to size, rounded by largest remainder so they sum to `picks`."""
    total = sum(group_sizes)
    quotas = [size * picks / total for size in group_sizes]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: picks - sum(counts)]:
        counts[i] += 1
    return counts


def choose(items: Sequence[T], picks: int, seed: int, key: Callable[[T], str | None] | None = None) -> set[int]:
    """Indices of `picks` items drawn at random with `seed`, in proportion to each `key` group."""
    picks = max(0, min(picks, len(items)))
    keys = [key(item) if key else None for item in items]
    groups: dict[str, list[int]] = {}
    for index, group in enumerate(keys):
        groups.setdefault("" if group is None else str(group), []).append(index)
    rng = random.Random(seed)
    ordered = sorted(groups)
    chosen: set[int] = set()
    for name, count in zip(ordered, _allocate([len(groups[n]) for n in ordered], picks), strict=True):
        members = list(groups[name])
        rng.shuffle(members)
        chosen.update(members[:count])
    return chosen


def split_train_eval(
    items: Sequence[T], eval_fraction: float, seed: int, key: Callable[[T], str | None] | None = None
) -> tuple[list[T], list[T]]:
    """(train, eval) with round(len * eval_fraction) eval items, at least one of each when len >= 2."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval fraction {eval_fraction} is not between 0 and 1")
    eval_count = round(len(items) * eval_fraction)
    if len(items) >= 2:
        eval_count = min(max(eval_count, 1), len(items) - 1)
    held_out = choose(items, eval_count, seed, key)
    train = [item for i, item in enumerate(items) if i not in held_out]
    return train, [item for i, item in enumerate(items) if i in held_out]


def sample(items: Sequence[T], size: int | None, seed: int, key: Callable[[T], str | None] | None = None) -> list[T]:
    """`size` items kept in proportion to each `key` group (all of them when size is None or larger)."""
    if size is None or size >= len(items):
        return list(items)
    kept = choose(items, size, seed, key)
    return [item for i, item in enumerate(items) if i in kept]

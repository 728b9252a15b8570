"""The report's pictures, drawn with matplotlib (Agg, no display) into PNG bytes.

Loss against tokens and against cost for every cell on one chart, the selection metric against cost
with the Pareto front marked, and the winner's per-class precision/recall/F1.
"""

from __future__ import annotations

import io
from typing import Any

from tessera.experiment.results import CellResult
from tessera.experiment.selection import Choice, pareto_front_indices


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    return buffer.getvalue()


def label(result: CellResult) -> str:
    values = ", ".join(f"{k}={_text(v)}" for k, v in result.values.items())
    return f"{values} (seed +{result.repeat})" if result.repeat else values or result.name


def _text(value: Any) -> str:
    from tessera.api.experiment import short_value

    return short_value(value)


def loss_curves(results: list[CellResult]) -> bytes | None:
    """Training loss against tokens trained and against cost, every cell on the same two axes;
    each cell's evaluation loss is a marker at its end."""
    drawn = [r for r in results if r.curve]
    if not drawn:
        return None
    plt = _pyplot()
    figure, (by_tokens, by_cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for result in drawn:
        tokens = [p.tokens for p in result.curve]
        losses = [p.loss for p in result.curve]
        line, = by_tokens.plot(tokens, losses, marker=".", label=label(result))
        total = tokens[-1] or 1
        unit_cost = (result.cost if result.cost else result.device_hours or 0.0) / total
        costs = [t * unit_cost for t in tokens]
        by_cost.plot(costs, losses, marker=".", color=line.get_color())
        if result.eval_loss is not None:
            by_tokens.plot([tokens[-1]], [result.eval_loss], marker="*", markersize=12, color=line.get_color())
            by_cost.plot([costs[-1]], [result.eval_loss], marker="*", markersize=12, color=line.get_color())
    currency = drawn[0].currency
    has_cost = any(r.cost for r in drawn)
    by_tokens.set(xlabel="tokens trained", ylabel="loss (line: training, star: held-out)", title="Loss vs tokens")
    by_cost.set(xlabel=f"cost ({currency})" if has_cost else "device hours", ylabel="loss",
                title="Loss vs cost" if has_cost else "Loss vs device hours")
    by_tokens.legend(fontsize=8)
    for axes in (by_tokens, by_cost):
        axes.grid(alpha=0.3)
    return _png(figure)


def score_vs_cost(results: list[CellResult], choice: Choice) -> bytes | None:
    """The selection metric against cost (device hours when no price is set), the Pareto front joined."""
    scored = [r for r in results if r.score(choice.metric) is not None and (r.cost or r.device_hours) is not None]
    if not scored:
        return None
    use_cost = any(r.cost for r in scored)
    points = [((r.cost if use_cost else r.device_hours) or 0.0, r.score(choice.metric) or 0.0) for r in scored]
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    winner_cells = set(choice.winner.cells) if choice.winner else set()
    for result, (x, y) in zip(scored, points, strict=True):
        is_winner = result.name in winner_cells
        axes.scatter([x], [y], s=90 if is_winner else 45, marker="*" if is_winner else "o", zorder=3)
        axes.annotate(label(result), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted((points[i] for i in pareto_front_indices(points, choice.maximize)), key=lambda p: p[0])
    axes.plot([p[0] for p in front], [p[1] for p in front], "k--", alpha=0.5, label="Pareto front")
    base = [r.base_scores.get(choice.metric) for r in scored if r.base_scores.get(choice.metric) is not None]
    if base:
        axes.axhline(min(base), color="grey", linestyle=":", label="base model, zero-shot")
    currency = scored[0].currency
    axes.set(xlabel=f"cost ({currency})" if use_cost else "device hours", ylabel=f"held-out {choice.metric}",
             title=f"{choice.metric} vs {'cost' if use_cost else 'device hours'} (star: winner)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def winner_per_class(results: list[CellResult], choice: Choice) -> bytes | None:
    """The winner's precision, recall and F1 per class on the held-out rows."""
    if not choice.winner:
        return None
    winner = next(r for r in results if r.name == choice.winner.best_cell)
    table = winner.adapter_scores.get("per_class")
    if not isinstance(table, dict) or not table:
        return None
    plt = _pyplot()
    classes = list(table)
    figure, axes = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    for offset, measure in enumerate(("precision", "recall", "f1")):
        axes.bar([i + (offset - 1) * width for i in range(len(classes))],
                 [float(table[c].get(measure, 0.0)) for c in classes], width, label=measure)
    axes.set_xticks(range(len(classes)), [f"{c}\n(n={table[c].get('support', '?')})" for c in classes])
    axes.set(ylim=(0, 1), title=f"Winner {winner.name}: per class on held-out rows")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)

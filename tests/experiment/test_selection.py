"""The selection rule: best held-out score among succeeded cells within every budget; repeats averaged;
intervals that say when the winner is not separated from the runner-up."""

from __future__ import annotations

import math

import pytest
from tessera.api.experiment import Selection
from tessera.experiment.results import CellResult
from tessera.experiment.selection import pareto_front_indices, select, wilson_interval


def cell(name: str, accuracy: float | None, *, cost: float = 1.0, rank: int = 4, repeat: int = 0,
         phase: str = "Succeeded", samples: int = 400, **extra: object) -> CellResult:
    scores = {} if accuracy is None else {"accuracy": accuracy, "eval_loss": 1 - accuracy}
    return CellResult(name=name, values={"rank": rank}, repeat=repeat, phase=phase, adapter_scores=scores,
                      cost=cost, samples=samples, adapter_uri=f"file:///store/{name}", **extra)


def test_the_best_score_wins_and_the_reason_says_the_rule() -> None:
    choice = select([cell("a", 0.70, rank=4), cell("b", 0.82, rank=8), cell("c", 0.75, rank=16)], Selection())
    assert choice.winner is not None and choice.winner.best_cell == "b"
    assert [c.best_cell for c in choice.ranking] == ["b", "c", "a"]
    assert choice.reason.startswith("highest held-out accuracy (0.8200) of 3 eligible configuration(s)")


def test_a_lower_is_better_metric_is_minimised() -> None:
    choice = select([cell("a", 0.70, rank=4), cell("b", 0.82, rank=8)], Selection(metric="eval_loss"))
    assert choice.winner.best_cell == "b" and not choice.maximize  # eval_loss 0.18 < 0.30


def test_budgets_exclude_cells_over_them_and_say_which() -> None:
    selection = Selection.model_validate({"budgets": {"maxCost": 2.0, "maxAdapterBytes": 1000}})
    choice = select([
        cell("cheap", 0.70, rank=4, adapter_bytes=500),
        cell("dear", 0.90, rank=8, cost=5.0, adapter_bytes=500),
        cell("big", 0.85, rank=16, adapter_bytes=5000),
        cell("unmeasured", 0.95, rank=32),
    ], selection)
    assert choice.winner.best_cell == "cheap"
    reasons = {c.best_cell: c.reason for c in choice.ranking if not c.eligible}
    assert reasons == {"dear": "cost 5 over the budget 2", "big": "adapter bytes 5000 over the budget 1000",
                       "unmeasured": "no measured adapter bytes to hold against the budget 1000"}
    assert "within maxCost 2, maxAdapterBytes 1000" in choice.reason


def test_failed_cells_cannot_win_and_no_winner_is_said_plainly() -> None:
    choice = select([cell("a", None, phase="Failed", reason="OOM")], Selection())
    assert choice.winner is None
    assert choice.reason == "no cell succeeded within the budgets with a accuracy score"
    assert choice.ranking[0].reason == "a failed: OOM"


def test_repeats_are_one_configuration_scored_by_their_mean() -> None:
    choice = select([
        cell("r4-s0", 0.70, rank=4), cell("r4-s1", 0.74, rank=4, repeat=1),
        cell("r8-s0", 0.80, rank=8), cell("r8-s1", 0.60, rank=8, repeat=1),
    ], Selection())
    winner = choice.winner
    assert winner.cells == ["r4-s0", "r4-s1"] and winner.best_cell == "r4-s1"
    assert winner.score == pytest.approx(0.72)
    assert winner.spread == pytest.approx(math.sqrt(((0.70 - 0.72) ** 2 + (0.74 - 0.72) ** 2) / 1))
    assert choice.separated is False and "not separated from the runner-up" in choice.reason


def test_wilson_interval_matches_the_textbook_value() -> None:
    # 81 of 100: Wilson 95% interval (0.7222, 0.8749) (Newcombe 1998's formula, computed by hand).
    low, high = wilson_interval(0.81, 100)
    assert low == pytest.approx(0.7222, abs=1e-4) and high == pytest.approx(0.8749, abs=1e-4)


def test_a_close_pair_on_few_rows_is_not_separated_but_a_wide_gap_on_many_is() -> None:
    close = select([cell("a", 0.775, samples=80, rank=4), cell("b", 0.738, samples=80, rank=8)], Selection())
    assert close.separated is False
    wide = select([cell("a", 0.90, samples=2000, rank=4), cell("b", 0.80, samples=2000, rank=8)], Selection())
    assert wide.separated is True and "not separated" not in wide.reason


def test_the_pareto_front_keeps_points_no_other_beats_on_cost_and_score() -> None:
    points = [(1.0, 0.70), (2.0, 0.80), (3.0, 0.75), (4.0, 0.90), (1.5, 0.60)]
    assert pareto_front_indices(points, maximize=True) == [0, 1, 3]

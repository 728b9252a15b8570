"""Evaluation metrics against values computed by hand (scikit-learn and rouge-score conventions)."""

from __future__ import annotations

import pytest
from tessera.tasks import metrics as m

# 8 examples, 3 classes, one unparsed prediction.
GOLDS = ["pos", "pos", "pos", "neg", "neg", "neu", "neu", "neu"]
PREDS = ["pos", "pos", "neg", "neg", None, "neu", "pos", "neu"]


def test_accuracy_counts_unparsed_as_wrong():
    assert m.accuracy(PREDS, GOLDS) == 5 / 8
    assert m.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        m.accuracy(["a", "b"], ["a"])


def test_per_class_precision_recall_f1_by_hand():
    report = m.per_class(PREDS, GOLDS)
    # pos: predicted 3 times (2 right), 3 gold -> P 2/3, R 2/3
    assert report["pos"]["precision"] == pytest.approx(2 / 3)
    assert report["pos"]["recall"] == pytest.approx(2 / 3)
    assert report["pos"]["f1"] == pytest.approx(2 / 3)
    # neg: predicted 2 times (1 right), 2 gold (one unparsed) -> P 1/2, R 1/2
    assert report["neg"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # neu: predicted 2 times (2 right), 3 gold -> P 1, R 2/3, F1 0.8
    assert report["neu"]["precision"] == 1.0
    assert report["neu"]["recall"] == pytest.approx(2 / 3)
    assert report["neu"]["f1"] == pytest.approx(0.8)
    assert None not in report


def test_weighted_f1_by_hand():
    expected = (3 * (2 / 3) + 2 * 0.5 + 3 * 0.8) / 8
    assert m.weighted_f1(PREDS, GOLDS) == pytest.approx(expected)


def test_classes_never_predicted_or_absent_score_zero():
    report = m.per_class(["a", "a"], ["a", "b"], labels=["a", "b", "c"])
    assert report["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["a"]["precision"] == 0.5 and report["a"]["recall"] == 1.0
    # Weighted by gold support: a (F1 2/3, support 1) and b (0, support 1).
    assert m.weighted_f1(["a", "a"], ["a", "b"]) == pytest.approx(1 / 3)


def test_classification_metrics_bundle():
    scores = m.classification_metrics(PREDS, GOLDS, labels=["neg", "neu", "pos"])
    assert list(scores["per_class"]) == ["neg", "neu", "pos"]
    assert scores["accuracy"] == 5 / 8
    assert scores["unparsed_rate"] == 1 / 8


def test_mse_and_binary_accuracy():
    assert m.mse([1.0, None, 3.0], [2.0, 5.0, 1.0]) == pytest.approx((1 + 4) / 2)
    assert m.mse([None], [1.0]) is None
    assert m.binary_accuracy([True, False, None, True], [True, True, False, True]) == 0.5


def test_rouge_n_by_hand():
    # "the cat sat on the mat" vs "the cat is on the mat": unigrams overlap 5 of 6 each way.
    pred, ref = "The cat sat on the mat.", "the cat is on the mat"
    assert m.rouge_n(pred, ref, 1) == pytest.approx(5 / 6)
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat is, is on, on the, the mat}
    assert m.rouge_n(pred, ref, 2) == pytest.approx(3 / 5)
    # LCS: the cat on the mat = 5
    assert m.rouge_l(pred, ref) == pytest.approx(5 / 6)


def test_rouge_clips_repeated_ngrams_and_handles_empty_text():
    # pred "the the the" vs ref "the cat": overlap clipped to 1; P 1/3, R 1/2 -> F 0.4
    assert m.rouge_n("the the the", "the cat", 1) == pytest.approx(0.4)
    assert m.rouge_n("", "the cat", 1) == 0.0
    assert m.rouge_l("a b c d", "d c b a") == pytest.approx(0.25)


def test_rouge_averages_over_examples_and_unparsed_scores_zero():
    scores = m.rouge(["buy the stock", None], ["buy the stock", "sell"])
    assert scores == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}
    assert m.rouge_tokens("EBITDA rose 12.5%!") == ["ebitda", "rose", "12", "5"]

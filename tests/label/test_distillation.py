"""The pure parts of the teacher-vs-student report and of the vote: accuracy on human labels, agreement,
cost per 1,000 predictions, which eval rows a person labelled."""

from __future__ import annotations

import pytest
from tessera.api.finetunejob import TokenPrice
from tessera.evaluate.distillation import compare, human_rows, per_thousand_by_time, per_thousand_by_tokens
from tessera.label.labeller import vote

from tests.label.test_labeller import make_job


def test_compare_scores_each_against_the_golds_and_their_agreement():
    golds = ["positive", "negative", "neutral", "neutral"]
    student = ["positive", "neutral", "neutral", None]
    teacher = ["positive", "negative", "positive", None]
    section = compare(golds, student, teacher)
    assert section == {"samples": 4, "teacherAccuracy": 0.5, "studentAccuracy": 0.5, "agreement": 0.25}


def test_costs_per_thousand_predictions():
    # 0.5 s a prediction on a 3.60/hour device: 1,000 of them take 500 s = 0.50.
    assert per_thousand_by_time(0.5, 3.6) == pytest.approx(0.5)
    assert per_thousand_by_time(None, 3.6) is None
    price = TokenPrice(input_per_million=2.0, output_per_million=10.0)
    # 100 predictions, 5,000 tokens in and 300 out: 1,000 predictions = 50,000 in + 3,000 out.
    assert per_thousand_by_tokens(5000, 300, 100, price) == pytest.approx((50_000 * 2 + 3_000 * 10) / 1e6)
    assert per_thousand_by_tokens(0, 0, 0, price) is None


def test_human_rows_are_the_eval_file_or_the_rows_the_teacher_did_not_label(tmp_path):
    rows = [{"row": 1}, {"row": 2}, {"row": 3}]
    split_job = make_job(tmp_path, "http://127.0.0.1:1/v1")
    assert human_rows(split_job, rows, teacher_rows=[2]) == [0, 2]
    held_out = make_job(tmp_path, "http://127.0.0.1:1/v1")
    held_out.spec.dataset.eval_uri = str(tmp_path / "heldout.csv")
    assert human_rows(held_out, rows, teacher_rows=[2]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("labels", "samples", "expected"),
    [
        (["positive"], 1, ("positive", 1.0)),
        (["positive", "negative", "positive"], 3, ("positive", 2 / 3)),
        ([None, "negative", None], 3, ("negative", 1 / 3)),  # unparsed answers count against confidence
        (["neutral", "positive"], 2, ("neutral", 0.5)),  # a tie: the first answer's label, every time
        ([None, None], 2, (None, 0.0)),
    ],
)
def test_vote(labels, samples, expected):
    label, confidence = vote(labels, samples)
    assert (label, confidence) == (expected[0], pytest.approx(expected[1]))


def test_serving_time_is_measured_on_the_server_with_each_prompt_asked_once():
    """The stand-in teacher (tests/label/standin.py) plays a server with the student loaded."""
    from tessera.evaluate.distillation import serving_seconds_per_prediction
    from tessera.label import TeacherRefusedError

    from tests.label.standin import StandInTeacher

    prompts = [f"$S{i} shares up" for i in range(6)]
    with StandInTeacher(None, slow_seconds=0.3) as server:
        seconds = serving_seconds_per_prediction(server.url, "slow", prompts, concurrency=3, max_tokens=4)
        with pytest.raises(TeacherRefusedError, match="does not serve model 'student'"):
            serving_seconds_per_prediction(server.url, "student", prompts, concurrency=3, max_tokens=4)
    assert dict(server.answered) == dict.fromkeys(prompts, 1)
    # Six answers that each take slow_seconds, three at a time: two rounds over six predictions.
    assert seconds >= 2 * server.slow_seconds / 6

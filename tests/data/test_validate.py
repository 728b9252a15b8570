"""Row-level validation: a report naming each bad row's line and reason, then fail or skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tessera.data import BadRowsError, load_records, prepare, validate_records
from tessera.data.validate import SHOWN_BAD_ROWS, BadRow, describe_bad_rows

# Lines: 1 header, 2 good, 3 empty text, 4 unknown label, 5-6 a good multi-line record,
# 7 missing label cell, 8 too many cells, 9 good.
TFNS_WITH_BAD_ROWS = (
    "text,label\n"
    "$AAPL beats estimates,1\n"
    "   ,0\n"
    "$TSLA recall widens,7\n"
    '"$NOK keeps guidance\nunchanged",2\n'
    "$BARC cut to sell,\n"
    "$HSBA,1,extra\n"
    "$KONE wins order,1\n"
)
LABEL_MAP = {"0": "negative", "1": "positive", "2": "neutral"}


@pytest.fixture
def bad_csv(tmp_path):
    path = tmp_path / "tfns-bad.csv"
    path.write_text(TFNS_WITH_BAD_ROWS)
    return path


def test_every_bad_row_is_reported_with_its_line_and_reason(bad_csv):
    good, bad = validate_records(load_records(str(bad_csv)), "sentiment", label_map=LABEL_MAP)
    assert [r["_line"] for r in good] == [2, 5, 9]
    assert [(b.line, b.field) for b in bad] == [(3, "text"), (4, "label"), (7, "label"), (8, None)]
    assert [b.row for b in bad] == [2, 3, 5, 6]
    assert bad[0].reason == "empty text"
    assert bad[1].reason.startswith("unknown label '7'; expected one of negative, neutral, positive")
    assert bad[2].reason == "empty label"
    assert bad[3].reason == "has 3 cells, the header has 2"
    assert str(bad[1]).startswith("line 4: unknown label '7'")


def test_too_long_rows_are_refused_when_a_tokenizer_is_given(bad_csv, tokenizer):
    records = load_records(str(bad_csv))
    good, _ = validate_records(records, "sentiment", label_map=LABEL_MAP)
    _, bad = validate_records(good, "sentiment", label_map=LABEL_MAP, tokenizer=tokenizer, max_seq_length=50)
    assert bad and all("tokens, longer than spec.training.maxSeqLength 50" in b.reason for b in bad)
    _, bad = validate_records(good, "sentiment", label_map=LABEL_MAP, tokenizer=tokenizer, max_seq_length=256)
    assert bad == []


def test_fail_policy_stops_with_the_report_and_keeps_the_full_list(make_job, bad_csv, tokenizer):
    job = make_job({"uri": str(bad_csv), "task": "sentiment", "labelMap": LABEL_MAP})
    with pytest.raises(BadRowsError) as error:
        prepare(job, tokenizer=tokenizer)
    message = str(error.value)
    assert f"dataset {bad_csv}: 4 of 7 rows are bad (spec.dataset.onBadRows=fail)" in message
    assert "line 3: empty text" in message and "line 8: has 3 cells" in message
    assert "set spec.dataset.onBadRows=skip" in message
    report = Path(message.split("The full list is in file://")[1].split("\n")[0].rstrip("."))
    saved = json.loads(report.read_text())
    assert [b["line"] for b in saved] == [3, 4, 7, 8] and saved[0]["source"] == str(bad_csv)
    assert not (report.parent / "manifest.json").exists(), "no manifest may vouch for a failed prepare"


def test_skip_policy_trains_on_the_good_rows_and_records_the_bad(make_job, bad_csv, tokenizer):
    job = make_job({"uri": str(bad_csv), "task": "sentiment", "labelMap": LABEL_MAP, "onBadRows": "skip",
                    "evalSplit": 0.34})
    prepared = prepare(job, tokenizer=tokenizer)
    assert prepared.manifest["source"]["rows"] == 7 and prepared.manifest["source"]["badRows"] == 4
    assert sorted(r["line"] for r in prepared.train + prepared.eval) == [2, 5, 9]
    assert [b["line"] for b in prepared.bad_rows] == [3, 4, 7, 8]


def test_a_dataset_with_no_usable_row_fails_even_when_skipping(make_job, tmp_path, tokenizer):
    path = tmp_path / "wrong-columns.csv"
    path.write_text("tweet,label\nhello,1\nbye,0\n")
    job = make_job({"uri": str(path), "task": "sentiment", "labelMap": LABEL_MAP, "onBadRows": "skip"})
    with pytest.raises(BadRowsError, match=r"2 of 2 rows are bad.*missing field 'text' \(2\)"
                                           r"(.|\n)*No row is usable: check spec.dataset.columns"):
        prepare(job, tokenizer=tokenizer)


def test_long_reports_show_the_first_rows_and_count_the_rest():
    bad = [BadRow(row=i, line=i + 1, reason=f"unknown label '{i % 2}'; expected ...", field="label")
           for i in range(1, 31)]
    message = describe_bad_rows("d.csv", bad, 100, "fail")
    assert message.count("\n  line ") == SHOWN_BAD_ROWS
    assert "...and 10 more" in message
    assert "reasons: unknown label 'N' (30)" in message


def test_a_column_mapping_onto_no_field_of_the_task_is_a_spec_error(make_job, bad_csv, tokenizer):
    from tessera.errors import InvalidSpecError

    job = make_job({"uri": str(bad_csv), "task": "sentiment", "columns": {"txt": "text"}})
    with pytest.raises(InvalidSpecError, match=r"spec.dataset.columns.txt: the sentiment task has no field 'txt'; "
                                                r"its fields are text, label"):
        prepare(job, tokenizer=tokenizer)

"""Loading datasets: CSV, JSONL and Parquet, local or from S3, with row and line numbers."""

from __future__ import annotations

import json

import pytest
from tessera.data import detect_format, load_records, read_dataset
from tessera.errors import DatasetError

CSV_TEXT = (
    "sentence,label\n"
    "Profit rose.,positive\n"
    '"A quoted, multi-line\nsentence",neutral\n'
    "\n"
    "only one cell\n"
    "Sales fell.,negative\n"
)


def test_csv_records_carry_row_and_first_line_numbers(tmp_path):
    path = tmp_path / "fpb.csv"
    path.write_text(CSV_TEXT)
    records = load_records(str(path), columns={"text": "sentence"})
    assert [(r["_row"], r["_line"]) for r in records] == [(1, 2), (2, 3), (3, 6), (4, 7)]
    assert records[0] == {"_row": 1, "_line": 2, "text": "Profit rose.", "label": "positive"}
    assert records[1]["text"] == "A quoted, multi-line\nsentence"
    assert records[2]["_error"] == "has 1 cells, the header has 2"
    assert "sentence" not in records[0]


def test_csv_with_byte_order_mark_and_explicit_format(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes("\ufefftext,label\nx,0\n".encode())
    with pytest.raises(DatasetError, match=r"cannot tell the format.*'\.txt'.*spec\.dataset\.format"):
        load_records(str(path))
    assert load_records(str(path), format="csv") == [{"_row": 1, "_line": 2, "text": "x", "label": "0"}]


def test_jsonl_keeps_types_and_reports_unreadable_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}) + "\n\n"
        "{not json\n"
        "[1, 2]\n"
        + json.dumps({"messages": []}) + "\n"
    )
    records = load_records(f"file://{path}")
    assert [(r["_row"], r["_line"]) for r in records] == [(1, 1), (2, 3), (3, 4), (4, 5)]
    assert records[0]["messages"] == [{"role": "user", "content": "hi"}] and records[0]["n"] == 2
    assert records[1]["_error"].startswith("is not valid JSON")
    assert records[2]["_error"] == "is a JSON list, not an object"


def test_parquet_rows_are_numbered_and_have_no_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tfns.parquet"
    pq.write_table(pa.table({"tweet": ["up", "down"], "label": [1, 0], "tags": [["a"], []]}), path)
    data = read_dataset(str(path), columns={"text": "tweet"})
    assert data.format == "parquet" and data.columns == ("tweet", "label", "tags")
    assert data.records == [
        {"_row": 1, "_line": None, "text": "up", "label": 1, "tags": ["a"]},
        {"_row": 2, "_line": None, "text": "down", "label": 0, "tags": []},
    ]


def test_sha256_is_of_the_source_bytes(tmp_path):
    import hashlib

    path = tmp_path / "a.csv"
    path.write_text(CSV_TEXT)
    assert read_dataset(str(path)).sha256 == hashlib.sha256(CSV_TEXT.encode()).hexdigest()


def test_a_mapped_column_the_file_lacks_suggests_a_near_miss_and_quotes_nothing_else(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(CSV_TEXT)
    with pytest.raises(DatasetError, match=r"no column 'sentense' \(spec.dataset.columns.text\); "
                                           r"did you mean 'sentence'\?"):
        load_records(str(path), columns={"text": "sentense"})
    # A file that is not a dataset (here a credentials file read as CSV): its "header" is not echoed.
    canary = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    path.write_text(f"[default],aws_secret_access_key = {canary},region\n1,2,3\n")
    with pytest.raises(DatasetError) as caught:
        load_records(str(path), columns={"text": "text"})
    assert canary not in str(caught.value) and "none of its 3 columns is close" in str(caught.value)


@pytest.mark.parametrize(("content", "words"), [
    (b"text,label,text\na,b,c\n", "the header names column 'text' twice (columns 1 and 3)"),
    (b"text, label ,label\na,b,c\n", "names column 'label' twice (columns 2 and 3)"),
    (b"text,label\nok,positive\nok,neutral\ncaf\xe9,negative\n", "line 4 is not UTF-8 text"),
    (b"text,label\n\"multi\nline\",positive\n\xff\xfe,x\n", "line 4 is not UTF-8 text"),
    (b"text,label\nok,positive\nnul\x00here,neutral\n", "line 3 holds a NUL character"),
])
def test_csv_that_would_train_wrong_is_refused_by_line(tmp_path, content, words):
    """Duplicate columns would silently pick one of them; a mixed-encoding file is named by line."""
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_records(str(path), columns={"text": "text"})


def test_a_field_over_the_csv_limit_is_refused_by_line_before_it_costs_memory(tmp_path, monkeypatch):
    """The class of the 50 MB cell: a field over MAX_CSV_FIELD is refused naming its record's line (the
    limit is lowered here so that the probe stays small; the rule is the same)."""
    from tessera.data import load

    monkeypatch.setattr(load, "MAX_CSV_FIELD", 1 << 20)
    path = tmp_path / "big.csv"
    path.write_text("text,label\nsmall,positive\n\"" + "x" * (1 << 20) + 'y",negative\nafter,neutral\n')
    with pytest.raises(DatasetError, match="record starting at line 3 cannot be read: a field is larger than 1 MiB"):
        load_records(str(path))
    path.write_text("text,label\nsmall,positive\n" + "x" * (1 << 19) + ",negative\n")
    assert len(load_records(str(path))) == 2


def test_missing_dataset_fails_fast_naming_the_uri(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DatasetError, match=f"dataset {missing} does not exist"):
        load_records(str(missing))
    with pytest.raises(DatasetError, match="is a directory"):
        load_records(str(tmp_path), format="csv")
    assert detect_format("s3://b/d/x.JSONL") == "jsonl"


def test_loads_from_s3_and_a_missing_object_is_a_clear_error(s3_env, s3_bucket, tmp_path):
    """S3 is moto's server on 127.0.0.1 (standing in for MinIO), reached through the store's minio client."""
    from tessera.store import push

    local = tmp_path / "fpb.csv"
    local.write_text(CSV_TEXT)
    uri = push(local, f"s3://{s3_bucket}/datasets/fpb.csv")
    records = load_records(uri, columns={"text": "sentence"})
    assert [r["text"] for r in records[:2]] == ["Profit rose.", "A quoted, multi-line\nsentence"]
    with pytest.raises(DatasetError, match=f"dataset s3://{s3_bucket}/datasets/missing.csv does not exist"):
        load_records(f"s3://{s3_bucket}/datasets/missing.csv")

"""Reading a dataset (CSV, JSONL or Parquet, from any store URI) into records keyed by task field.

Every record remembers where it came from, so a bad one can be named in the file:
- `_row`: its 1-based number among the data records (a CSV header is not a record);
- `_line`: the 1-based physical line where it starts, as an editor shows it (a CSV header is line
  1, so the first CSV record is line 2; a quoted multi-line CSV record is reported at its first
  line); None for Parquet, which has no lines.
A record that cannot be read at all (a CSV row with the wrong number of cells, a JSONL line that
is not a JSON object) is kept with an `_error` so that validation reports it with the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import DatasetError, ObjectNotFoundError

FORMATS = ("csv", "jsonl", "parquet")
ROW_KEY, LINE_KEY, ERROR_KEY = "_row", "_line", "_error"
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# Documents for domain adaptation can be long: lift the csv module's 128 KiB default cell limit.
_MAX_CSV_CELL = 1 << 30


@dataclass(frozen=True)
class SourceData:
    """A dataset read into memory: its records and the digest of the bytes they came from."""

    uri: str
    format: str
    sha256: str
    columns: tuple[str, ...]
    records: list[dict[str, Any]]


def detect_format(uri: str, format: str | None = None) -> str:
    """`format` if given, else the one the file extension names."""
    if format is not None:
        if format not in FORMATS:
            raise DatasetError(f"dataset {uri}: unknown format {format!r}; one of {', '.join(FORMATS)}")
        return format
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DatasetError(
            f"dataset {uri}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"name a .csv, .jsonl or .parquet file, or set spec.dataset.format to one of {', '.join(FORMATS)}"
        )
    return _EXTENSIONS[suffix]


def _read_bytes(uri: str) -> bytes:
    """The dataset file's bytes, wherever the URI points (s3://, file://, a path)."""
    from tessera.store import fetch

    with tempfile.TemporaryDirectory(prefix="tessera-dataset-") as workdir:
        try:
            path = fetch(uri, workdir)
        except ObjectNotFoundError:
            raise DatasetError(f"dataset {uri} does not exist") from None
        if not path.is_file():
            raise DatasetError(f"dataset {uri} is a directory, not a file")
        return path.read_bytes()


def _csv_rows(data: bytes) -> tuple[list[str], Iterator[tuple[int, int, list[str]]]]:
    csv.field_size_limit(_MAX_CSV_CELL)
    text = data.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], iter(())

    def rows() -> Iterator[tuple[int, int, list[str]]]:
        consumed = reader.line_num
        number = 0
        for cells in reader:
            start, consumed = consumed + 1, reader.line_num
            if not cells:
                continue
            number += 1
            yield number, start, cells

    return [h.strip() for h in header], rows()


def _read_csv(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        header, rows = _csv_rows(data)
        records = []
        for number, line, cells in rows:
            record: dict[str, Any] = {ROW_KEY: number, LINE_KEY: line}
            if len(cells) != len(header):
                record[ERROR_KEY] = f"has {len(cells)} cells, the header has {len(header)}"
            else:
                record.update(zip(header, cells, strict=True))
            records.append(record)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"dataset {uri} is not a readable UTF-8 CSV file: {error}") from None
    return header, records


def _read_jsonl(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        # JSON Lines ends records at "\n" only: str.splitlines would also split inside strings on
        # Unicode line separators, which tweets do contain.
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        raise DatasetError(f"dataset {uri} is not UTF-8 text: {error}") from None
    records, columns = [], {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record: dict[str, Any] = {ROW_KEY: len(records) + 1, LINE_KEY: line_number}
        try:
            value = json.loads(line)
        except ValueError as error:
            record[ERROR_KEY] = f"is not valid JSON ({error.msg})"
        else:
            if isinstance(value, dict):
                record.update(value)
                columns.update(dict.fromkeys(value))
            else:
                record[ERROR_KEY] = f"is a JSON {type(value).__name__}, not an object"
        records.append(record)
    return list(columns), records


def _read_parquet(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"dataset {uri} is not a readable Parquet file: {error}") from None
    records = [{ROW_KEY: i, LINE_KEY: None, **row} for i, row in enumerate(table.to_pylist(), start=1)]
    return table.column_names, records


_READERS = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}


def map_columns(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The record keyed by task field: mapped source columns renamed, the other columns kept."""
    renamed = {field: record[source] for field, source in columns.items() if source in record}
    sources = set(columns.values())
    kept = {k: v for k, v in record.items() if k not in sources and k not in columns}
    return {**kept, **renamed}


def read_dataset(uri: str, format: str | None = None, columns: Mapping[str, str] | None = None) -> SourceData:
    """Read a whole dataset; a missing file, an unreadable one or a mapped column it lacks is a `DatasetError`."""
    fmt = detect_format(uri, format)
    data = _read_bytes(uri)
    header, records = _READERS[fmt](uri, data)
    columns = dict(columns or {})
    if fmt != "jsonl":
        # JSONL rows need not share keys, so a column missing there is reported row by row instead.
        absent = {field: source for field, source in columns.items() if source not in header}
        if absent:
            field, source = next(iter(absent.items()))
            raise DatasetError(
                f"dataset {uri} has no column {source!r} (spec.dataset.columns.{field}); "
                f"its columns are: {', '.join(header) or '(none)'}"
            )
    return SourceData(
        uri=uri,
        format=fmt,
        sha256=hashlib.sha256(data).hexdigest(),
        columns=tuple(header),
        records=[map_columns(r, columns) for r in records],
    )


def load_records(
    uri: str, format: str | None = None, columns: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The dataset's records keyed by task field, each with `_row` and `_line` (see the module doc)."""
    return read_dataset(uri, format, columns).records

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
import difflib
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import DatasetError, ObjectNotFoundError
from tessera.scratch import scratch_dir

FORMATS = ("csv", "jsonl", "parquet")
ROW_KEY, LINE_KEY, ERROR_KEY = "_row", "_line", "_error"
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# Documents for domain adaptation can be long, so the csv module's 128 KiB default is lifted, but
# not without bound: 8 MiB is millions of tokens, beyond any context, and a 50 MB cell must not cost
# gigabytes downstream.
MAX_CSV_FIELD = 8 << 20


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

    with scratch_dir("dataset") as workdir:
        try:
            path = fetch(uri, workdir)
        except ObjectNotFoundError:
            raise DatasetError(f"dataset {uri} does not exist") from None
        if not path.is_file():
            raise DatasetError(f"dataset {uri} is a directory, not a file")
        return path.read_bytes()


def decode_text(uri: str, data: bytes) -> str:
    """UTF-8 text (a BOM is dropped); a file that is not is refused naming the line, never its content."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DatasetError(
            f"dataset {uri}: line {line} is not UTF-8 text (byte {column} of the line); "
            "save the whole file as UTF-8"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise DatasetError(f"dataset {uri}: line {text.count(chr(10), 0, nul) + 1} holds a NUL character: "
                           "not a text file")
    return text


def _column_name(name: str) -> str:
    """A header cell as an error may show it: bounded, so a header that is not one is not quoted whole."""
    return repr(name if len(name) <= 40 else name[:40] + "...")


def _csv_rows(uri: str, data: bytes) -> tuple[list[str], Iterator[tuple[int, int, list[str]]]]:
    csv.field_size_limit(MAX_CSV_FIELD)
    reader = csv.reader(io.StringIO(decode_text(uri, data), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return [], iter(())
    seen: dict[str, int] = {}
    for index, name in enumerate(header, start=1):
        if name in seen:
            raise DatasetError(
                f"dataset {uri}: the header names column {_column_name(name)} twice (columns {seen[name]} and "
                f"{index}); give every column its own name"
            )
        seen[name] = index

    def rows() -> Iterator[tuple[int, int, list[str]]]:
        consumed = reader.line_num
        number = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                reason = (f"a field is larger than {MAX_CSV_FIELD >> 20} MiB" if "field limit" in str(error)
                          else "it is not valid CSV")
                raise DatasetError(f"dataset {uri}: the record starting at line {consumed + 1} cannot be read: "
                                   f"{reason}") from None
            start, consumed = consumed + 1, reader.line_num
            if not cells:
                continue
            number += 1
            yield number, start, cells

    return header, rows()


def _read_csv(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    header, rows = _csv_rows(uri, data)
    records = []
    for number, line, cells in rows:
        record: dict[str, Any] = {ROW_KEY: number, LINE_KEY: line}
        if len(cells) != len(header):
            record[ERROR_KEY] = f"has {len(cells)} cells, the header has {len(header)}"
        else:
            record.update(zip(header, cells, strict=True))
        records.append(record)
    return header, records


def _read_jsonl(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    # JSON Lines ends records at "\n" only: str.splitlines would also split inside strings on
    # Unicode line separators, which tweets do contain.
    lines = decode_text(uri, data).split("\n")
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
            # Only a near-miss of what the user typed is shown: the header of a file that is not
            # a dataset (a credentials file, /etc/passwd) must not be printed back.
            close = difflib.get_close_matches(source, header, n=1, cutoff=0.75)
            hint = f"did you mean {_column_name(close[0])}?" if close else f"none of its {len(header)} columns is close"
            raise DatasetError(f"dataset {uri} has no column {source!r} (spec.dataset.columns.{field}); {hint}")
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

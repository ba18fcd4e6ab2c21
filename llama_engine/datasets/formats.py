"""Rows from a dataset's bytes: JSONL, a JSON array, CSV or Parquet (CSV and Parquet through
pyarrow). The format comes from the file name, else the MIME type, else the bytes."""
from __future__ import annotations

import io
import json
from pathlib import PurePosixPath
from typing import Any, Iterable

from llama_engine.datasets.columns import DatasetValidationError
from llama_engine.datasets.source import Content

FORMATS = ("jsonl", "json", "csv", "parquet")
PARQUET_MAGIC = b"PAR1"
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                  ".parquet": "parquet", ".pq": "parquet"}
MIME_FORMATS = {"application/jsonl": "jsonl", "application/x-ndjson": "jsonl",
                "application/jsonlines": "jsonl", "application/x-jsonlines": "jsonl",
                "application/json": "json", "text/csv": "csv",
                "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet"}
# Types whose CSV cells hold JSON text (a CSV cell is always a string or a number).
JSON_ENCODED_IN_CSV = ("dialog", "json")


def detect_format(content: Content) -> str:
    """One of FORMATS: by suffix, then by MIME type, then by the first bytes."""
    suffix = PurePosixPath(content.name).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if content.mime_type in MIME_FORMATS:
        return MIME_FORMATS[content.mime_type]
    if content.data.startswith(PARQUET_MAGIC):
        return "parquet"
    head = content.data.lstrip()[:1]
    if head == b"[":
        return "json"
    if head == b"{":
        return "jsonl"
    return "csv"


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetValidationError(f"content is not UTF-8 text (byte {e.start})") from None


def _require_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DatasetValidationError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _jsonl_rows(data: bytes) -> list[dict]:
    rows = []
    for line_no, line in enumerate(_decode_text(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetValidationError(f"line {line_no}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DatasetValidationError(f"line {line_no}: JSON nested too deeply") from None
        rows.append(_require_object(value, f"line {line_no}"))
    return rows


def _json_rows(data: bytes) -> list[dict]:
    text = _decode_text(data)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _jsonl_rows(data)  # a .json file that is really one object a line
    except RecursionError:
        raise DatasetValidationError("content: JSON nested too deeply") from None
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise DatasetValidationError(f"content: expected a JSON array of objects, got {type(value).__name__}")
    return [_require_object(v, f"row {i}") for i, v in enumerate(value)]


def _csv_rows(data: bytes, json_columns: Iterable[str]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    try:
        rows = pacsv.read_csv(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise DatasetValidationError(f"content: invalid CSV ({e})") from None
    for row in rows:
        for name in json_columns:
            if isinstance(row.get(name), str):
                try:
                    row[name] = json.loads(row[name])
                except (json.JSONDecodeError, RecursionError):
                    pass  # left a string: the column check names the row
    return rows


def _parquet_rows(data: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DatasetValidationError(f"content: invalid Parquet ({e})") from None


def parse_rows(content: Content, columns: dict[str, str] | None = None) -> list[dict]:
    """The rows of ``content`` as dicts (column name -> value). ``columns`` (name -> column
    type) says which CSV cells hold JSON text to decode. Raises DatasetValidationError naming
    the line or row that does not parse."""
    fmt = detect_format(content)
    if fmt == "parquet":
        return _parquet_rows(content.data)
    if fmt == "csv":
        json_columns = [n for n, t in (columns or {}).items() if t in JSON_ENCODED_IN_CSV]
        return _csv_rows(content.data, json_columns)
    if fmt == "json":
        return _json_rows(content.data)
    return _jsonl_rows(content.data)

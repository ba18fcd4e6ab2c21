"""The dataset registry: each dataset's declaration (columns, content_url, metadata) in SQLite
under the state directory, and a copy of its content fetched once at creation."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_engine.datasets.columns import check_columns
from llama_engine.datasets.formats import detect_format, parse_rows
from llama_engine.datasets.source import (DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, Content,
                                          fetch_content)
from llama_engine.errors import NotFoundError
from llama_engine.state import open_database

DATABASE_FILE = "datasets.sqlite3"
CONTENT_DIR = "datasets"
SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    uuid TEXT PRIMARY KEY,
    columns TEXT NOT NULL,        -- JSON {name: type}
    content_url TEXT NOT NULL,    -- as the client gave it
    metadata TEXT NOT NULL,       -- JSON object
    content_path TEXT NOT NULL,   -- the fetched copy, relative to the state directory
    format TEXT NOT NULL,
    num_rows INTEGER NOT NULL,
    created_at REAL NOT NULL
)"""


class DatasetExistsError(ValueError):
    """A dataset with this uuid is already registered."""


class DatasetNotFoundError(NotFoundError):
    """No dataset with this uuid."""

    default_message = "dataset not found"


@dataclass(frozen=True)
class DatasetRecord:
    uuid: str
    columns: dict[str, str]
    content_url: str
    metadata: dict[str, Any]
    content_path: Path
    format: str
    num_rows: int
    created_at: float

    def rows(self) -> list[dict]:
        """The dataset's rows, read from its fetched copy."""
        content = Content(self.content_path.read_bytes(), f"content.{self.format}", "")
        return parse_rows(content, self.columns)


def load_checked_rows(columns: dict[str, str], content_url: str,
                      max_bytes: int = DEFAULT_MAX_BYTES,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Content, list[dict]]:
    """Fetch ``content_url``, parse it and check ``columns``. Raises DatasetSourceError or
    DatasetValidationError (naming column and row)."""
    content = fetch_content(content_url, max_bytes, timeout_s)
    rows = parse_rows(content, columns)
    check_columns(rows, columns)
    return content, rows


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DatasetRegistry:
    """Datasets by uuid, persisted under ``state_dir``; safe to share between threads."""

    def __init__(self, state_dir: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.state_dir = Path(state_dir)
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        (self.state_dir / CONTENT_DIR).mkdir(parents=True, exist_ok=True)
        self._db = open_database(self.state_dir / DATABASE_FILE)
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def create(self, uuid: str, columns: dict[str, str], content_url: str,
               metadata: dict[str, Any]) -> DatasetRecord:
        """Fetch, parse and check the content, keep a copy, register it. Raises
        DatasetExistsError, DatasetSourceError or DatasetValidationError; nothing is kept
        on failure."""
        if self._find(uuid) is not None:
            raise DatasetExistsError(f"dataset {uuid!r} already exists")
        content, rows = load_checked_rows(columns, content_url, self.max_bytes, self.timeout_s)
        return self._register(uuid, columns, content, len(rows), content_url, metadata)

    def create_from_rows(self, uuid: str, columns: dict[str, str], rows: list[dict],
                         metadata: dict[str, Any]) -> DatasetRecord:
        """Register rows made on this server (synthetic data) as a JSONL dataset; its
        content_url is the file:// URL of the kept copy. Raises DatasetExistsError, or
        DatasetValidationError when a row does not fit ``columns``."""
        if self._find(uuid) is not None:
            raise DatasetExistsError(f"dataset {uuid!r} already exists")
        check_columns(rows, columns)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        return self._register(uuid, columns, Content(data, "rows.jsonl", ""), len(rows), None,
                              metadata)

    def _register(self, uuid: str, columns: dict[str, str], content: Content, num_rows: int,
                  content_url: str | None, metadata: dict[str, Any]) -> DatasetRecord:
        """Keep a durable copy of ``content`` and insert the record (content_url None: the
        copy's own file:// URL)."""
        fmt = detect_format(content)
        stem = hashlib.sha256(uuid.encode()).hexdigest()[:16] + "-" + secrets.token_hex(4)
        relative = Path(CONTENT_DIR) / f"{stem}.{fmt}"
        _write_durably(self.state_dir / relative, content.data)
        content_url = content_url or (self.state_dir / relative).resolve().as_uri()
        record = DatasetRecord(uuid, dict(columns), content_url, dict(metadata),
                               self.state_dir / relative, fmt, num_rows, time.time())
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (uuid, json.dumps(record.columns), content_url, json.dumps(record.metadata),
                     str(relative), fmt, record.num_rows, record.created_at))
        except sqlite3.IntegrityError:  # created concurrently under the same uuid
            (self.state_dir / relative).unlink(missing_ok=True)
            raise DatasetExistsError(f"dataset {uuid!r} already exists") from None
        return record

    def _find(self, uuid: str) -> DatasetRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT uuid, columns, content_url, metadata, content_path, format, num_rows, "
                "created_at FROM datasets WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return None
        return DatasetRecord(row[0], json.loads(row[1]), row[2], json.loads(row[3]),
                             self.state_dir / row[4], row[5], row[6], row[7])

    def get(self, uuid: str) -> DatasetRecord:
        """Raises DatasetNotFoundError."""
        record = self._find(uuid)
        if record is None:
            raise DatasetNotFoundError(f"dataset {uuid!r} not found")
        return record

    def delete(self, uuid: str) -> None:
        """Forget the dataset and its copy. Raises DatasetNotFoundError."""
        record = self.get(uuid)
        with self._lock:
            self._db.execute("DELETE FROM datasets WHERE uuid = ?", (uuid,))
        record.content_path.unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()

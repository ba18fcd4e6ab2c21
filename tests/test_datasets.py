"""Datasets: every content_url scheme and file format gives the rows written, bad columns name
column and row, the registry survives a reopen, and the HTTP routes behave as the spec says."""
from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_engine.datasets import (DatasetExistsError, DatasetNotFoundError, DatasetRegistry,
                                   DatasetSourceError, DatasetValidationError, check_columns,
                                   fetch_content, parse_rows)
from llama_engine.datasets.columns import PREFERENCE, SFT, check_trainer_columns

ROWS = [
    {"dialog": [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}], "text": "two plus two", "score": 1.5},
    {"dialog": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello, ünïcode!"}], "text": "hi", "score": 2},
]
COLUMNS = {"dialog": "dialog", "text": "text", "score": "number"}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows: list[dict]) -> bytes:
    header = "dialog,text,score\n"
    lines = []
    for r in rows:
        dialog = json.dumps(r["dialog"]).replace('"', '""')
        lines.append(f'"{dialog}",{r["text"]},{r["score"]}\n')
    return (header + "".join(lines)).encode()


def _parquet(rows: list[dict], path: Path) -> bytes:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_format_from_a_file_gives_the_rows(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        _parquet(ROWS, path)
    else:
        path.write_bytes({"jsonl": _jsonl(ROWS), "json": json.dumps(ROWS).encode(),
                          "csv": _csv(ROWS)}[suffix])
    rows = parse_rows(fetch_content(path.as_uri()), COLUMNS)
    check_columns(rows, COLUMNS)
    assert [r["dialog"] for r in rows] == [r["dialog"] for r in ROWS]
    assert [r["text"] for r in rows] == ["two plus two", "hi"]
    assert [r["score"] for r in rows] == [1.5, 2]


def test_data_urls_base64_and_percent_encoded() -> None:
    raw = _jsonl(ROWS)
    b64 = "data:application/jsonl;base64," + base64.b64encode(raw).decode()
    pct = "data:application/jsonl," + urllib.parse.quote(raw.decode())
    assert parse_rows(fetch_content(b64)) == ROWS
    assert parse_rows(fetch_content(pct)) == ROWS
    # no MIME type: the bytes say JSON array
    assert parse_rows(fetch_content("data:," + urllib.parse.quote(json.dumps(ROWS)))) == ROWS
    with pytest.raises(DatasetSourceError, match="base64"):
        fetch_content("data:;base64,@@@")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    delay_s = 0.0

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path.startswith("/slow"):
            time.sleep(self.delay_s)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_base() -> Iterator[str]:
    _Handler.payload, _Handler.delay_s = _jsonl(ROWS), 2.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_fetch_with_size_limit_timeout_and_errors(http_base: str) -> None:
    assert parse_rows(fetch_content(f"{http_base}/data")) == ROWS
    with pytest.raises(DatasetSourceError, match="larger than the limit"):
        fetch_content(f"{http_base}/data", max_bytes=10)
    with pytest.raises(DatasetSourceError, match="HTTP 404"):
        fetch_content(f"{http_base}/missing")
    with pytest.raises(DatasetSourceError, match="cannot fetch"):
        fetch_content(f"{http_base}/slow", timeout_s=0.2)
    for malformed in ("http://[::1", "http://exa mple.com/x", "http://h\u00c0]:!$"):
        with pytest.raises(DatasetSourceError, match="invalid URL"):
            fetch_content(malformed)


@pytest.mark.parametrize("rows, columns, column, row", [
    ([{"text": "a"}, {"txt": "b"}], {"text": "text"}, "text", 1),
    ([{"text": "a"}, {"text": 3}], {"text": "text"}, "text", 1),
    ([{"dialog": [{"role": "user", "content": "x"}]}, {"dialog": "hello"}], {"dialog": "dialog"}, "dialog", 1),
    ([{"dialog": [{"role": "robot", "content": "x"}]}], {"dialog": "dialog"}, "dialog", 0),
    ([{"n": 1}, {"n": 2}, {"n": True}], {"n": "number"}, "n", 2),
    ([{"m": "file:///x.png"}, {"m": "x.png"}], {"m": "media"}, "m", 1),
])
def test_a_bad_value_names_column_and_row(rows, columns, column, row) -> None:
    with pytest.raises(DatasetValidationError) as info:
        check_columns(rows, columns)
    assert (info.value.column, info.value.row) == (column, row)
    assert f"column {column!r}, row {row}" in str(info.value)


def test_trainer_columns() -> None:
    assert check_trainer_columns({"dialog": "dialog", "x": "json"}, SFT) == {"dialog": "dialog"}
    assert check_trainer_columns({"text": "text"}, SFT) == {"text": "text"}
    with pytest.raises(DatasetValidationError, match="missing column 'dialog'"):
        check_trainer_columns({"prompt": "text"}, SFT)
    with pytest.raises(DatasetValidationError, match="'chosen' must be text"):
        check_trainer_columns({"prompt": "dialog", "chosen": "dialog", "rejected": "text"}, PREFERENCE)
    with pytest.raises(DatasetValidationError) as info:
        check_trainer_columns({"prompt": "text", "chosen": "text"}, PREFERENCE)
    assert info.value.column == "rejected"


def test_registry_persists_and_refuses_duplicates(tmp_path: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_bytes(_jsonl(ROWS))
    registry = DatasetRegistry(tmp_path / "state")
    registry.create("sft", COLUMNS, source.as_uri(), {"owner": "me"})
    with pytest.raises(DatasetExistsError):
        registry.create("sft", COLUMNS, source.as_uri(), {})
    with pytest.raises(DatasetValidationError):  # nothing is kept on failure
        registry.create("bad", {"dialog": "text"}, source.as_uri(), {})
    registry.close()
    source.unlink()  # the registry kept its own copy

    reopened = DatasetRegistry(tmp_path / "state")
    record = reopened.get("sft")
    assert (record.columns, record.metadata, record.num_rows) == (COLUMNS, {"owner": "me"}, 2)
    assert record.rows() == ROWS
    with pytest.raises(DatasetNotFoundError):
        reopened.get("bad")
    reopened.delete("sft")
    assert not record.content_path.exists()
    with pytest.raises(DatasetNotFoundError):
        reopened.delete("sft")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.conftest import make_tiny_llama
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def test_http_routes_and_restart(tmp_path: Path, tiny_model: str) -> None:
    import requests
    from tests.server_process import running_server

    source = tmp_path / "d.csv"
    source.write_bytes(_csv(ROWS))
    body = {"uuid": "sft", "dataset": {"columns": COLUMNS, "content_url": source.as_uri(),
                                       "metadata": {"split": "train"}}}
    state = str(tmp_path / "state")
    with running_server("--model", tiny_model, "--state-dir", state) as server:
        url = server.base_url
        created = requests.post(f"{url}/datasets/create", json=body, timeout=60)
        assert created.status_code == 200, created.text
        assert requests.post(f"{url}/datasets/create", json=body, timeout=60).status_code == 409
        bad = {"uuid": "bad", "dataset": {**body["dataset"], "columns": {"text": "number"}}}
        refused = requests.post(f"{url}/datasets/create", json=bad, timeout=60)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "dataset.columns.text"
        assert "row 0" in refused.json()["error"]["message"]
        missing = {"uuid": "m", "dataset": {**body["dataset"], "content_url": "file:///nope.jsonl"}}
        refused = requests.post(f"{url}/datasets/create", json=missing, timeout=60)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "dataset.content_url")
        spec = requests.get(f"{url}/openapi.json", timeout=60).json()
        assert "delete" in spec["paths"]["/datasets/delete"]
    with running_server("--model", tiny_model, "--state-dir", state) as server:
        url = server.base_url
        got = requests.get(f"{url}/datasets/get", params={"dataset_id": "sft"}, timeout=60)
        assert got.status_code == 200, got.text
        assert got.json() == body["dataset"]
        assert requests.delete(f"{url}/datasets/delete", params={"dataset_id": "sft"},
                               timeout=60).status_code == 200
        gone = requests.get(f"{url}/datasets/get", params={"dataset_id": "sft"}, timeout=60)
        assert (gone.status_code, gone.json()["error"]["param"]) == (404, "dataset_id")
        no_query = requests.get(f"{url}/datasets/get", timeout=60)
        assert (no_query.status_code, no_query.json()["error"]["param"]) == (400, "dataset_id")


def test_file_url_path_inverts_as_uri(tmp_path: Path) -> None:
    from llama_engine.datasets.source import file_url_path
    path = tmp_path / "a b%c" / "d.jsonl"  # percent-encoded by as_uri
    assert file_url_path(path.as_uri()) == path
    assert file_url_path("file://localhost/x/y") == Path("/x/y")
    with pytest.raises(ValueError, match="not a file:// URL"):
        file_url_path("/x/y")
    with pytest.raises(ValueError, match="local path"):
        file_url_path("file://host/x/y")
    with pytest.raises(DatasetSourceError, match="a directory, not a file"):
        fetch_content(tmp_path.as_uri())
    with pytest.raises(DatasetSourceError, match="no such file"):
        fetch_content((tmp_path / "nope.jsonl").as_uri())
